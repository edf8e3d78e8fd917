from pathlib import Path

import pytest
import yaml

from hf_ext.errors import UserInputError
from hf_ext.recipe import parse_recipe, split_overrides
from hf_ext.run_folder import RunFolder
from tests.conftest import REPO, SMOLLM2

SHIPPED = sorted(path for folder in ("", "arc", "continual") for path in (REPO / "recipes" / folder).glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = f"stage: sft\nmodel_name_or_path: {SMOLLM2}\ntask: addition\nreport_to: none\n"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_parses(path):
    recipe = parse_recipe(path)
    assert recipe.stage and recipe.training_args.output_dir


def test_types_are_converted_like_the_command_line(tmp_path):
    # YAML reads 2e-4 (no dot) as a string; the recipe still gets a float.
    recipe = parse_recipe(write(tmp_path, BASE + "learning_rate: 2e-4\nmax_steps: 7\nuse_peft: true\n"))
    assert recipe.training_args.learning_rate == 2e-4 and recipe.training_args.max_steps == 7
    assert recipe.model_args.use_peft is True


def test_hf_ext_defaults(tmp_path):
    recipe = parse_recipe(write(tmp_path, BASE))
    model_args, training_args = recipe.model_args, recipe.training_args
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.1)
    assert model_args.lora_target_modules == "all-linear" and model_args.use_bnb_nested_quant
    assert training_args.completion_only_loss is True
    assert training_args.bf16 is False  # CPU: precision follows the hardware instead of TRL's bf16 default
    assert training_args.output_dir == "outputs/r"


def test_command_line_overrides_the_yaml(tmp_path):
    path = write(tmp_path, BASE + "max_steps: 7\n")
    recipe = parse_recipe(path, ["--max_steps", "3", "--learning_rate=1e-3", "--num_processes", "2"])
    assert recipe.training_args.max_steps == 3 and recipe.training_args.learning_rate == 1e-3
    assert recipe.num_processes == 2 and recipe.needs_launcher()


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path):
    path = write(tmp_path, BASE + "learning_rat: 0.1\n")
    with pytest.raises(UserInputError, match=rf"^{path}: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)$"):
        parse_recipe(path)
    with pytest.raises(UserInputError, match=r"^command line: unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        parse_recipe(write(tmp_path, BASE), ["--max_step", "3"])


def test_renamed_transformers_keys_are_rejected(tmp_path):
    with pytest.raises(UserInputError, match=r"unknown key 'torch_dtype' \(renamed: use dtype\)"):
        parse_recipe(write(tmp_path, BASE + "torch_dtype: bfloat16\n"))
    with pytest.raises(UserInputError, match=r"unknown key 'warmup_ratio' \(renamed: use warmup_steps"):
        parse_recipe(write(tmp_path, BASE + "warmup_ratio: 0.1\n"))


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, BASE + "max_steps: many\n")
    with pytest.raises(UserInputError, match=rf"^{path}: key 'max_steps': invalid int value: 'many'"):
        parse_recipe(path)
    with pytest.raises(UserInputError, match="key 'dtype': invalid choice"):
        parse_recipe(write(tmp_path, BASE + "dtype: float8\n"))


def test_missing_dataset_file(tmp_path):
    path = write(tmp_path, BASE.replace("task: addition\n", "") + "dataset_name: data/nope.jsonl\n")
    with pytest.raises(UserInputError, match="key 'dataset_name': file data/nope.jsonl does not exist"):
        parse_recipe(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_name_or_path: x\ntask: addition\n", "missing key 'stage'"),
        ("stage: sftt\nmodel_name_or_path: x\ntask: addition\n", r"unknown stage 'sftt' \(did you mean 'sft'\?\)"),
        (BASE.replace("task: addition\n", ""), "no training data"),
        (BASE.replace("addition", "additon"), r"unknown task 'additon' \(did you mean 'addition'\?\)"),
        (BASE + "num_processes: 0\n", "num_processes' must be a whole number >= 1"),
        (BASE + "env: [1, 2]\n", "key 'env' must map variable names"),
        (BASE + "assistant_only_loss: true\n", "assistant_only_loss"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("stage: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    with pytest.raises(UserInputError, match=message):
        parse_recipe(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserInputError, match="recipe file not found"):
        parse_recipe(tmp_path / "missing.yaml")


def test_resolved_recipe_reproduces_the_run(tmp_path):
    recipe = parse_recipe(REPO / "recipes" / "sft.yaml", ["--max_steps", "5", "--output_dir", str(tmp_path / "o")])
    RunFolder(tmp_path).write_recipe(recipe)
    text = (tmp_path / "recipe.yaml").read_text()
    assert text.startswith("# Resolved from") and yaml.safe_load(text)["max_steps"] == 5
    again = parse_recipe(tmp_path / "recipe.yaml")
    for name in ("script_args", "model_args"):
        assert getattr(again, name) == getattr(recipe, name)
    assert again.training_args.to_dict() == recipe.training_args.to_dict()


def test_split_overrides():
    assert split_overrides(["--a", "1", "--b=2", "--c", "x", "y", "--d-e", "3"]) == {
        "a": "1", "b": "2", "c": ["x", "y"], "d_e": "3"
    }
    with pytest.raises(UserInputError):
        split_overrides(["stray"])


def test_null_on_the_command_line_unsets_a_yaml_key_and_the_conflict_error_says_so(tmp_path):
    data = write(tmp_path, '{"prompt": "1 + 1 =", "completion": "2"}\n', "rows.jsonl")
    path = write(tmp_path, BASE)
    message = (rf"^{path}: set one of 'dataset_name', 'task' or 'corpus', not dataset_name and task \(on the command "
               r"line, --dataset_name null or --task null unsets one\)$")
    with pytest.raises(UserInputError, match=message):
        parse_recipe(path, ["--dataset_name", str(data)])
    recipe = parse_recipe(path, ["--dataset_name", str(data), "--task", "null"])
    assert recipe.script_args.task is None and recipe.script_args.dataset_name == str(data)
    RunFolder(tmp_path).write_recipe(recipe)
    written = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert written["task"] is None and written["dataset_name"] == str(data)


def test_integer_values_are_written_as_integers(tmp_path):
    recipe = parse_recipe(write(tmp_path, BASE + "warmup_steps: 10\nlearning_rate: 2.0e-4\n"))
    RunFolder(tmp_path).write_recipe(recipe)
    text = (tmp_path / "recipe.yaml").read_text()
    assert "\nwarmup_steps: 10\n" in text and "\nlearning_rate: 0.0002\n" in text
    assert parse_recipe(tmp_path / "recipe.yaml").training_args.warmup_steps == 10
