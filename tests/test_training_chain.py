"""`hf-ext pipeline` over a training chain (`steps:`): the blueprint pipeline (mHC pretrain -> SDFT -> TTT-Discover)
with tiny settings, each step from the previous one's folder, skipped when complete and resumed when interrupted."""

import json
import shutil

import pytest

from hf_ext.errors import UserInputError
from hf_ext.pipeline import training_chain_steps
from hf_ext.run_folder import read_yaml_mapping
from tests.conftest import REPO, TINY_MHC, TINY_RUN, run_cli

TINY_SDFT = {"recipe": "recipes/sdft.yaml", "base_model_id": None, "load_in_4bit": False, "use_peft": False,
             "data_format": "prompt_completion", "max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 2,
             "task_train_size": 16, "task_eval_size": 4, "eval_batch_size": 4, "eval_max_new_tokens": 4,
             "max_completion_length": 4}
TINY_TTT = {"recipe": "recipes/ttt_discover.yaml", "base_model_id": None, "max_steps": 1, "groups_per_batch": 2,
            "group_size": 4, "per_device_train_batch_size": 4, "max_completion_length": 16}


def test_the_shipped_blueprint_parses_and_chains_each_step_from_the_previous_folder():
    config = read_yaml_mapping(REPO / "recipes/pipelines/blueprint.yaml")
    steps = training_chain_steps("blueprint.yaml", config)
    assert [(step.name, step.recipe) for step in steps] == [
        ("pretrain", "recipes/pretrain_mhc.yaml"), ("sdft", "recipes/sdft.yaml"),
        ("ttt_discover", "recipes/ttt_discover.yaml")]
    keys = [dict(zip(step.arguments[::2], step.arguments[1::2])) for step in steps]
    assert "--model_name_or_path" not in keys[0], "the first step builds its model from its recipe"
    assert keys[1]["--model_name_or_path"] == "outputs/blueprint/pretrain"
    assert keys[2]["--model_name_or_path"] == "outputs/blueprint/sdft"
    assert all(k["--resume_from_checkpoint"] == "true" for k in keys)
    assert keys[1]["--base_model_id"] == "null", "a YAML null unsets the recipe's key"


def test_step_values_reach_the_recipe_as_a_recipe_file_would_give_them(tmp_path):
    from hf_ext.pipeline import check_training_step

    config = {"output_dir": str(tmp_path / "out"), "steps": {
        "pretrain": {"recipe": "recipes/pretrain_mhc.yaml", "config_overrides": {"hidden_size": 64, "hc_mult": 2}},
        "ttt": {**TINY_TTT, "lora_target_modules": ["q_proj", "v_proj"], "model_name_or_path": "pretrain"},
        "scratch": {"recipe": "recipes/pretrain_llama.yaml", "model_name_or_path": None}}}
    pretrain, ttt, scratch = (check_training_step("chain.yaml", step) for step in training_chain_steps("chain.yaml", config))
    assert pretrain.training_args.config_overrides == {"hidden_size": 64, "hc_mult": 2}
    assert ttt.model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert ttt.model_args.model_name_or_path == str(tmp_path / "out" / "pretrain")
    assert scratch.model_args.model_name_or_path is None, "model_name_or_path: null builds the model from the recipe"


@pytest.mark.parametrize(
    "steps, message",
    [
        ({"pretrain": {"recipe": "recipes/pretrain_mhc.yaml"}, "sdft": {**TINY_SDFT, "max_stepz": 2}},
         r"step 'sdft': .*max_stepz.*max_steps"),
        ({"pretrain": {"max_steps": 2}}, r"step 'pretrain': missing key 'recipe'"),
        ({"pretrain": {"recipe": "recipes/pretrain_mhc.yaml", "output_dir": "elsewhere"}},
         r"step 'pretrain': key\(s\) output_dir are set by the pipeline"),
        ([], r"'steps' must be a mapping"),
        ({"sdft": {**TINY_SDFT, "model_name_or_path": "ttt"}, "ttt": TINY_TTT},
         r"step 'sdft': model_name_or_path names step 'ttt', which does not run before it"),
        ({"../up": {"recipe": "recipes/pretrain_mhc.yaml"}}, r"step name '../up'"),
        ({"sdft": {**TINY_SDFT, "lora_r": "sixteen"}}, r"step 'sdft': .*lora_r"),
    ],
    ids=["typo-in-a-later-step", "no-recipe", "own-output-dir", "steps-not-a-mapping", "later-step-as-model",
         "folder-outside", "bad-value"],
)
def test_bad_chain_is_one_line_before_any_step_runs(tmp_path, steps, message):
    from hf_ext.pipeline import run_pipeline

    pipeline = tmp_path / "chain.yaml"
    pipeline.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "steps": steps}))
    with pytest.raises(UserInputError, match=message):
        run_pipeline(pipeline)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_blueprint_chain_trains_each_step_from_the_last_then_skips_and_resumes(tmp_path, pretrained):
    out = tmp_path / "out"
    shutil.copytree(pretrained, out / "pretrain")  # a finished pretrain step: skipped, its model used by SDFT
    pipeline = tmp_path / "blueprint.yaml"
    pretrain = {"recipe": "recipes/pretrain_mhc.yaml", "config_overrides": TINY_MHC,
                **{key[2:]: value for key, value in zip(TINY_RUN[::2], TINY_RUN[1::2])}}  # as the fixture ran it
    pipeline.write_text(json.dumps({"output_dir": str(out), "steps": {
        "pretrain": pretrain, "sdft": TINY_SDFT, "ttt_discover": TINY_TTT}}))

    first = run_cli("hf-ext", "pipeline", str(pipeline))
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in report["steps"].values()] == ["skipped (complete)", "ran", "ran"]
    sdft, ttt = report["steps"]["sdft"]["results"], report["steps"]["ttt_discover"]["results"]
    assert sdft["stage"] == "sdft" and sdft["global_step"] == 2 and sdft["model"] == str(out / "pretrain")
    assert ttt["stage"] == "ttt_discover" and ttt["global_step"] == 1 and ttt["model"] == str(out / "sdft")
    assert ttt["discovery.rollouts"] == 8 and sdft["accuracy_after.num_examples"] == 4
    assert (out / "sdft" / "model.safetensors").is_file(), "SDFT fine-tuned the whole pretrained mHC model"
    assert json.loads((out / "sdft" / "config.json").read_text())["model_type"] == "mhc_lm"
    adapter = json.loads((out / "ttt_discover" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "sdft"), "TTT-Discover's LoRA sits on the SDFT model"
    assert (out / "ttt_discover" / "best_state.json").is_file()

    # killed during SDFT's second step (its first checkpoint saved), before TTT-Discover started: the re-run resumes
    # SDFT from that checkpoint, then runs TTT-Discover
    assert (out / "sdft" / "checkpoint-1").is_dir()
    (out / "sdft" / "metrics.json").unlink()
    shutil.rmtree(out / "sdft" / "checkpoint-2")
    shutil.rmtree(out / "ttt_discover")
    second = run_cli("hf-ext", "pipeline", str(pipeline))
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in again["steps"].values()] == ["skipped (complete)", "ran", "ran"]
    resumed = again["steps"]["sdft"]["results"]
    assert resumed["resumed_from_checkpoint"] and resumed["global_step"] == 2

    # a finished step is never skipped with other settings than it was trained with
    changed = json.loads(pipeline.read_text())
    changed["steps"]["sdft"]["learning_rate"] = 1e-3
    pipeline.write_text(json.dumps(changed))
    third = run_cli("hf-ext", "pipeline", str(pipeline))
    assert third.returncode == 2 and "step 'sdft'" in third.stderr and "learning_rate: 0.0002" in third.stderr
    assert "delete the folder to re-run the step" in third.stderr
    pipeline.write_text(json.dumps({**changed, "steps": {**changed["steps"], "sdft": TINY_SDFT}}))

    # nor kept when a step before it must run again (it was trained from the older model)
    (out / "sdft" / "metrics.json").unlink()
    fourth = run_cli("hf-ext", "pipeline", str(pipeline))
    assert fourth.returncode == 2 and "step 'ttt_discover'" in fourth.stderr and "step 'sdft' before it" in fourth.stderr
    assert not (out / "sdft" / "metrics.json").exists(), "nothing ran"
