"""The architecture x stage matrix: every cell that applies trains a few steps through its shipped recipe, tiny.

The pretrain, MLM and ARC cells are the session runs of tests/conftest.py, which other modules read as well (each
cell runs once per session). The fine-tuning cells (SFT, DPO, SDFT, TTT-Discover) start from the tiny pretrain run of
their architecture, so the whole row goes from scratch to a fine-tuned adapter through recipes alone. The pretrained
tokenizers have no chat template, so these cells use plain-text prompts (`data_format`), as a base model would.

They run in this process through `hf_ext.train.run`: a subprocess costs ~7 s of imports per cell, and the tiny models
need little memory. `MATRIX` is the table the README and docs/matrix.md show; a test checks that both show it as
rendered here, and that every cell either runs or says why it does not apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_ext  # noqa: F401  (registers mhc_lm, mamba_ssm and arc_grid)
from hf_ext.trainers.sdft import TEACHER_ADAPTER
from tests.conftest import REPO

STAGES = {"sft": "SFT", "dpo": "DPO", "sdft": "SDFT", "ttt_discover": "TTT-Discover", "pretrain": "pretrain",
          "mlm": "MLM", "arc": "ARC"}
FINE_TUNING = ("sft", "dpo", "sdft", "ttt_discover")


class Row:
    """One architecture: how its models are named and loaded, and the session run that trains it from scratch."""

    def __init__(self, label: str, model_type: str, model_class: str, auto_class: str, fixture: str):
        self.label, self.model_type, self.model_class = label, model_type, model_class
        self.auto_class, self.fixture = auto_class, fixture


ROWS = {
    "llama": Row("`llama` (transformers; SmolLM2's architecture)", "llama", "LlamaForCausalLM",
                 "AutoModelForCausalLM", "pretrained_llama"),
    "mhc_lm": Row("`mhc_lm`", "mhc_lm", "MHCForCausalLM", "AutoModelForCausalLM", "pretrained"),
    "mamba_ssm": Row("`mamba_ssm`, causal", "mamba_ssm", "MambaSSMForCausalLM", "AutoModelForCausalLM",
                     "causal_mamba"),
    "mamba_ssm_bidirectional": Row("`mamba_ssm`, bidirectional", "mamba_ssm", "MambaSSMForMaskedLM",
                                   "AutoModelForMaskedLM", "masked_lm"),
    "arc_grid": Row("`arc_grid` (champion variant)", "arc_grid", "ArcGridForGridPrediction",
                    "AutoModelForSemanticSegmentation", "arc_champion"),
}

CAUSAL_ONLY = "n/a: causal only; MLM needs a bidirectional model"
NOT_GRIDS = "n/a: ARC trains `arc_grid`"
SEES_THE_NEXT_TOKEN = "n/a: causal-LM stage; a bidirectional model sees the next token"
NOT_TEXT = "n/a: predicts grids, not tokens"

# (row, stage) -> the shipped recipe the cell runs, or the reason it does not apply (starting with "n/a: ").
MATRIX: dict[tuple[str, str], str] = {
    **{(row, stage): f"{stage}.yaml" for row in ("llama", "mhc_lm", "mamba_ssm") for stage in FINE_TUNING},
    ("llama", "pretrain"): "pretrain_llama.yaml",
    ("mhc_lm", "pretrain"): "pretrain_mhc.yaml",
    ("mamba_ssm", "pretrain"): "pretrain_mamba.yaml",
    ("mamba_ssm_bidirectional", "mlm"): "mamba_mlm.yaml",
    ("arc_grid", "arc"): "arc/champion.yaml",
    ("llama", "mlm"): CAUSAL_ONLY,
    ("mhc_lm", "mlm"): CAUSAL_ONLY,
    ("mamba_ssm", "mlm"): "n/a: causal; MLM trains the bidirectional row",
    **{(row, "arc"): NOT_GRIDS for row in ("llama", "mhc_lm", "mamba_ssm", "mamba_ssm_bidirectional")},
    **{("mamba_ssm_bidirectional", stage): SEES_THE_NEXT_TOKEN for stage in (*FINE_TUNING, "pretrain")},
    **{("arc_grid", stage): NOT_TEXT for stage in (*FINE_TUNING, "pretrain", "mlm")},
}
# From-scratch cells first: the fine-tuning cells of a row start from its pretrain run.
RUNS = sorted((cell for cell, entry in MATRIX.items() if not entry.startswith("n/a: ")),
              key=lambda cell: cell[1] in FINE_TUNING)

# What a fine-tuning cell changes in its recipe: the model (a tiny pretrain run), plain-text prompts, a few steps.
SMALL_TASK = ["--task_train_size", "16", "--task_eval_size", "4", "--eval_batch_size", "4", "--eval_max_new_tokens", "4"]
FINE_TUNING_OVERRIDES = {
    "sft": ["--data_format", "instruction", "--per_device_train_batch_size", "4", *SMALL_TASK],
    # The sigmoid term alone (the recipe adds an NLL term), whose value at step 1 is exactly log 2.
    "dpo": ["--data_format", "instruction", "--per_device_train_batch_size", "4", "--max_length", "64",
            "--loss_type", "sigmoid", "--loss_weights", "null", *SMALL_TASK],
    # Completions longer than the 3 tokens SDFT leaves out of its loss, so that every step trains.
    "sdft": ["--data_format", "prompt_completion", "--per_device_train_batch_size", "2", "--warmup_steps", "0",
             "--max_completion_length", "6", *SMALL_TASK],
    # A problem every completion solves with a different value, so that groups carry a signal from a random model.
    "ttt_discover": ["--problem", "tests.test_ttt_discover:CountDistinct", "--groups_per_batch", "2", "--group_size",
                     "4", "--per_device_train_batch_size", "4", "--max_completion_length", "8"],
}
FINE_TUNING_STEPS = 2


def fine_tuned(row: str, stage: str, output_dir: Path, request, monkeypatch) -> Path:
    """`output_dir` after the cell's recipe ran on the row's tiny pretrain run."""
    from hf_ext.train import run

    base = request.getfixturevalue(ROWS[row].fixture)
    monkeypatch.setenv("HF_EXT_CACHE", str(request.getfixturevalue("cache_dir")))
    run(str(REPO / "recipes" / MATRIX[row, stage]), [
        "--model_name_or_path", str(base), "--base_model_id", "null", "--output_dir", str(output_dir),
        "--max_steps", str(FINE_TUNING_STEPS), "--logging_steps", "1", "--save_strategy", "no",
        *FINE_TUNING_OVERRIDES[stage],
    ])
    return output_dir


def loaded(folder: Path, row: Row, adapter: bool):
    """The model the run saved, loaded back as a user would (an adapter on the base model it names)."""
    import peft
    import transformers

    if adapter:
        model = peft.AutoPeftModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, peft.PeftModel)
        return model.get_base_model()
    return getattr(transformers, row.auto_class).from_pretrained(folder)


def lora_b_norm(weights: dict[str, torch.Tensor]) -> float:
    """LoRA's B matrices start at zero: a non-zero norm means the adapter trained."""
    return sum(value.norm().item() for key, value in weights.items() if "lora_B" in key)


@pytest.mark.parametrize("row, stage", RUNS, ids=[f"{row}-{stage}" for row, stage in RUNS])
def test_every_cell_trains_through_its_recipe_and_saves_a_model_that_loads(row, stage, request, tmp_path, monkeypatch):
    adapter = stage in FINE_TUNING
    # A row's pretrain run (a session run that other modules read too) is its from-scratch cell.
    folder = fine_tuned(row, stage, tmp_path / "run", request, monkeypatch) if adapter else request.getfixturevalue(
        ROWS[row].fixture)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["stage"] == stage and metrics["recipe"].endswith(f"recipes/{MATRIX[row, stage]}")
    assert metrics["global_step"] == metrics["max_steps"] > 0 and math.isfinite(metrics["train_loss"])
    assert metrics["model_summary"]["model_type"] == ROWS[row].model_type
    model = loaded(folder, ROWS[row], adapter)
    assert type(model).__name__ == ROWS[row].model_class and model.config.model_type == ROWS[row].model_type
    if adapter:
        assert metrics["global_step"] == FINE_TUNING_STEPS
        assert lora_b_norm(load_file(folder / "adapter_model.safetensors")) > 0
    CHECKS.get(stage, lambda *_: None)(folder, metrics, row)


def check_sft(folder: Path, metrics: dict, row: str) -> None:
    """`all-linear` LoRA finds each architecture's projections; the task is scored after training."""
    adapter = json.loads((folder / "adapter_config.json").read_text())
    expected = {"in_proj", "out_proj"} if row == "mamba_ssm" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == expected
    assert metrics["accuracy_after"]["num_examples"] == 4


def check_dpo(folder: Path, metrics: dict, row: str) -> None:
    """At step 1 the policy is the reference (a fresh LoRA adapter), so the sigmoid DPO loss is exactly log 2."""
    assert metrics["loss_curve"]["loss"][0] == pytest.approx(math.log(2), abs=1e-5)


def check_sdft(folder: Path, metrics: dict, row: str) -> None:
    """The EMA teacher adapter is saved next to the student's and has followed it."""
    student = load_file(folder / "adapter_model.safetensors")
    teacher = load_file(folder / TEACHER_ADAPTER / "adapter_model.safetensors")
    assert teacher.keys() == student.keys() and lora_b_norm(teacher) > 0


def check_ttt_discover(folder: Path, metrics: dict, row: str) -> None:
    """Every rollout was recorded in the archive, and the best verified state is the run's result."""
    discovery = metrics["discovery"]
    archive = json.loads((folder / "archive.json").read_text())
    assert discovery["rollouts"] == archive["total_visits"] == FINE_TUNING_STEPS * 2 * 4 and discovery["verified"]
    assert discovery["value"] == max(state["value"] for state in archive["states"])
    assert json.loads((folder / "best_state.json").read_text())["value"] == discovery["value"]


def check_validation_perplexity(folder: Path, metrics: dict, row: str) -> None:
    validation = metrics["validation"]
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]))


def check_arc(folder: Path, metrics: dict, row: str) -> None:
    evaluation = metrics["arc_eval"]
    assert evaluation["tasks"] == 42 and 0 <= evaluation["pass2_task_mean"] <= 1


CHECKS = {"sft": check_sft, "dpo": check_dpo, "sdft": check_sdft, "ttt_discover": check_ttt_discover,
          "pretrain": check_validation_perplexity, "mlm": check_validation_perplexity, "arc": check_arc}


def matrix_table() -> str:
    """The Markdown table of `MATRIX`, as README.md and docs/matrix.md show it."""
    lines = ["| architecture | " + " | ".join(STAGES.values()) + " |", "|---" * (len(STAGES) + 1) + "|"]
    for key, row in ROWS.items():
        cells = [MATRIX[key, stage] for stage in STAGES]
        shown = [cell if cell.startswith("n/a: ") else f"runs: `{cell}`" for cell in cells]
        lines.append(f"| {row.label} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def test_every_cell_runs_or_says_why_not():
    assert set(MATRIX) == {(row, stage) for row in ROWS for stage in STAGES}
    for cell, entry in MATRIX.items():
        if entry.startswith("n/a: "):
            assert entry.removeprefix("n/a: ").strip(), f"{cell}: no reason given"
        else:
            assert (REPO / "recipes" / entry).is_file(), f"{cell}: no recipe {entry}"


@pytest.mark.parametrize("page", ["README.md", "docs/matrix.md"])
def test_the_docs_show_the_matrix_as_tested(page):
    assert matrix_table() in (REPO / page).read_text(), f"{page}: paste tests.test_matrix.matrix_table()"
