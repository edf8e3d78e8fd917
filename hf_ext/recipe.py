"""Recipes: one YAML file per job, parsed into (script args, stage config, model config) like TRL's own CLI.

A recipe is a flat mapping of the fields of `ScriptArguments`, the stage's TRL config (e.g. `SFTConfig`) and TRL's
`ModelConfig`, plus the reserved keys `stage`, `accelerate_config`, `num_processes` and `env`. Command-line
`--key value` pairs override the YAML. Every value goes through the same argparse type conversion as on the command
line (so `learning_rate: 2e-4`, which YAML reads as a string, becomes a float), and every unknown key is an error
that names the file and the closest valid key. `--key null` on the command line unsets a key the YAML sets.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser
from trl import ScriptArguments as TrlScriptArguments

from hf_ext.errors import UserInputError
from hf_ext.loading import ModelArguments
from hf_ext.run_folder import RECIPE_FILE, read_yaml_mapping

RESERVED_KEYS = ("stage", "accelerate_config", "num_processes", "env")
DATA_FORMATS = ("auto", "prompt_completion", "messages", "instruction")
# Keys that recipes written for older transformers/TRL still use (see the spec's "recipes rot").
RENAMED_KEYS = {
    "torch_dtype": "dtype",
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "warmup_ratio": "warmup_steps (a value below 1 is a fraction of the run)",
    "use_auth_token": "hub_token",
    "overwrite_output_dir": "nothing: remove it (a new run overwrites; resume_from_checkpoint continues)",
    "dataset_mixer": "dataset_name",
}
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


@dataclass
class ScriptArguments(TrlScriptArguments):
    """Data and evaluation keys shared by every stage (on top of TRL's `dataset_name`, splits, ...)."""

    task: str | None = field(
        default=None,
        metadata={"help": "Verifiable task to train and evaluate on (see `hf_ext.data.tasks.TASKS`)."},
    )
    corpus: str | None = field(
        default=None,
        metadata={"help": "Built-in real corpus: python_docs (stage pretrain, hf_ext.data.corpus) or "
                          "antibody_germlines (stage mlm, hf_ext.data.protein)."},
    )
    corpus_validation_fraction: float = field(default=0.05, metadata={"help": "Held-out documents of the corpus."})
    task_train_size: int = field(default=2000, metadata={"help": "Generated training examples of `task`."})
    task_eval_size: int = field(default=200, metadata={"help": "Generated held-out examples of `task`."})
    task_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the task's train / held-out split (default: `seed`). Set it to vary `seed` across "
                          "runs that must be scored on the same held-out examples (and never train on them)."},
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "How rows become tokens: prompt_completion (plain text), messages (chat template), "
            "instruction (base-model 'Instruction:/Response:/END' text). auto picks from the columns.",
            "choices": list(DATA_FORMATS),
        },
    )
    allow_unverified_data: bool = field(
        default=False,
        metadata={"help": "Train on a local data file that has no valid QC manifest (see hf_ext.data.manifest)."},
    )
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id written as `base_model` in the model card when the model came from a file."},
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per batch in accuracy evaluation."})
    eval_max_new_tokens: int = field(default=16, metadata={"help": "Generation budget in accuracy evaluation."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Measure task accuracy of the untrained model too."}
    )


SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|CREDENTIALS?)(_|$)", re.IGNORECASE)


@dataclass
class Recipe:
    """A parsed recipe: the three argument dataclasses plus the reserved launch keys."""

    path: Path
    stage: str
    script_args: Any
    training_args: Any
    model_args: Any
    accelerate_config: str | None = None
    num_processes: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    explicit_keys: list[str] = field(default_factory=list)

    def needs_launcher(self) -> bool:
        return self.accelerate_config is not None or (self.num_processes or 1) > 1

    def resolved(self) -> dict[str, Any]:
        """Every key the recipe or the command line set, with its parsed value: a recipe that reproduces the run."""
        values: dict[str, Any] = {}
        for args in (self.script_args, self.model_args):
            values.update(dataclasses.asdict(args))
        values.update(self.training_args.to_dict())
        out: dict[str, Any] = {"stage": self.stage}
        for key in ("accelerate_config", "num_processes"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.env:  # secrets stay out of the saved (and pushed) recipe: a re-run reads them from the environment
            out["env"] = {k: v for k, v in self.env.items() if not SECRET_NAME.search(k)}
        for key in self.explicit_keys:
            if key.endswith("_token"):  # secrets (transformers writes "<HUB_TOKEN>"): a re-run reads the environment
                continue
            value = values[key]
            # transformers stores some counts as floats (`warmup_steps: 10` -> 10.0); write them back as integers
            out[key] = int(value) if isinstance(value, float) and value.is_integer() and abs(value) >= 1 else value
        return out

    def to_yaml(self, saved_as: str | Path) -> str:
        """`recipe.yaml` text: the resolved keys under a header naming the versions and the re-run command."""
        import importlib.metadata as md

        versions = ", ".join(f"{p} {md.version(p)}" for p in ("hf_ext", "transformers", "trl", "peft", "torch"))
        header = f"# Resolved from {self.path} ({versions}).\n# Re-run with: hf-ext train {saved_as}\n"
        return header + yaml.safe_dump(self.resolved(), sort_keys=False)


@dataclass
class SavedRecipe:
    """The settings of a finished run, read back from its `recipe.yaml`: the keys it wrote, else the defaults of its
    stage's dataclasses (what the run used). Nothing is re-validated: a recipe that set `bf16: true` on a GPU pod is
    read on a CPU laptop, and paths it names may have moved."""

    path: Path
    stage: str
    values: dict[str, Any]

    def setting(self, key: str) -> Any:
        if key in self.values:
            return self.values[key]
        from hf_ext.trainers import get_stage

        for args_class in (ScriptArguments, get_stage(self.stage).config_class, ModelArguments):
            for spec in dataclasses.fields(args_class):
                if spec.name == key:
                    if spec.default_factory is not dataclasses.MISSING:
                        return spec.default_factory()
                    return None if spec.default is dataclasses.MISSING else spec.default
        raise KeyError(key)


def saved_recipe(model_dir: str | Path) -> SavedRecipe | None:
    """The settings a trained model's folder was made with, or None for a folder hf_ext did not train."""
    from hf_ext.run_folder import RunFolder
    from hf_ext.trainers import STAGES

    folder = RunFolder(model_dir)
    if not folder.has_recipe():
        return None
    values = folder.read_recipe()
    if values.get("stage") not in STAGES:
        raise UserInputError(f"{folder.file(RECIPE_FILE)}: key 'stage' must be one of {', '.join(STAGES)}")
    return SavedRecipe(folder.file(RECIPE_FILE), values["stage"], values)


def split_overrides(args: list[str]) -> dict[str, str | list[str]]:
    """`["--lr", "1e-4", "--x=1", "--tags", "a", "b"]` -> `{"lr": "1e-4", "x": "1", "tags": ["a", "b"]}`."""
    overrides: dict[str, str | list[str]] = {}
    key = None
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            overrides[key] = value if eq else []
        elif key is None:
            raise UserInputError(f"command line: expected --key value overrides, got {arg!r}")
        elif isinstance(overrides[key], list):
            overrides[key].append(arg)
        else:
            raise UserInputError(f"command line: --{key} was given as --{key}=value and then also {arg!r}")
    return {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in overrides.items()}


def to_argv(key: str, value: Any) -> list[str]:
    """A recipe's `key: value` as the command-line options that set it."""
    if isinstance(value, bool):
        return [f"--{key}", str(value).lower()]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def _closest(key: str, valid: list[str]) -> str:
    if key in RENAMED_KEYS:
        return f" (renamed: use {RENAMED_KEYS[key]})"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _parser(dataclass_types: list[type], source: str):
    class RecipeParser(TrlParser):
        def error(self, message: str):  # argparse would print usage and exit; we want one line naming the file
            message = re.sub(r"argument --(\w+)(/--[\w-]+)*: ", r"key '\1': ", message)
            raise UserInputError(f"{source}: {message}")

    return RecipeParser(dataclass_types)


def describe_keys(stage_name: str) -> str:
    """Every key a recipe of `stage_name` accepts, with its type, default and help text (argparse's help)."""
    from hf_ext.trainers import get_stage

    stage = get_stage(stage_name)
    parser = _parser([ScriptArguments, stage.config_class, ModelArguments], f"stage {stage_name}")
    parser.usage = f"hf-ext train RECIPE.yaml [--key value ...]   (stage: {stage_name})"
    parser.description = (
        f"Recipe keys of stage {stage_name} ({type(stage).__doc__.strip().splitlines()[0].rstrip('.')}). Each is a "
        "YAML key, or --key value on the command line (which overrides the YAML; --key null unsets it). Reserved "
        f"keys: {', '.join(RESERVED_KEYS)}."
    )
    return parser.format_help()


def parse_recipe(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    """Parse `path` with `--key value` `overrides` into a validated `Recipe` (no model or data is loaded).
    `check_paths=False` reads a finished run's recipe.yaml, whose data files may have moved since."""
    from hf_ext.trainers import STAGES, get_stage

    path = Path(path)
    data = read_yaml_mapping(path)
    cli = split_overrides(list(overrides or []))
    source = str(path) if not cli else f"{path} (+ command line)"

    def reserved(key: str):
        """A reserved key's value: the command line wins over the YAML; both are consumed."""
        from_yaml = data.pop(key, None)
        return cli.pop(key, from_yaml)

    stage = reserved("stage")
    if stage is None:
        raise UserInputError(f"{path}: missing key 'stage' (one of: {', '.join(STAGES)})")
    if not isinstance(stage, str) or stage not in STAGES:
        raise UserInputError(f"{path}: key 'stage': unknown stage {stage!r}{_closest(str(stage), list(STAGES))}; valid: {', '.join(STAGES)}")

    env = reserved("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, (str, int, float, bool)) for v in env.values()):
        raise UserInputError(f"{path}: key 'env' must map variable names to strings, got {env!r}")
    env = {str(k): str(v) for k, v in env.items()}

    accelerate_config = reserved("accelerate_config")
    if accelerate_config is not None and not isinstance(accelerate_config, str):
        raise UserInputError(f"{path}: key 'accelerate_config' must be a name (ddp, zero2, zero3, fsdp) or a path")
    num_processes = reserved("num_processes")
    if num_processes is not None:
        try:
            num_processes = int(num_processes)
        except (ValueError, TypeError):
            num_processes = 0
        if num_processes < 1:
            raise UserInputError(f"{path}: key 'num_processes' must be a whole number >= 1")

    dataclass_types = [ScriptArguments, get_stage(stage).config_class, ModelArguments]
    parser = _parser(dataclass_types, source)
    valid = sorted({a.dest for a in parser._actions if a.dest != "help"} | set(RESERVED_KEYS))
    for key, where in [(k, str(path)) for k in data] + [(k, "command line") for k in cli]:
        if key not in valid:
            raise UserInputError(f"{where}: unknown key {key!r}{_closest(str(key), valid)}")

    if "output_dir" not in data and "output_dir" not in cli:
        data["output_dir"] = str(Path("outputs") / path.stem)
    argv: list[str] = []
    nulls = {}
    unset = [k for k, v in cli.items() if v == "null"]  # `--task null` unsets the YAML's value
    for key in unset:
        cli.pop(key)
        data.pop(key, None)
        nulls[key] = None
    for key, value in data.items():
        if value is None or value == []:
            nulls[key] = value
        else:
            argv += to_argv(key, value)
    for key, value in cli.items():
        argv += [f"--{key}", *(value if isinstance(value, list) else [value])]
    parser.set_defaults(**nulls)
    try:
        script_args, training_args, model_args = parser.parse_args_into_dataclasses(argv)
    except UserInputError:
        raise
    except (ValueError, TypeError) as error:
        raise UserInputError(f"{source}: {' '.join(str(error).split())}") from None

    recipe = Recipe(
        path=path,
        stage=stage,
        script_args=script_args,
        training_args=training_args,
        model_args=model_args,
        accelerate_config=accelerate_config,
        num_processes=num_processes,
        env=env,
        explicit_keys=list(dict.fromkeys([*data, *cli, *unset])),
    )
    if check_paths:
        validate_paths(recipe)
    return recipe


def validate_paths(recipe: Recipe) -> None:
    """Files the recipe names must exist before anything loads."""
    from hf_ext.loading import HUB_ID_PATTERN

    dataset = recipe.script_args.dataset_name
    looks_local = dataset and (
        dataset.endswith(LOCAL_DATA_SUFFIXES)
        or dataset.startswith((".", "/", "~"))
        or (os.sep in dataset and not HUB_ID_PATTERN.match(dataset))
    )
    if looks_local:
        if not Path(dataset).exists():
            raise UserInputError(f"{recipe.path}: key 'dataset_name': file {dataset} does not exist")
    from hf_ext.trainers import STAGES, get_stage

    stage = get_stage(recipe.stage)
    sources = [key for key in ("dataset_name", "task", "corpus") if getattr(recipe.script_args, key)]
    if stage.built_in_data:
        if sources:
            unset = " ".join(f"--{key} null" for key in sources)
            raise UserInputError(
                f"{recipe.path}: stage {recipe.stage} reads its own data keys; remove {', '.join(sources)} (on the "
                f"command line: {unset})"
            )
        return
    if len(sources) > 1:
        unset = " or ".join(f"--{key} null" for key in sources)
        raise UserInputError(
            f"{recipe.path}: set one of 'dataset_name', 'task' or 'corpus', not {' and '.join(sources)} (on the "
            f"command line, {unset} unsets one)"
        )
    if not sources:
        raise UserInputError(f"{recipe.path}: no training data: set 'task' (a verifiable task) or 'dataset_name'")
    if recipe.script_args.corpus and not stage.takes_corpus:
        corpus_stages = " and ".join(name for name in STAGES if get_stage(name).takes_corpus)
        raise UserInputError(f"{recipe.path}: key 'corpus' is raw data for the {corpus_stages} stages; stage {recipe.stage} takes 'task' or 'dataset_name'")
    if recipe.script_args.task:
        from hf_ext.data.tasks import TASKS

        if recipe.script_args.task not in TASKS:
            raise UserInputError(
                f"{recipe.path}: key 'task': unknown task {recipe.script_args.task!r}"
                f"{_closest(recipe.script_args.task, list(TASKS))}; valid: {', '.join(TASKS)}"
            )
    if getattr(recipe.script_args, "datasets", None):
        raise UserInputError(f"{recipe.path}: key 'datasets' (TRL dataset mixtures) is not supported; use 'dataset_name'")
    if recipe.model_args.model_name_or_path is None and not getattr(recipe.training_args, "model_type", None):
        raise UserInputError(f"{recipe.path}: missing key 'model_name_or_path'")


def task_evaluation(
    reference: str,
    task: str | None = None,
    seed: int | None = None,
    data_format: str | None = None,
    load_in_4bit: bool | None = None,
    num_examples: int | None = None,
):
    """How `hf-ext eval` scores `reference`: every unset value from the model's saved recipe (the split it trained
    beside, its prompt encoding and quantization), else the recipe defaults."""
    from transformers import TrainingArguments

    from hf_ext.eval.accuracy import TaskEvaluation

    saved = saved_recipe(reference) if Path(reference).is_dir() else None

    def setting(key: str, given, default):
        if given is not None:
            return given
        return saved.setting(key) if saved is not None else default

    defaults = ScriptArguments()
    split_seed = setting("task_seed", seed, None)
    if split_seed is None:
        split_seed = setting("seed", None, TrainingArguments.seed)
    return TaskEvaluation(
        task=setting("task", task, None),
        train_size=setting("task_train_size", None, defaults.task_train_size),
        eval_size=setting("task_eval_size", None, defaults.task_eval_size),
        seed=split_seed,
        data_format=setting("data_format", data_format, defaults.data_format),
        load_in_4bit=setting("load_in_4bit", load_in_4bit, ModelArguments.load_in_4bit),
        dtype=setting("dtype", None, ModelArguments.dtype),
        num_examples=num_examples,
    )
