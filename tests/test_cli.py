"""The README commands, end to end, on the real SmolLM2-135M-Instruct with QLoRA (small step counts)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, SMALL, front_matter, run_cli

@pytest.mark.slow
def test_accelerate_launch_runs_the_main_job_and_writes_every_artifact(main_job, tmp_path):
    out, result = main_job
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.rglob("*.bin")), "no pickled files anywhere (training_args is JSON)"
    from transformers.trainer_pt_utils import safe_globals

    state_files = list(out.glob("checkpoint-*/*.pt")) + list(out.glob("checkpoint-*/*.pth"))
    assert state_files
    with safe_globals():  # what transformers allows when it resumes: tensors and numpy RNG arrays, no code
        for state_file in state_files:
            torch.load(state_file, weights_only=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["world_size"] == 1
    assert metrics["loss_curve"]["step"] == [1, 2, 3, 4] and all(v > 0 for v in metrics["loss_curve"]["loss"])
    for key in ("accuracy_before", "accuracy_after"):
        assert metrics[key]["num_examples"] == 8 and 0 <= metrics[key]["accuracy"] <= 1
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    card = front_matter(out / "README.md")
    assert card["library_name"] == "peft" and card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"hf_ext", "sft", "trl"} <= set(card["tags"])
    assert card["model-index"][0]["results"][0]["metrics"][0]["value"] == round(metrics["accuracy_after"]["accuracy"], 4)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["output_dir"] == str(out) and saved["stage"] == "sft"
    accuracy = f"accuracy {metrics['accuracy_before']['accuracy']:.3f} -> {metrics['accuracy_after']['accuracy']:.3f}"
    assert f"INFO hf_ext: done: stage sft, 4 steps, train loss {metrics['train_loss']:.4g}, {accuracy}; outputs in {out}" in result.stderr

    evaluation = run_cli("hf-ext", "eval", "--model", str(out), "--output", str(tmp_path / "eval.json"))
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    scored = json.loads((tmp_path / "eval.json").read_text())["models"][0]
    assert scored["num_examples"] == 8 and scored["accuracy"] == metrics["accuracy_after"]["accuracy"]


@pytest.mark.slow
def test_two_process_run_trains_on_both_ranks_as_one_process_does(tmp_path):
    # LoRA dropout off: its masks come from each rank's own RNG, so they differ from one process's
    common = ["recipes/sft.yaml", "--max_steps", "2", "--eval_before_training", "false", "--lora_dropout", "0", *SMALL]
    out = tmp_path / "ddp"
    result = run_cli("hf-ext", "train", *common, "--num_processes", "2", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate launch --num_processes 2" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    ranks = sorted(metrics["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["global_step"] == 2 for r in ranks)
    assert ranks[0]["trainable_checksum"] == pytest.approx(ranks[1]["trainable_checksum"], rel=1e-9), (
        "DDP keeps the adapters identical on both ranks"
    )
    # The same global batch (4 rows) on one process: accelerate gives each rank half of it, and transformers
    # normalises the loss by the tokens of the whole global batch, so the losses agree to float rounding (measured:
    # 1e-7 relative; asserted: 1e-5) and so do the trained adapters.
    one = run_cli("hf-ext", "train", *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    reference = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["loss_curve"]["step"] == reference["loss_curve"]["step"] == [1, 2]
    assert metrics["loss_curve"]["loss"] == pytest.approx(reference["loss_curve"]["loss"], rel=1e-5)
    assert ranks[0]["trainable_checksum"] == pytest.approx(reference["ranks"][0]["trainable_checksum"], rel=1e-5)


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    missing_field = tmp_path / "rows.jsonl"
    missing_field.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    malformed = tmp_path / "broken.jsonl"
    malformed.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"not a gguf")
    return {
        "unknown key": (["--learning_rat", "1"], "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        "wrong type": (["--max_steps", "ten"], "key 'max_steps': invalid int value: 'ten'"),
        "missing dataset file": (["--task", "", "--dataset_name", "data/none.jsonl"], "file data/none.jsonl does not exist"),
        "row without response": (["--task", "", "--dataset_name", str(missing_field), "--data_format", "prompt_completion",
                                  "--allow_unverified_data", "true"],
                                 "row 2: field 'completion': expected a non-empty string"),
        "malformed JSON line": (["--task", "", "--dataset_name", str(malformed), "--allow_unverified_data", "true"],
                                f"{malformed}, line 2: not valid JSON: Expecting value (column 31)"),
        "model path missing": (["--model_name_or_path", "./models/none"], "model ./models/none: path does not exist"),
        "not a gguf": (["--model_name_or_path", str(fake_gguf)], "not a GGUF file"),
    }


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing dataset file", "row without response",
                                  "malformed JSON line", "model path missing", "not a gguf"])
def test_bad_input_is_one_line_without_traceback_or_output_folder(tmp_path, case):
    overrides, message = _bad_input_cases(tmp_path)[case]
    out = tmp_path / "never"
    result = run_cli("hf-ext", "train", "recipes/sft.yaml", "--output_dir", str(out), *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-ext: error: ") and message in last, result.stderr[-2000:]
    assert not out.exists()


def test_data_manifest_of_a_malformed_file_is_one_line_naming_the_line(tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    result = run_cli("hf-ext", "data", "manifest", str(data))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"hf-ext: error: {data}, line 3: not valid JSON: Expecting value (column 31)"
    assert not (tmp_path / "broken.jsonl.manifest.json").exists()


def test_every_accelerate_config_parses_with_accelerate_itself():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    from hf_ext.cli import accelerate_config_path

    for name in ("ddp", "zero2", "zero3", "fsdp"):
        path = accelerate_config_path(name)
        config = load_config_from_file(path)
        assert config.num_processes >= 2 and config.mixed_precision == "bf16"
        args = launch_command_parser().parse_args(["--config_file", path, "-m", "hf_ext.train", "recipes/sft.yaml"])
        assert args.module and args.training_script == "hf_ext.train" and args.training_script_args == ["recipes/sft.yaml"]


def test_launch_arguments_match_the_documented_accelerate_command():
    from hf_ext.cli import launch_arguments
    from hf_ext.recipe import parse_recipe

    recipe = parse_recipe(REPO / "recipes" / "sft.yaml", ["--accelerate_config", "zero2"])
    arguments = launch_arguments(recipe, "recipes/sft.yaml", ["--accelerate_config", "zero2"], ["--num_processes", "8"])
    assert arguments[:2] == ["--config_file", str(REPO / "recipes" / "accelerate" / "zero2.yaml")]
    assert arguments[2:] == ["--num_processes", "8", "-m", "hf_ext.train", "recipes/sft.yaml", "--accelerate_config", "zero2"]


def test_help_is_printed_on_stdout_and_names_every_command():
    result = run_cli("hf-ext", "--help")
    assert result.returncode == 0 and "usage" not in result.stderr
    for command in ("hf-ext train RECIPE.yaml", "hf-ext eval", "generate-sft|generate-instructions|make-pairs|manifest|train-tokenizer",
                    "hf-ext pipeline", "hf-ext train RECIPE.yaml --help"):
        assert command in result.stdout, command
    unknown = run_cli("hf-ext", "trian")
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr and not unknown.stdout


@pytest.mark.parametrize("command", [["--help"], ["eval", "--help"], ["data", "--help"], ["pipeline", "--help"]])
def test_help_imports_neither_torch_nor_transformers(command):
    """Help prints at once: only commands that run register the architectures (which imports torch, ~4 s)."""
    hf_ext_command = str(Path(sys.executable).parent / "hf-ext")
    result = run_cli(sys.executable, "-X", "importtime", hf_ext_command, *command)
    assert result.returncode == 0 and result.stdout.strip()
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "hf_ext" in imported and not {"torch", "transformers"} & imported


def test_train_help_lists_the_stages_and_a_recipe_help_lists_its_keys():
    from hf_ext.trainers import STAGES

    stages = run_cli("hf-ext", "train", "--help")
    assert stages.returncode == 0
    assert [line.split()[0] for line in stages.stdout.splitlines() if line.startswith("  ")] == list(STAGES)
    keys = run_cli("hf-ext", "train", "recipes/dpo.yaml", "--help")
    assert keys.returncode == 0 and "(stage: dpo)" in keys.stdout
    text = " ".join(keys.stdout.split())
    assert "--backend {transformers,unsloth} transformers (default) or unsloth" in text  # a stage key, with help
    assert "--beta BETA" in text and "--lora_r LORA_R" in text and "--task TASK" in text  # TRL, model and data keys
    assert "--key null unsets it" in text and "Reserved keys: stage, accelerate_config, num_processes, env" in text


def test_closing_summary_names_the_run_in_one_line():
    from hf_ext.train import closing_summary

    assert closing_summary({"stage": "pretrain", "global_step": 5, "train_loss": 6.25,
                            "validation": {"loss": 5.5, "perplexity": 244.69, "blocks": 3}}) == (
        "stage pretrain, 5 steps, train loss 6.25, validation loss 5.5, validation perplexity 244.7"
    )
    assert closing_summary({"stage": "arc", "global_step": 6, "train_loss": None,
                            "arc_eval": {"pass2_task_mean": 0.125, "subset": "arc1_eval_equal_shape_max10"}}) == (
        "stage arc, 6 steps, arc_eval pass2_task_mean 0.125"
    )
