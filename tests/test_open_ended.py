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


def instruction_file(path, instructions=INSTRUCTIONS, generator="hf_ext.data.instructions", eval_size=2):
    path.write_text("".join(json.dumps({"instruction": i, "category": "qa"}) + "\n" for i in instructions))
    write_manifest(path, generator=generator, qc={}, parameters={"eval_size": eval_size})
    return path


def test_the_held_out_instructions_come_from_the_files_manifest_and_the_data_tools_take_the_rest(tmp_path, caplog):
    path = str(instruction_file(tmp_path / "i.jsonl", eval_size=2))
    assert InstructionPrompts(path).held_out() == INSTRUCTIONS[:2]
    assert list(InstructionPrompts(path, num_prompts=2).rows()["prompt"]) == INSTRUCTIONS[2:4]
    assert list(InstructionPrompts(path, num_prompts=9, offset=2).rows()["prompt"]) == INSTRUCTIONS[4:]
    assert "2 instructions after the 2 held out and the 2 skipped, fewer than the 9 asked for" in caplog.text
    assert InstructionPrompts(path, num_prompts=2).describe()["eval_size"] == 2
    with pytest.raises(UserInputError, match="6 instructions, of which the first 2 are held out .* 4 skipped"):
        InstructionPrompts(path, offset=4).rows()
    with pytest.raises(UserInputError, match="offset >= 0, got 200 and -1"):
        InstructionPrompts(path, offset=-1)
    none_held_out = str(instruction_file(tmp_path / "none.jsonl", eval_size=0))
    with pytest.raises(UserInputError, match="no instruction is held out for evaluation"):
        InstructionPrompts(none_held_out).held_out()


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
    prompts = InstructionPrompts(str(instruction_file(tmp_path / "i.jsonl")))
    with pytest.raises(UserInputError, match=f"method {method} needs a verifiable task"):
        make_pairs("no/such-model", prompts, tmp_path / "p.jsonl", method)


def test_too_few_instructions_for_the_requested_pairs_fail_before_any_model_loads(tmp_path):
    prompts = InstructionPrompts(str(instruction_file(tmp_path / "i.jsonl", eval_size=2)))
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
    path = instruction_file(tmp_path / "i.jsonl", eval_size=3)
    out = tmp_path / "results.json"
    result = run_cli("hf-ext", "eval", "--model", f"{SMOLLM2},{SMOLLM2}", "--instructions", str(path),
                     "--judge", SMOLLM2, "--max_new_tokens", "8", "--output", str(out))
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
generate_instructions: {{num_instructions: 16, eval_size: 2, max_new_tokens: 32, batch_size: 16, critic_threshold: 0.0}}
generate_sft: {{num_prompts: 4, max_new_tokens: 24, critic_threshold: 0.0}}
sft: {{recipe: recipes/sft.yaml, max_steps: 1, per_device_train_batch_size: 2}}
make_pairs: {{method: best_of_n, k: 2, temperature: 1.0, offset: 4, num_prompts: 2, max_new_tokens: 12}}
dpo: {{recipe: recipes/dpo.yaml, max_steps: 1, per_device_train_batch_size: 2}}
evaluate: {{max_new_tokens: 8}}
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
    pairs = verify_manifest(out / "make_pairs" / "pairs.jsonl")
    assert pairs["qc"]["scored_by"] == "judge" and pairs["parameters"]["prompts"]["offset"] == 4
    assert 0 <= pairs["qc"]["both_orders_agree_fraction"] <= 1
    held_out = InstructionPrompts(str(out / "generate_instructions" / "instructions.jsonl")).held_out()
    assert len(held_out) == 2
    sft_rows = {json.loads(line)["instruction"] for line in (out / "generate_sft" / "sft.jsonl").read_text().splitlines()}
    assert not sft_rows & set(held_out), "evaluation instructions never reach the data tools"
    assert "| model | win rate vs base (judge) | judge decided |" in result.stdout


@pytest.mark.parametrize("body, message", [
    ("task: addition\ngenerate_instructions: {}\n", "give either 'task' .* not both"),
    ("generate_instructions: {}\nmake_pairs: {method: on_policy}\n", "method on_policy needs a verifiable task"),
    ("generate_instructions: {}\nmake_pairs: {k: 2, num_prompts: 10, min_pairs: 50}\n",
     "10 prompts give at most 10 pairs with method best_of_n"),
    ("generate_instructions: {critic_threshold: 3}\n", "critic_threshold: a probability"),
    ("generate_instructions: {}\nmake_pairs: {path: other.jsonl}\n", r"step 'make_pairs': key\(s\) path not accepted"),
], ids=["task-and-instructions", "needs-a-verifier", "too-few-prompts", "bad-threshold", "owned-key"])
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


class FirstStepReached(Exception):
    pass


@pytest.mark.parametrize("name, first_step", [
    ("stage1.yaml", "hf_ext.data.fewshot.generate_task_sft_data"),
    ("stage1_open_ended.yaml", "hf_ext.data.instructions.generate_instruction_file"),
])
def test_the_shipped_stage1_pipelines_pass_every_check_before_their_first_step(tmp_path, monkeypatch, name, first_step):
    import yaml

    from hf_ext.pipeline import run_pipeline
    from tests.conftest import REPO

    config = yaml.safe_load((REPO / "recipes" / "pipelines" / name).read_text())
    config["output_dir"] = str(tmp_path / "out")
    (tmp_path / name).write_text(yaml.safe_dump(config, sort_keys=False))
    module, function = first_step.rsplit(".", 1)

    def reached(*args, **kwargs):
        raise FirstStepReached(function)

    monkeypatch.setattr(module + "." + function, reached)
    monkeypatch.chdir(REPO)  # the steps' recipes are paths relative to the repository
    with pytest.raises(FirstStepReached):
        run_pipeline(tmp_path / name)
