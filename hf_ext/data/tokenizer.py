"""Train a SentencePiece tokenizer on real text and wrap it as a transformers fast tokenizer.

The SentencePiece model is lossless: identity normalization, whitespace kept as it is (runs of spaces become
whitespace-only pieces such as ``▁▁▁▁`` for indentation), no dummy prefix, digits split one by one, and byte
fallback so a character never seen in training becomes its UTF-8 bytes instead of ``<unk>``. ``decode(encode(t))
== t`` for any text, newlines and indentation included.

Newlines: SentencePiece trains on sentences, so ``"\\n"`` is a user-defined symbol, always its own token (id 4).
Training text is fed line by line, which loses nothing since no piece can span a user-defined symbol.

Special tokens: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<pad>`` 3. The tokenizer adds neither BOS nor EOS
(``add_bos_token=False``): for packed pretraining TRL appends the EOS string to each document, which this tokenizer
encodes as the EOS id. As in every transformers tokenizer (and unlike raw SentencePiece), special-token strings in
text are special tokens (``split_special_tokens=False``); pass ``split_special_tokens=True`` when encoding untrusted
text that may contain them literally.

The fast tokenizer is built with the ``tokenizers`` library from the trained pieces (BPE merges derived the way
transformers' SentencePiece converters do; Unigram scores copied) and gives the same ids as the SentencePiece
model. ``output_dir`` receives ``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer.from_pretrained``
loads them as a fast tokenizer) and the SentencePiece model itself, ``tokenizer.model``, for provenance.

Training is deterministic (single thread, every sentence used, no sampling): two runs write identical files. On a
2-core CPU, BPE with 8192 pieces on the full ``python_docs`` train split (~2M characters) trains in 0.3 s (Unigram:
2 s), so no ``input_sentence_size`` sampling is needed; it encodes held-out validation text at 0.28 tokens per
character.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE, Unigram
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import generate_merges

from hf_ext.errors import UserInputError

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
NEWLINE = "\n"
SENTENCEPIECE_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")
# Pieces every model holds whatever the text: the 4 special tokens, the newline symbol and the 256 byte pieces.
FIXED_PIECES = 4 + 1 + 256
# Keeps Unigram's lattice from ever choosing a control or byte piece for literal text such as "<s>" or "<0x41>".
_EXCLUDED_PIECE_SCORE = -1e9


def train_sentencepiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | Path,
    model_type: str = "bpe",
    model_max_length: int = 2048,
    character_coverage: float = 0.9995,
) -> PreTrainedTokenizerFast:
    """Train a lossless SentencePiece model on ``texts``, save it with its fast tokenizer in ``output_dir``.

    ``character_coverage`` is the share of character occurrences whose characters get a piece of their own; the
    rarest characters beyond it are encoded as their UTF-8 bytes.
    """
    if model_type not in MODEL_TYPES:
        raise UserInputError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size <= FIXED_PIECES:
        raise UserInputError(
            f"vocab_size must be an integer above {FIXED_PIECES} (4 special tokens, the newline symbol and 256 byte "
            f"pieces) plus the characters of the text, got {vocab_size!r}"
        )
    lines = _training_lines(texts)
    if not lines:
        raise UserInputError("no text to train a tokenizer on: every text is empty")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=[NEWLINE],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            # SentencePiece silently skips longer sentences (default 4192 bytes).
            max_sentence_length=max(4192, max(len(line.encode("utf-8")) for line in lines)),
            num_threads=1,  # Unigram training differs between thread counts
            minloglevel=2,
        )
    except RuntimeError as error:
        # "INTERNAL: src/trainer_interface.cc(638) [condition] Vocabulary size is smaller than ..." -> the sentence
        reason = str(error).split("] ", 1)[-1]
        message = f"SentencePiece could not train a {vocab_size}-piece {model_type} model: {reason}"
        raise UserInputError(message) from None

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SENTENCEPIECE_FILE).write_bytes(model.getvalue())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_fast_backend(spm.SentencePieceProcessor(model_proto=model.getvalue()), model_type),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def train_corpus_tokenizer(
    output_dir: str | Path,
    vocab_size: int = 8192,
    source: str = "python_docs",
    model_type: str = "bpe",
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on the train split of ``load_text_corpus(source)`` (validation stays held out)."""
    from hf_ext.data.corpus import load_text_corpus

    train = load_text_corpus(source)["train"]
    return train_sentencepiece_tokenizer(
        train["text"], vocab_size, output_dir, model_type=model_type, model_max_length=model_max_length
    )


def _training_lines(texts: Iterable[str]) -> list[str]:
    """The non-empty lines of ``texts``: SentencePiece trains on sentences, and newlines are a symbol of their own."""
    if isinstance(texts, str):
        raise UserInputError("texts must be an iterable of documents, got a single string")
    lines = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserInputError(f"texts[{index}] must be a string, got {type(text).__name__}")
        lines.extend(line for line in text.split(NEWLINE) if line)
    return lines


def _fast_backend(processor: spm.SentencePieceProcessor, model_type: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes and decodes exactly as ``processor``."""
    pieces = [processor.id_to_piece(index) for index in range(processor.get_piece_size())]
    special = [index for index in range(len(pieces)) if processor.is_control(index) or processor.is_unknown(index)]
    newline = processor.piece_to_id(NEWLINE)
    learned = {
        index
        for index in range(len(pieces))
        if index not in special and index != newline and not processor.is_byte(index)
    }
    if model_type == "bpe":
        # SentencePiece BPE merges any adjacent pair whose concatenation is a learned piece, best-scored (lowest id)
        # first; generate_merges lists exactly those pairs in that order.
        merges = generate_merges({pieces[index]: index for index in sorted(learned)}, None)
        vocab = {piece: index for index, piece in enumerate(pieces)}
        model = BPE(vocab, merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    else:
        scores = [
            (piece, processor.get_score(index) if index in learned else _EXCLUDED_PIECE_SCORE)
            for index, piece in enumerate(pieces)
        ]
        model = Unigram(scores, unk_id=processor.unk_id(), byte_fallback=True)

    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(pieces[index], special=True, normalized=False) for index in special])
    backend.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    return backend
