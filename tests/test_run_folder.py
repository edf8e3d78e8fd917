"""The run folder (hf_ext.run_folder), settings read back from it, and what architectures declare to the stages."""

from __future__ import annotations

import json
import re

import pytest

from hf_ext.errors import UserInputError
from hf_ext.run_folder import RunFolder, staged_directory, write_json_atomic
from tests.conftest import REPO


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"a": 2}  # a failed write keeps the previous file


def test_a_staged_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "tokenizer"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging.mkdir(), (staging / "half.json").write_text("{"))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(target) as staging:
        staging.mkdir()
        (staging / "tokenizer.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"] and (target / "tokenizer.json").is_file()


def test_a_folder_is_finished_only_once_its_metrics_are_written(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start()
    assert not folder.is_finished()
    with pytest.raises(UserInputError, match="no metrics.json"):
        folder.read_metrics()
    folder.write_metrics({"global_step": 3})
    assert folder.is_finished() and folder.read_metrics() == {"global_step": 3}
    folder.start()  # a new run in the same folder: unfinished again until its own metrics land
    assert not folder.is_finished()
    assert RunFolder(tmp_path / "elsewhere").read_recipe() == {} and RunFolder(tmp_path).read_training_record() == {}


def test_saved_settings_are_the_ones_the_run_used(tmp_path):
    """Keys the recipe never set come back with the stage's own defaults, not a reader's guess."""
    from hf_ext.recipe import ScriptArguments, saved_recipe, task_evaluation

    assert saved_recipe(tmp_path) is None
    (tmp_path / "recipe.yaml").write_text("stage: mlm\ncorpus: antibody_germlines\nseed: 7\n")
    saved = saved_recipe(tmp_path)
    assert saved.setting("seed") == 7
    assert saved.setting("corpus_validation_fraction") == ScriptArguments.corpus_validation_fraction == 0.05
    assert saved.setting("mlm_probability") == 0.15  # a stage key, with the stage's default
    with pytest.raises(KeyError):
        saved.setting("no_such_key")
    (tmp_path / "recipe.yaml").write_text("stage: sft\ntask: addition\nseed: 3\ntask_eval_size: 50\nload_in_4bit: true\n")
    evaluation = task_evaluation(str(tmp_path))
    assert (evaluation.task, evaluation.seed, evaluation.eval_size, evaluation.load_in_4bit) == ("addition", 3, 50, True)
    assert task_evaluation(str(tmp_path), task="sorting", seed=1).task == "sorting"
    (tmp_path / "recipe.yaml").write_text("stage: sft\ntask: addition\nbf16: true\nbackend: unsloth\n")
    assert task_evaluation(str(tmp_path)).task == "addition"  # GPU-only settings do not stop a read-back on a CPU
    (tmp_path / "recipe.yaml").write_text("stage: [sft\n")
    with pytest.raises(UserInputError, match="recipe.yaml: not valid YAML"):
        saved_recipe(tmp_path)


def test_architectures_declare_what_stages_need_of_them():
    from hf_ext.models.extras import extras_for

    assert dict(extras_for("mamba_ssm").masked_lm_fields) == {"bidirectional": True}
    assert extras_for("mhc_lm").diagnostics.name == "hyper_connections"
    assert extras_for("llama") == extras_for("any_other_model_type")  # defaults: no extras
    assert extras_for("llama").card_template == "default.md"
    for path in (REPO / "hf_ext" / "trainers").glob("*.py"):  # generic stages never test an architecture's name
        if path.name == "arc.py":  # the arc stage trains the arc_grid family only, and checks that it does
            continue
        assert not re.search(r"model_type\s*(==|!=|in\b)", path.read_text()), path.name
