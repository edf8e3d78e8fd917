"""Data generation, preference pairs, the judge and sequential evaluation, on the real SmolLM2-135M-Instruct."""

import json
import random

import pytest

from hf_ext.data.fewshot import FEW_SHOT_POOL, GenerationSettings, clean_response, few_shot_prompt, generate_sft_data
from hf_ext.data.formats import FORMATS
from hf_ext.data.manifest import manifest_path, verify_manifest
from hf_ext.data.pairs import sampled_pairs
from hf_ext.data.tasks import TASKS
from hf_ext.errors import UserInputError
from hf_ext.eval.judge import LogprobJudge
from tests.conftest import SMOLLM2, run_cli


def test_few_shot_prompt_is_the_trained_format_with_examples_from_different_categories():
    instruction = "What is 12 + 13? Reply with the number only."
    prompt = few_shot_prompt(instruction, random.Random(0), shots=3)
    assert prompt.endswith(FORMATS["instruction"].PROMPT.format(instruction=instruction))
    blocks = prompt.split("\n\n")
    assert len(blocks) == 4 and all(b.endswith("\nEND") for b in blocks[:3])
    categories = {c for c, q, a in FEW_SHOT_POOL for b in blocks[:3] if b == f"Instruction: {q}\nResponse: {a}\nEND"}
    assert len(categories) == 3
    assert few_shot_prompt(instruction, random.Random(0), 3) == prompt != few_shot_prompt(instruction, random.Random(1), 3)


@pytest.mark.parametrize(
    "continuation, expected",
    [
        (" 25\nEND\n\nInstruction: x", ("25", "kept")),
        (" 25\nInstruction: What is", ("25", "kept_cut_run_on")),
        (" 25 and then some more text", (None, "rejected_unterminated")),
        (" \nEND", (None, "rejected_short")),
    ],
)
def test_clean_response(continuation, expected):
    assert clean_response(continuation, min_chars=1) == expected


def test_generation_resumes_a_crashed_partial_file_and_never_leaves_it_trainable(tokenizer, smollm2, tmp_path):
    task = TASKS["addition"]
    rows = task.splits(12, 0, seed=5)["train"]
    settings = GenerationSettings(batch_size=4, max_new_tokens=8, keep_unverified=True)
    kwargs = dict(answers=list(rows["answer"]), verify=task.verify, source_model=SMOLLM2)
    reference = generate_sft_data(smollm2, tokenizer, list(rows["prompt"]), tmp_path / "ref.jsonl", settings, **kwargs)

    # A crash after 6 instructions, the last line cut mid-write: only the partial file exists.
    full = tmp_path / "ref.jsonl"
    crashed = tmp_path / "run.jsonl"
    partial = crashed.with_name("run.jsonl.partial")
    done = [json.dumps({"index": i, "status": "kept", "instruction": p, "response": "RESUMED", "verified": None})
            for i, p in enumerate(list(rows["prompt"])[:6])]
    partial.write_text("\n".join(done) + "\n" + '{"index": 6, "sta')
    assert not crashed.exists() and not manifest_path(crashed).exists()
    manifest = generate_sft_data(smollm2, tokenizer, list(rows["prompt"]), crashed, settings, **kwargs)
    written = [json.loads(line) for line in crashed.read_text().splitlines()]
    assert [r["response"] for r in written[:6]] == ["RESUMED"] * 6, "finished rows are not redone"
    expected = [json.loads(line) for line in full.read_text().splitlines()]
    assert written[6:] == [r for r in expected if r["instruction"] in set(rows["prompt"][6:])]
    assert not partial.exists() and verify_manifest(crashed) == manifest
    assert manifest["qc"]["instructions"] == 12 and reference["parameters"]["format"] == "instruction"


def test_judge_margin_is_antisymmetric_in_the_two_responses(tokenizer, smollm2):
    judge = LogprobJudge(smollm2, tokenizer)
    forward, backward = judge.compare([("What is 2 + 2?", "4", "5"), ("What is 2 + 2?", "5", "4")])
    assert forward.margin == pytest.approx(-backward.margin, abs=1e-5)
    assert forward.first_order == pytest.approx(-backward.second_order, abs=1e-5)
    assert forward.outcome in ("win", "loss", "tie") and forward.agree == backward.agree


def test_best_of_n_pairs_choose_a_higher_reward(tokenizer, smollm2):
    task = TASKS["sorting"]
    rows = task.splits(8, 0, seed=2)["train"]
    dataset, stats = sampled_pairs(
        smollm2, tokenizer, list(rows["prompt"]), FORMATS["messages"], "best_of_n", k=4, task=task,
        answers=list(rows["answer"]), temperature=1.0, max_new_tokens=24, batch_size=8,
    )
    answers = dict(zip(rows["prompt"], rows["answer"]))
    assert stats["pairs"] == len(dataset) and stats["scored_by"] == "sorting verifier reward"
    for pair in dataset:
        assert task.reward(pair["chosen"], answers[pair["prompt"]]) > task.reward(pair["rejected"], answers[pair["prompt"]])
        assert pair["margin"] > 0
    per_prompt = {p: list(dataset["prompt"]).count(p) for p in set(dataset["prompt"])}
    assert all(n <= 3 for n in per_prompt.values()), "at most k - 1 pairs per prompt"


@pytest.mark.slow
def test_sequential_eval_keeps_peak_memory_near_one_model(tmp_path):
    """Three models in turn (plus the judge) must not cost much more memory than one."""
    common = ["--task", "addition", "--num_examples", "8", "--batch_size", "8", "--max_new_tokens", "4"]
    one = run_cli("hf-ext", "eval", "--model", SMOLLM2, *common, "--output", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    three = run_cli("hf-ext", "eval", "--model", ",".join([SMOLLM2] * 3), *common, "--judge", SMOLLM2,
                    "--output", str(tmp_path / "three.json"))
    assert three.returncode == 0, three.stderr[-2000:]
    single = json.loads((tmp_path / "one.json").read_text())
    several = json.loads((tmp_path / "three.json").read_text())
    assert [m["accuracy"] for m in several["models"]] == [single["models"][0]["accuracy"]] * 3
    judged = several["models"][1]["judge_vs_first"]
    assert judged["win"] + judged["loss"] + judged["tie"] == 8 and 0 <= judged["win_rate"] <= 1
    # "One model at a time": two resident models would cost one more model's weights (~515 MB fp32) on top of a
    # single-model run. Measured: 1066 MB for one model, 1331 MB for three models + the judge (the judge's forward
    # pass adds ~130 MB); before the judge kept only the last logits it was 1602 MB, which this bound rejects.
    model_mb = 135e6 * 4 / 2**20
    assert several["peak_rss_mb"] < single["peak_rss_mb"] + model_mb, (
        f"{several['peak_rss_mb']:.0f} MB for 3 models + judge vs {single['peak_rss_mb']:.0f} MB for one"
    )


@pytest.mark.slow
def test_pipeline_runs_every_step_then_skips_completed_ones(tmp_path):
    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(f"""
output_dir: {tmp_path / "out"}
model_name_or_path: {SMOLLM2}
base_model_id: HuggingFaceTB/SmolLM2-135M-Instruct
task: addition
data_format: instruction
generate_sft: {{num_prompts: 16, max_new_tokens: 8, keep_unverified: true}}
sft: {{recipe: recipes/sft.yaml, max_steps: 2, per_device_train_batch_size: 2}}
make_pairs: {{method: hard_negatives, num_prompts: 8}}
dpo: {{recipe: recipes/dpo.yaml, max_steps: 1, per_device_train_batch_size: 2}}
evaluate: {{num_examples: 4, batch_size: 4, max_new_tokens: 4}}
""")
    first = run_cli("hf-ext", "pipeline", str(pipeline))
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in report["steps"].values()] == ["ran"] * 5
    assert [row["model"] for row in report["table"]] == ["base", "sft", "dpo"]
    assert report["table"][0]["win_rate_vs_base"] is None and 0 <= report["table"][2]["win_rate_vs_base"] <= 1
    dpo_recipe = (out / "dpo" / "recipe.yaml").read_text()
    assert f"model_name_or_path: {out / 'sft'}" in dpo_recipe, "DPO continues from the SFT adapter"
    for data in (out / "generate_sft" / "sft.jsonl", out / "make_pairs" / "pairs.jsonl"):
        verify_manifest(data)

    second = run_cli("hf-ext", "pipeline", str(pipeline))
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in again["steps"].values()] == ["skipped (complete)"] * 5
    assert again["table"] == report["table"]


def test_data_tools_never_use_held_out_prompts(tmp_path):
    """Prompts for generated data come from the task's train split, so `hf-ext eval`'s held-out split stays clean."""
    out = tmp_path / "pairs.jsonl"
    result = run_cli("hf-ext", "data", "make-pairs", "--method", "hard_negatives", "--model", SMOLLM2,
                     "--task", "addition", "--num_prompts", "2000", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    used = {json.loads(line)["prompt"] for line in out.read_text().splitlines()}
    held_out = set(TASKS["addition"].splits(2000, 200, seed=42)["test"]["prompt"])
    assert len(used) > 1500 and not used & held_out
    skipped = tmp_path / "skipped.jsonl"
    result = run_cli("hf-ext", "data", "make-pairs", "--method", "hard_negatives", "--model", SMOLLM2,
                     "--task", "addition", "--num_prompts", "100", "--offset", "1900", "--output", str(skipped))
    assert result.returncode == 0, result.stderr[-2000:]
    later = [json.loads(line)["prompt"] for line in skipped.read_text().splitlines()]
    first_2000 = list(TASKS["addition"].splits(2000, 200, seed=42)["train"]["prompt"])
    assert later[:5] == first_2000[1900:1905], "--offset skips the prompts other steps used"


def test_pipeline_checks_every_steps_keys_before_running_any(tmp_path):
    from hf_ext.pipeline import run_pipeline

    pipeline = tmp_path / "typo.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'out'}\nmodel_name_or_path: {SMOLLM2}\ntask: addition\n"
                        "sft: {recipe: recipes/sft.yaml}\ndpo: {recipe: recipes/dpo.yaml}\nevaluate: {num_exampels: 4}\n")
    with pytest.raises(UserInputError, match=r"step 'evaluate': key\(s\) num_exampels not accepted here.*num_examples"):
        run_pipeline(pipeline)
    assert not (tmp_path / "out").exists()


def test_a_finished_data_step_made_from_other_prompts_is_an_error_not_a_skip(tmp_path):
    """Skipping it would train on prompts the pipeline no longer asks for, perhaps ones evaluate now scores."""
    from hf_ext.data.manifest import write_data_file
    from hf_ext.data.tasks import TrainingPrompts
    from hf_ext.pipeline import run_pipeline

    out = tmp_path / "out"
    made_from = TrainingPrompts("addition", num_prompts=8).describe()
    write_data_file(out / "generate_sft" / "sft.jsonl", [{"instruction": "What is 1 + 1?", "response": "2"}],
                    generator="hf_ext.data.fewshot", qc={}, parameters={"prompts": made_from})
    pipeline = tmp_path / "changed.yaml"
    pipeline.write_text(f"output_dir: {out}\nmodel_name_or_path: {SMOLLM2}\ntask: addition\n"
                        "generate_sft: {num_prompts: 16}\nsft: {recipe: recipes/sft.yaml}\n"
                        "dpo: {recipe: recipes/dpo.yaml}\n")
    with pytest.raises(UserInputError, match=r"step 'generate_sft': .*sft.jsonl was made from prompts .*'num_prompts': 8.*"
                                             r"now asks for .*'num_prompts': 16.*; delete .*generate_sft to re-run"):
        run_pipeline(pipeline)
