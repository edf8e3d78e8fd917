"""Loss masking: the tokens whose label is not -100 decode to exactly the response (plus END/EOS), for every format."""

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from hf_ext.data.formats import FORMATS, detect_format, encode_dataset
from hf_ext.errors import UserInputError


def trained_runs(tokenizer, input_ids, mask):
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, bit in zip(input_ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_prompt_completion_mask_is_exactly_the_completion(tokenizer):
    row = {"prompt": "Question: what is 17 + 25?\nAnswer:", "completion": " 42"}
    encoded = FORMATS["prompt_completion"].encode(row, tokenizer)
    assert trained_runs(tokenizer, encoded.input_ids, encoded.completion_mask) == [" 42" + tokenizer.eos_token]
    assert tokenizer.decode(encoded.input_ids) == row["prompt"] + row["completion"] + tokenizer.eos_token


def test_response_whose_first_token_merges_across_the_boundary(tokenizer):
    row = {"prompt": "Complete the word: hel", "completion": "lo"}
    joint = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
    prompt_alone = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt_alone)] != prompt_alone, "precondition: 'hel' + 'lo' merge into one token"
    for name, response in (("prompt_completion", "lo"), ("instruction", " lo\nEND")):
        data_format = FORMATS[name]
        encoded = data_format.encode(
            row if name == "prompt_completion" else {"instruction": row["prompt"], "response": "lo"}, tokenizer
        )
        assert trained_runs(tokenizer, encoded.input_ids, encoded.completion_mask) == [response + tokenizer.eos_token]
        prompt_ids = data_format.prompt_ids(row["prompt"], tokenizer)
        assert encoded.input_ids[: len(prompt_ids)] == prompt_ids, "training sees the prompt exactly as generation does"


def test_instruction_format_has_no_special_tokens_but_one_eos(tokenizer):
    row = {"instruction": "Name a colour.", "response": "Blue"}
    encoded = FORMATS["instruction"].encode(row, tokenizer)
    assert tokenizer.decode(encoded.input_ids) == "Instruction: Name a colour.\nResponse: Blue\nEND" + tokenizer.eos_token
    special = [t for t in encoded.input_ids if t in tokenizer.all_special_ids]
    assert special == [tokenizer.eos_token_id] and encoded.input_ids[-1] == tokenizer.eos_token_id
    assert trained_runs(tokenizer, encoded.input_ids, encoded.completion_mask) == [" Blue\nEND" + tokenizer.eos_token]
    assert FORMATS["instruction"].extract_response(" Blue\nEND\nInstruction: more") == "Blue"


def test_chatml_messages_train_every_assistant_turn_and_nothing_else(tokenizer):
    assert "{% generation %}" not in tokenizer.chat_template  # SmolLM2's ChatML has no generation markers
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 5?"},
        {"role": "assistant", "content": "It is 8."},
    ]
    encoded = FORMATS["messages"].encode({"messages": messages}, tokenizer)
    eos = tokenizer.eos_token
    assert trained_runs(tokenizer, encoded.input_ids, encoded.completion_mask) == ["4" + eos, "It is 8." + eos]
    # Same ids as the template's own tokenization: training context == inference context.
    assert encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_prompt_completion_rows_become_a_chat_turn_pair(tokenizer):
    data_format = detect_format(["prompt", "completion", "answer"], "messages", "test")
    dataset = Dataset.from_list([{"prompt": "What is 1 + 1?", "completion": "2", "answer": "2"}])
    encoded = encode_dataset(dataset, data_format, tokenizer, max_length=None, source="test")
    row = encoded[0]
    assert trained_runs(tokenizer, row["input_ids"], row["completion_mask"]) == ["2" + tokenizer.eos_token]
    prompt_ids = data_format.prompt_ids("What is 1 + 1?", tokenizer)
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_no_double_bos(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    with_bos = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True)
    assert with_bos("hi")["input_ids"][0] == with_bos.bos_token_id, "precondition: this tokenizer adds BOS"
    data_format = FORMATS["prompt_completion"]
    for prompt in ("Say hi:", with_bos.bos_token + "Say hi:"):
        encoded = data_format.encode({"prompt": prompt, "completion": " hi"}, with_bos)
        assert encoded.input_ids.count(with_bos.bos_token_id) == 1 and encoded.input_ids[0] == with_bos.bos_token_id


def test_labels_built_by_the_trl_trainer_decode_to_the_response(tokenizer, smollm2, tmp_path):
    """The whole path: our encoding -> TRL's label building and collator -> labels != -100 are the response."""
    from hf_ext.trainers.sft import HfExtSFTConfig, HfExtSFTTrainer

    rows = [
        {"prompt": "What is 12 + 30? Reply with the number only.", "completion": "42"},
        {"prompt": "Spell 'cat' backwards.", "completion": "tac"},
    ]
    data_format = FORMATS["messages"]
    dataset = encode_dataset(Dataset.from_list(rows), data_format, tokenizer, max_length=256, source="test")
    args = HfExtSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=2)
    trainer = HfExtSFTTrainer(model=smollm2, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, labels in zip(rows, batch["labels"]):
        kept = [int(t) for t in labels if t != -100]
        assert tokenizer.decode(kept) == row["completion"] + tokenizer.eos_token


@pytest.mark.parametrize(
    "rows, data_format, message",
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "prompt_completion", "row 2: field 'completion': expected a non-empty string, got nothing"),
        ([{"prompt": "a", "completion": "  "}], "prompt_completion", "row 1: field 'completion': expected a non-empty string, got an empty string"),
        ([{"prompt": "a", "completion": 3}], "prompt_completion", "row 1: field 'completion': expected a non-empty string, got int"),
        ([{"instruction": "a", "response": None}], "instruction", "row 1: field 'response'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "messages", "row 1: field 'messages': no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "messages", "row 1: field 'messages' turn 0: role must be"),
        ([{"messages": "hi"}], "messages", "row 1: field 'messages': expected a non-empty list"),
    ],
)
def test_bad_rows_name_the_row_and_field(tokenizer, rows, data_format, message):
    dataset = Dataset.from_list(rows)
    with pytest.raises(UserInputError, match="^data.jsonl: " + message.replace("(", r"\(").replace(")", r"\)")):
        encode_dataset(dataset, FORMATS[data_format], tokenizer, max_length=None, source="data.jsonl")


def test_over_length_row_is_an_error_not_a_silent_truncation(tokenizer):
    dataset = Dataset.from_list([{"prompt": "x", "completion": "y"}, {"prompt": "word " * 300, "completion": "z"}])
    with pytest.raises(UserInputError, match=r"row 2: \d+ tokens is longer than max_length 64"):
        encode_dataset(dataset, FORMATS["prompt_completion"], tokenizer, max_length=64, source="data.jsonl")


def test_detect_format():
    assert detect_format(["messages"], "auto", "s").name == "messages"
    assert detect_format(["instruction", "response"], "auto", "s").name == "instruction"
    assert detect_format(["prompt", "completion"], "auto", "s").name == "prompt_completion"
    with pytest.raises(UserInputError, match="cannot tell the data format"):
        detect_format(["text"], "auto", "s")
    with pytest.raises(UserInputError, match="needs column"):
        detect_format(["text"], "instruction", "s")
