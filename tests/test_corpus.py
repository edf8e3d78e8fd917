"""The offline python_docs corpus and the SentencePiece tokenizer trained on it."""

import ast
import inspect
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from hf_ext.data.corpus import (
    is_validation_document,
    load_text_corpus,
    python_docs_documents,
    stdlib_docstring_documents,
)
from hf_ext.data.tokenizer import (
    SENTENCEPIECE_FILE,
    train_corpus_tokenizer,
    train_sentencepiece_tokenizer,
)

VOCAB_SIZE = 512
# Characters no python_docs document contains, so they go through byte fallback.
UNSEEN_TEXT = "tab\tcr\r\nemoji 🤗 CJK 漢字 café\n\n    indented  double  space, literal <0x41>, end  "


@pytest.fixture(scope="module")
def corpus():
    return load_text_corpus()


@pytest.fixture(scope="module")
def validation_texts(corpus) -> list[str]:
    return list(corpus["validation"]["text"])


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece_tokenizer(corpus["train"]["text"][:200], VOCAB_SIZE, output_dir)
    return output_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def sentencepiece(tokenizer_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / SENTENCEPIECE_FILE))


def test_splits_are_disjoint_by_document_and_deterministic(corpus):
    assert set(corpus) == {"train", "validation"}
    assert corpus["train"].column_names == ["text"] and corpus["validation"].column_names == ["text"]
    train, validation = list(corpus["train"]["text"]), list(corpus["validation"]["text"])
    assert not set(train) & set(validation)
    assert len(set(train)) == len(train) and len(set(validation)) == len(validation)
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.10
    again = load_text_corpus("python_docs")
    assert list(again["train"]["text"]) == train and list(again["validation"]["text"]) == validation
    # The documents are parsed once per process; a fresh parse of the standard library gives the same ones.
    modules = [(name, text) for name, text in python_docs_documents() if name.startswith("module:")]
    names = {name for name, _ in modules}  # a module whose text repeats an earlier document's is left out
    assert [(name, text) for name, text in stdlib_docstring_documents() if name in names] == modules


def test_validation_is_chosen_by_document_name():
    names = [name for name, _ in python_docs_documents()]
    small = {name for name in names if is_validation_document(name, 0.05)}
    large = {name for name in names if is_validation_document(name, 0.20)}
    assert small < large  # a larger fraction only moves more documents out of train
    corpus = load_text_corpus(validation_fraction=0.20)
    assert len(corpus["validation"]) == len(large) and len(corpus["train"]) == len(names) - len(large)


def test_documents_are_real_python_documentation(corpus):
    from pydoc_data.topics import topics

    texts = set(corpus["train"]["text"]) | set(corpus["validation"]["text"])
    assert topics["assert"] in texts
    json_docstring = ast.get_docstring(ast.parse(Path(inspect.getfile(json)).read_text()), clean=True)
    assert any(text.startswith(json_docstring) for text in texts)
    assert all(len(text) >= 200 for text in texts)


def test_unknown_source_and_bad_fraction_are_rejected():
    with pytest.raises(ValueError, match="known sources: python_docs"):
        load_text_corpus("wikipedia")
    with pytest.raises(ValueError, match="validation_fraction"):
        load_text_corpus(validation_fraction=1.0)


def test_round_trip_is_exact_on_held_out_text(tokenizer, validation_texts):
    joined = "".join(validation_texts)
    assert "\n\n" in joined and "\n    " in joined and not joined.isascii()  # newlines, indentation, unicode
    for text in validation_texts + [UNSEEN_TEXT]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_fast_tokenizer_ids_equal_sentencepiece_ids(tokenizer, sentencepiece, validation_texts):
    assert tokenizer.is_fast
    for text in validation_texts + [UNSEEN_TEXT]:
        assert tokenizer(text)["input_ids"] == sentencepiece.encode(text)
    assert tokenizer.unk_token_id not in tokenizer(UNSEEN_TEXT)["input_ids"]  # byte fallback, never <unk>


def test_in_memory_and_reloaded_tokenizers_agree(corpus, tokenizer_dir, tokenizer, validation_texts, tmp_path):
    trained = train_sentencepiece_tokenizer(corpus["train"]["text"][:200], VOCAB_SIZE, tmp_path)
    assert trained.is_fast and len(trained) == len(tokenizer) == VOCAB_SIZE
    for text in validation_texts[:5] + [UNSEEN_TEXT]:
        assert trained(text)["input_ids"] == tokenizer(text)["input_ids"]
    # Training twice gives the same model, byte for byte.
    assert (tmp_path / SENTENCEPIECE_FILE).read_bytes() == (tokenizer_dir / SENTENCEPIECE_FILE).read_bytes()
    assert (tmp_path / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()


def test_special_tokens_and_newline(tokenizer):
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 3)
    assert tokenizer.model_max_length == 2048
    ids = tokenizer("first line\nsecond line")["input_ids"]
    assert 4 in ids and tokenizer.convert_ids_to_tokens(4) == "\n"
    assert ids[0] != tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id  # the collator adds EOS
    # As in every transformers tokenizer, special-token strings are special tokens (TRL appends "</s>" to each
    # document when packing) unless the caller asks to split them.
    assert tokenizer("a document</s>")["input_ids"][-1] == tokenizer.eos_token_id
    assert not {0, 1, 2, 3} & set(tokenizer("a </s> b <s> c <pad>", split_special_tokens=True)["input_ids"])


def test_unigram_model_matches_sentencepiece(corpus, validation_texts, tmp_path):
    tokenizer = train_sentencepiece_tokenizer(corpus["train"]["text"][:100], VOCAB_SIZE, tmp_path, model_type="unigram")
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / SENTENCEPIECE_FILE))
    for text in validation_texts[:8] + [UNSEEN_TEXT]:
        ids = tokenizer(text)["input_ids"]
        assert ids == processor.encode(text)
        assert tokenizer.decode(ids) == text


def test_corpus_tokenizer_trains_on_the_train_split(tmp_path, validation_texts):
    tokenizer = train_corpus_tokenizer(tmp_path, vocab_size=1024)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.is_fast and len(reloaded) == 1024
    text = validation_texts[0]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text


@pytest.mark.parametrize(
    ("texts", "vocab_size", "model_type", "message"),
    [
        ([], VOCAB_SIZE, "bpe", "every text is empty"),
        (["", ""], VOCAB_SIZE, "bpe", "every text is empty"),
        ("a single string", VOCAB_SIZE, "bpe", "got a single string"),
        (["text", 3], VOCAB_SIZE, "bpe", r"texts\[1\] must be a string"),
        (["text"], 100, "bpe", "vocab_size must be an integer above 261"),
        (["text"], VOCAB_SIZE, "wordpiece", "model_type must be one of bpe, unigram"),
        (["tiny text"] * 3, VOCAB_SIZE, "bpe", "Vocabulary size too high"),
        ([chr(code) * 3 for code in range(0x4E00, 0x4F00)], 300, "bpe", "smaller than required_chars"),
    ],
)
def test_bad_tokenizer_input_is_a_clear_error(texts, vocab_size, model_type, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_sentencepiece_tokenizer(texts, vocab_size, tmp_path, model_type=model_type)


def test_text_perplexity_is_the_mean_block_loss_over_held_out_documents(validation_texts):
    """`text_perplexity` = exp(mean next-token loss) of the blocks the documents make, each block scored alone:
    the same as transformers' own loss (labels = input ids) averaged over the blocks."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ext.eval.perplexity import text_perplexity
    from hf_ext.loading import load_tokenizer
    from tests.conftest import SMOLLM2

    smollm2_tokenizer = load_tokenizer(SMOLLM2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    result = text_perplexity(model, smollm2_tokenizer, validation_texts, block_size=64, max_tokens=300, batch_size=3)
    ids = []
    for text in validation_texts:
        ids += smollm2_tokenizer(text, add_special_tokens=False)["input_ids"] + [smollm2_tokenizer.eos_token_id]
        if len(ids) >= 300:
            break
    blocks = torch.tensor(ids[:256]).view(4, 64)  # 300 tokens make 4 whole blocks of 64
    with torch.no_grad():
        losses = [model(input_ids=block[None], labels=block[None]).loss.item() for block in blocks]
    assert result["num_tokens"] == 4 * 63 and result["block_size"] == 64
    assert result["mean_loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)
    assert model.training  # eval mode only inside the call
    short = text_perplexity(model, smollm2_tokenizer, validation_texts[:1], block_size=64, max_tokens=10**6)
    assert short["num_tokens"] % 63 == 0 and short["num_tokens"] > 0  # fewer tokens than max_tokens: whole blocks
    with pytest.raises(ValueError, match="fewer than block_size=64 tokens"):
        text_perplexity(model, smollm2_tokenizer, ["Hi."], block_size=64)
