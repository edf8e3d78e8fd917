"""Open-ended instructions from a base model (`hf-ext data generate-instructions`) and the log-probability critic
that keeps them (`hf_ext.eval.critic`)."""

import json
import random
import re

import pytest
import torch

from hf_ext.data.instructions import CATEGORIES, InstructionSettings, clean_instruction, instruction_prompt
from hf_ext.data.manifest import verify_manifest
from hf_ext.errors import UserInputError
from hf_ext.eval.critic import LogprobCritic, check_threshold
from tests.conftest import SMOLLM2, run_cli


def test_prompt_shows_examples_of_one_category_in_plain_text_and_ends_where_the_next_instruction_starts():
    prompt = instruction_prompt("creative", random.Random(0), shots=3)
    assert prompt.endswith("\n\nCategory: creative\nInstruction:")
    shown = re.findall(r"Category: (\w+)\nInstruction: (.+)\nEND", prompt)
    assert len(shown) == 3 and {c for c, _ in shown} == {"creative"}
    assert all(instruction in CATEGORIES["creative"] for _, instruction in shown)
    assert "<|" not in prompt and instruction_prompt("creative", random.Random(0), 3) == prompt


@pytest.mark.parametrize(
    "continuation, expected",
    [
        (" List three uses of a paper clip.\nEND\n\nCategory: generation", ("List three uses of a paper clip.", "kept")),
        (" Name a colour that rhymes\n  with bed.\nCategory: qa", ("Name a colour that rhymes with bed.", "kept")),
        (" Write a haiku about snow.\n\nWrite another", ("Write a haiku about snow.", "kept")),
        (" Write a story about a dragon that never", (None, "rejected_unterminated")),
        (" Hi.\nEND", (None, "rejected_short")),
        (" " + "Describe the ocean. " * 20 + "\nEND", (None, "rejected_long")),
        (" Instruction: Response: what\nEND", (None, "rejected_format")),
        (" Read https://example.com and summarise it.\nEND", (None, "rejected_format")),
        (" 12 + 13 = 25 = 38 ??\nEND", (None, "rejected_format")),
    ],
    ids=["end", "next-block", "blank-line", "unterminated", "short", "long", "labels", "url", "no-words"],
)
def test_continuations_are_cut_at_the_block_end_and_filtered(continuation, expected):
    assert clean_instruction(continuation, InstructionSettings()) == expected


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"critic_threshold": 1.5}, "critic_threshold: a probability of 'yes' between 0 and 1"),
        ({"critic_threshold": -0.1}, "critic_threshold"),
        ({"categories": ("qa", "poetry")}, "categories: unknown poetry; valid: qa, completion"),
        ({"num_instructions": 0}, "num_instructions and shots must be >= 1"),
        ({"min_chars": 50, "max_chars": 10}, "min_chars / max_chars"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        InstructionSettings(**settings)


def test_a_bad_threshold_stops_the_command_before_any_model_loads(tmp_path):
    result = run_cli("hf-ext", "data", "generate-instructions", "--model", "no/such-model", "--output",
                     str(tmp_path / "i.jsonl"), "--critic_threshold", "2")
    assert result.returncode == 2 and not (tmp_path / "i.jsonl").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("hf-ext: error: critic_threshold:")


class LabelReader(torch.nn.Module):
    """A stand-in critic model that reads which letter means "yes" in its prompt and puts `margin` nats on it, plus a
    constant preference of `letter_bias` nats for "A" (the position bias the two orders cancel)."""

    def __init__(self, tokenizer, margin: float, letter_bias: float):
        super().__init__()
        self.tokenizer, self.margin, self.letter_bias = tokenizer, margin, letter_bias
        self.a, self.b = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, logits_to_keep=1):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tokenizer))
        for row, ids in enumerate(input_ids):
            yes_is_a = "A means yes" in self.tokenizer.decode(ids)
            logits[row, -1, self.a] = self.letter_bias + (self.margin if yes_is_a else 0.0)
            logits[row, -1, self.b] = 0.0 if yes_is_a else self.margin
        return type("Output", (), {"logits": logits})()


def test_both_label_orders_cancel_a_letter_preference(tokenizer):
    biased = LogprobCritic(LabelReader(tokenizer, margin=0.0, letter_bias=3.0), tokenizer).score(["Name a fruit."])[0]
    assert biased.score == pytest.approx(0.5) and not biased.agree
    assert biased.yes_as_a == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    decided = LogprobCritic(LabelReader(tokenizer, margin=2.0, letter_bias=1.0), tokenizer).score(
        ["Name a fruit."], responses=["Apple"])[0]
    assert decided.agree and decided.score == pytest.approx(
        (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(1.0))).item() / 2)
    assert check_threshold(0.0) == 0.0 and check_threshold(1) == 1.0


@pytest.mark.slow
def test_generate_instructions_keeps_critic_approved_unique_instructions_and_resumes(tmp_path):
    output = tmp_path / "instructions.jsonl"
    # an earlier, interrupted run left its first two attempts
    earlier = [{"index": 0, "category": "qa", "instruction": "What is the tallest mountain in Africa?",
                "status": "kept", "critic": [0.75, 0.7, 0.8]},
               {"index": 1, "category": "completion", "instruction": None, "status": "rejected_unterminated",
                "critic": None}]
    (tmp_path / "instructions.jsonl.partial").write_text("".join(json.dumps(row) + "\n" for row in earlier))
    result = run_cli("hf-ext", "data", "generate-instructions", "--model", SMOLLM2, "--output", str(output),
                     "--num_instructions", "12", "--batch_size", "6", "--critic_threshold", "0.45")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = verify_manifest(output)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    qc = manifest["qc"]
    assert qc["attempts"] == 12 and sum(qc["statuses"].values()) == 12 and qc["kept"] == len(rows) > 0
    assert qc["statuses"].get("rejected_unterminated", 0) >= 1, "the earlier attempt is counted, not redone"
    assert rows[0] == {"instruction": "What is the tallest mountain in Africa?", "category": "qa",
                       "critic_score": 0.75, "critic_agree": True}
    assert all(row["critic_score"] >= 0.45 and row["category"] in CATEGORIES for row in rows)
    examples = {e.lower() for examples in CATEGORIES.values() for e in examples}
    assert len({row["instruction"].lower() for row in rows}) == len(rows) and not examples & {
        row["instruction"].lower() for row in rows}
    critic = qc["critic"]
    assert critic["threshold"] == 0.45 and critic["items"] == qc["kept"] + qc["statuses"].get("rejected_critic", 0)
    assert 0 <= critic["orders_agree"] <= 1 and not (tmp_path / "instructions.jsonl.partial").exists()
