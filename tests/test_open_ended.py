"""The open-ended stage-1 path: SFT rows and preference pairs for instructions written by the base model, kept by
the critic and the judge instead of a verifier, and evaluation by win rate with the judge's reliability."""

import json
import random

import pytest

from hf_ext.data.fewshot import OPEN_ENDED_POOL, GenerationSettings, few_shot_prompt, generate_sft_data
from hf_ext.data.instructions import InstructionPrompts
from hf_ext.data.manifest import verify_manifest, write_manifest
from hf_ext.data.pairs import make_pairs
from hf_ext.errors import UserInputError
from hf_ext.eval.critic import LogprobCritic
from tests.conftest import SMOLLM2, run_cli
from tests.test_instructions import LabelReader

INSTRUCTIONS = [
    "Name three animals that live in the sea.",
    "What is the opposite of cold?",
    "Write a short greeting for a birthday card.",
    "Give one reason to drink water every day.",
    "What colour do you get by mixing blue and yellow?",
    "List two fruits that are red.",
]


def instruction_file(path, instructions=INSTRUCTIONS, generator="hf_ext.data.instructions"):
    path.write_text("".join(json.dumps({"instruction": i, "category": "qa"}) + "\n" for i in instructions))
    write_manifest(path, generator=generator, qc={})
    return path


def test_the_first_instructions_are_held_out_and_the_data_tools_take_the_rest(tmp_path):
    path = str(instruction_file(tmp_path / "i.jsonl"))
    assert InstructionPrompts(path, eval_size=2).held_out() == INSTRUCTIONS[:2]
    assert list(InstructionPrompts(path, num_prompts=2, eval_size=2).rows()["prompt"]) == INSTRUCTIONS[2:4]
    assert list(InstructionPrompts(path, num_prompts=9, offset=2, eval_size=2).rows()["prompt"]) == INSTRUCTIONS[4:]
    with pytest.raises(UserInputError, match="6 instructions, of which the first 4 are held out .* 2 skipped"):
        InstructionPrompts(path, offset=2, eval_size=4).rows()


@pytest.mark.parametrize("command", [
    ["data", "generate-sft", "--output", "{out}"],
    ["data", "make-pairs", "--output", "{out}"],
    ["eval", "--judge", "no/such-model"],
])
def test_an_instruction_file_without_its_manifest_stops_every_tool_before_any_model_loads(tmp_path, command):
    bare = tmp_path / "instructions.jsonl"
    bare.write_text(json.dumps({"instruction": "Name a fruit."}) + "\n")
    model = "no/such-model" if command[0] == "data" else "no/such-model,no/other-model"
    argv = [part.format(out=tmp_path / "out.jsonl") for part in command]
    result = run_cli("hf-ext", *argv, "--model", model, "--instructions", str(bare))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "instructions.jsonl" in result.stderr and "manifest" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.jsonl").exists()


def test_a_data_file_from_another_tool_is_not_an_instruction_file(tmp_path):
    path = str(instruction_file(tmp_path / "sft.jsonl", generator="hf_ext.data.fewshot"))
    with pytest.raises(UserInputError, match="its manifest says hf_ext.data.fewshot wrote it; expected a file written "
                                             "by `hf-ext data generate-instructions`"):
        InstructionPrompts(path).rows()


@pytest.mark.parametrize("method", ["on_policy", "hard_negatives"])
def test_methods_that_need_a_verifier_are_refused_for_open_ended_instructions(tmp_path, method):
    prompts = InstructionPrompts(str(instruction_file(tmp_path / "i.jsonl")), eval_size=0)
    with pytest.raises(UserInputError, match=f"method {method} needs a verifiable task"):
        make_pairs("no/such-model", prompts, tmp_path / "p.jsonl", method)


def test_too_few_instructions_for_the_requested_pairs_fail_before_any_model_loads(tmp_path):
    prompts = InstructionPrompts(str(instruction_file(tmp_path / "i.jsonl")), eval_size=2)
    with pytest.raises(UserInputError, match=r"4 prompts give at most 8 pairs with method best_of_n \(k=3\), fewer "
                                             r"than min_pairs 50; use at least 25 prompts"):
        make_pairs("no/such-model", prompts, tmp_path / "p.jsonl", "best_of_n", k=3, min_pairs=50)


def test_open_ended_responses_are_shown_open_ended_examples():
    prompt = few_shot_prompt("Write a haiku about snow.", random.Random(0), 3, OPEN_ENDED_POOL)
    shown = {instruction for _, instruction, _ in OPEN_ENDED_POOL}
    assert sum(f"Instruction: {i}\n" in prompt for i in shown) == 3
    assert prompt.endswith("Instruction: Write a haiku about snow.\nResponse:")


@pytest.mark.parametrize("margin, kept", [(4.0, True), (-4.0, False)], ids=["critic-yes", "critic-no"])
def test_open_ended_sft_rows_are_kept_by_the_critic_and_its_reliability_is_in_the_manifest(
        tokenizer, smollm2, tmp_path, margin, kept):
    critic = LogprobCritic(LabelReader(tokenizer, margin=margin, letter_bias=0.5), tokenizer)
    output = tmp_path / "sft.jsonl"
    manifest = generate_sft_data(smollm2, tokenizer, INSTRUCTIONS[:4], output, GenerationSettings(
        max_new_tokens=32, batch_size=4), critic=critic, critic_model="stand-in")
    qc = manifest["qc"]
    terminated = qc["instructions"] - qc["statuses"].get("rejected_unterminated", 0) - qc["statuses"].get(
        "rejected_short", 0)
    assert terminated > 0, qc
    assert qc["kept"] == (terminated if kept else 0)
    assert qc["statuses"].get("rejected_critic", 0) == (0 if kept else terminated)
    assert qc["critic"]["model"] == "stand-in" and qc["critic"]["items"] == terminated
    assert qc["critic"]["orders_agree"] == 1.0, "a critic that reads the labels decides in both orders"
    assert manifest["parameters"]["checked_by"] == "critic" and verify_manifest(output) == manifest


@pytest.mark.slow
def test_open_ended_eval_reports_win_rates_with_the_judges_reliability(tmp_path):
    path = instruction_file(tmp_path / "i.jsonl")
    out = tmp_path / "results.json"
    result = run_cli("hf-ext", "eval", "--model", f"{SMOLLM2},{SMOLLM2}", "--instructions", str(path),
                     "--judge", SMOLLM2, "--eval_size", "3", "--max_new_tokens", "8", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = json.loads(out.read_text())["models"]
    assert first["prompts"] == INSTRUCTIONS[:3] and first["responses"] == second["responses"]
    # the same model against itself: both orders of each comparison see identical answers, so every one is a tie
    judged = second["judge_vs_first"]
    assert (judged["win"], judged["loss"], judged["tie"], judged["win_rate"], judged["orders_agree"]) == (0, 0, 3, 0.5, 0)
    assert first["critic"]["items"] == 3 and 0 <= first["critic"]["orders_agree"] <= 1
    assert "| win rate vs first (judge) | judge decided |" in result.stdout


@pytest.mark.slow
def test_the_open_ended_pipeline_runs_every_step_with_no_task(tmp_path):
    pipeline = tmp_path / "open.yaml"
    pipeline.write_text(f"""
output_dir: {tmp_path / "out"}
model_name_or_path: {SMOLLM2}
base_model_id: HuggingFaceTB/SmolLM2-135M-Instruct
data_format: instruction
generate_instructions: {{num_instructions: 16, max_new_tokens: 32, batch_size: 16, critic_threshold: 0.0}}
generate_sft: {{eval_size: 2, num_prompts: 4, max_new_tokens: 24, critic_threshold: 0.0}}
sft: {{recipe: recipes/sft.yaml, max_steps: 1, per_device_train_batch_size: 2}}
make_pairs: {{method: best_of_n, k: 2, temperature: 1.0, eval_size: 2, offset: 4, num_prompts: 2, max_new_tokens: 12}}
dpo: {{recipe: recipes/dpo.yaml, max_steps: 1, per_device_train_batch_size: 2}}
evaluate: {{eval_size: 2, max_new_tokens: 8}}
""")
    result = run_cli("hf-ext", "pipeline", str(pipeline))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "pipeline.json").read_text())
    assert list(report["steps"]) == ["generate_instructions", "generate_sft", "sft", "make_pairs", "dpo", "evaluate"]
    assert [row["model"] for row in report["table"]] == ["base", "sft", "dpo"]
    assert all("accuracy" not in row and 0 <= row["critic_decided"] <= 1 for row in report["table"])
    assert 0 <= report["table"][2]["win_rate_vs_base"] <= 1 and report["table"][0]["win_rate_vs_base"] is None
    assert verify_manifest(out / "generate_sft" / "sft.jsonl")["qc"]["critic"]["threshold"] == 0.0
    assert verify_manifest(out / "make_pairs" / "pairs.jsonl")["qc"]["scored_by"] == "judge"
    held_out = InstructionPrompts(str(out / "generate_instructions" / "instructions.jsonl"), eval_size=2).held_out()
    sft_rows = {json.loads(line)["instruction"] for line in (out / "generate_sft" / "sft.jsonl").read_text().splitlines()}
    assert not sft_rows & set(held_out), "evaluation instructions never reach the data tools"
    assert "| model | win rate vs base (judge) | judge decided |" in result.stdout


@pytest.mark.parametrize("body, message", [
    ("task: addition\ngenerate_instructions: {}\n", "give either 'task' .* not both"),
    ("generate_instructions: {}\ngenerate_sft: {eval_size: 30}\nevaluate: {eval_size: 50}\n",
     "eval_size .* differs between steps: generate_sft 30, make_pairs 50, evaluate 50"),
    ("generate_instructions: {critic_threshold: 3}\n", "critic_threshold: a probability"),
    ("generate_instructions: {}\nmake_pairs: {path: other.jsonl}\n", r"step 'make_pairs': key\(s\) path not accepted"),
], ids=["task-and-instructions", "held-out-mismatch", "bad-threshold", "owned-key"])
def test_the_open_ended_pipeline_checks_its_keys_before_running_any_step(tmp_path, body, message):
    from hf_ext.pipeline import run_pipeline

    pipeline = tmp_path / "open.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'out'}\nmodel_name_or_path: {SMOLLM2}\n"
                        "sft: {recipe: recipes/sft.yaml}\ndpo: {recipe: recipes/dpo.yaml}\n" + body)
    with pytest.raises(UserInputError, match=message):
        run_pipeline(pipeline)
    assert not (tmp_path / "out").exists()


def test_a_critic_threshold_outside_0_1_stops_generate_sft_before_any_model_loads(tmp_path):
    path = instruction_file(tmp_path / "i.jsonl")
    result = run_cli("hf-ext", "data", "generate-sft", "--model", "no/such-model", "--instructions", str(path),
                     "--critic_threshold", "1.5", "--output", str(tmp_path / "sft.jsonl"))
    assert result.returncode == 2 and not (tmp_path / "sft.jsonl").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("hf-ext: error: critic_threshold:")
