"""`hf-ext pipeline FILE`: a chain of steps, each in its own folder, skipped when complete and resumed when interrupted.

A pipeline file has one of two forms:

- the stage-1 pipeline (top-level keys `generate_sft`, `sft`, `make_pairs`, `dpo`, `evaluate`): generate SFT data ->
  SFT -> preference pairs -> DPO -> sequential evaluation (`recipes/pipelines/stage1.yaml`);
- a training chain (top-level key `steps`: an ordered mapping of step name -> recipe and its keys), each step
  training from the previous step's model (`recipes/pipelines/blueprint.yaml`: pretrain -> SDFT -> TTT-Discover).

Each step writes into `<output_dir>/<step>/` and calls the library function behind the command a user would run
(`hf-ext data generate-sft` / `make-pairs`, `hf-ext train`, `hf-ext eval`), with the step's keys from the pipeline
file as that command's options. A step whose outputs are complete and valid (a data file whose QC manifest
verifies, a training folder with `metrics.json`, an evaluation with `results.json`) is skipped; an interrupted step
resumes (training from its last checkpoint, generation from its partial file).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path

from hf_ext.errors import UserInputError

STEPS = ("generate_sft", "sft", "make_pairs", "dpo", "evaluate")
TOP_LEVEL = ("output_dir", "model_name_or_path", "base_model_id", "task", "data_format", *STEPS)
# Arguments of the step functions that the pipeline sets itself (models, task, files), never a step's keys.
PIPELINE_OWNED = ("model", "models", "reference", "prompts", "output", "settings", "task")


def _parameter_names(target) -> list[str]:
    if dataclasses.is_dataclass(target):
        return [f.name for f in dataclasses.fields(target)]
    return list(inspect.signature(target).parameters)


def _split_keys(source: str, step: str, options: dict, *targets) -> list[dict]:
    """`options` divided among `targets` (dataclasses or functions) by their parameter names, in order; a key none of
    them takes, or one the pipeline sets itself, is an error naming the pipeline file and step."""
    parts, left = [], dict(options)
    for target in targets:
        names = _parameter_names(target)
        parts.append({key: left.pop(key) for key in list(left) if key in names})
    owned = [key for key in PIPELINE_OWNED if key in options]
    if left or owned:
        valid = sorted({name for target in targets for name in _parameter_names(target)} - set(PIPELINE_OWNED))
        raise UserInputError(
            f"{source}: step '{step}': key(s) {', '.join([*left, *owned])} not accepted here (the pipeline sets the "
            f"models, task and files); valid: {', '.join(valid)}"
        )
    return parts


def run_pipeline(path: str | Path) -> dict:
    from hf_ext.data.fewshot import GenerationSettings, generate_task_sft_data
    from hf_ext.data.manifest import verify_manifest
    from hf_ext.data.pairs import make_task_pairs
    from hf_ext.data.tasks import TrainingPrompts
    from hf_ext.eval.accuracy import evaluate_models
    from hf_ext.loading import release_memory
    from hf_ext.recipe import task_evaluation
    from hf_ext.run_folder import read_yaml_mapping
    from hf_ext.run_folder import RunFolder, write_json_atomic
    from hf_ext.train import run

    config = read_yaml_mapping(path)
    if "steps" in config:
        return run_training_chain(path, config)
    unknown = [key for key in config if key not in TOP_LEVEL]
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_LEVEL)}")
    for key in ("output_dir", "model_name_or_path", "task"):
        if not config.get(key):
            raise UserInputError(f"{path}: missing key '{key}'")
    root = Path(config["output_dir"])
    base, task, data_format = config["model_name_or_path"], config["task"], config.get("data_format", "instruction")
    steps = {name: dict(config.get(name) or {}) for name in STEPS}
    sft_data, pairs = root / "generate_sft" / "sft.jsonl", root / "make_pairs" / "pairs.jsonl"
    sft_dir, dpo_dir, results = root / "sft", root / "dpo", root / "evaluate" / "results.json"

    def verified(data: Path) -> bool:
        try:
            verify_manifest(data)
            return True
        except UserInputError:
            return False

    # Every step's keys are checked before the first step runs.
    generation_keys = _split_keys(
        str(path), "generate_sft", steps["generate_sft"], TrainingPrompts, GenerationSettings, generate_task_sft_data
    )
    pair_keys = _split_keys(str(path), "make_pairs", steps["make_pairs"], TrainingPrompts, make_task_pairs)
    evaluation_keys = _split_keys(str(path), "evaluate", steps["evaluate"], task_evaluation, evaluate_models)
    for step in ("sft", "dpo"):
        if "recipe" not in steps[step]:
            raise UserInputError(f"{path}: step '{step}': missing key 'recipe' (e.g. recipes/{step}.yaml)")

    def generate_sft() -> None:
        prompt_keys, settings, rest = generation_keys
        generate_task_sft_data(base, TrainingPrompts(task, **prompt_keys), sft_data, GenerationSettings(**settings), **rest)

    def make_pairs() -> None:
        prompt_keys, rest = pair_keys
        make_task_pairs(str(sft_dir), TrainingPrompts(task, **prompt_keys), pairs, **{"data_format": data_format, **rest})

    def train(step: str, folder: Path, model: str, data: Path) -> None:
        options = dict(steps[step])
        recipe = options.pop("recipe")
        keys = {"model_name_or_path": model, "task": "null", "dataset_name": str(data), "data_format": data_format,
                "output_dir": str(folder), "resume_from_checkpoint": "true", **options}
        if config.get("base_model_id"):
            keys["base_model_id"] = config["base_model_id"]
        run(recipe, [arg for key, value in keys.items() for arg in (f"--{key}", _as_option(value))])

    def evaluate() -> None:
        settings, rest = evaluation_keys
        models = [(str(reference), task_evaluation(str(reference), **{"data_format": data_format, **settings}, task=task))
                  for reference in (base, sft_dir, dpo_dir)]
        summary = evaluate_models(models, **{"judge": base, **rest})
        write_json_atomic(results, summary)

    plan = [
        ("generate_sft", lambda: verified(sft_data), generate_sft),
        ("sft", lambda: RunFolder(sft_dir).is_finished(), lambda: train("sft", sft_dir, base, sft_data)),
        ("make_pairs", lambda: verified(pairs), make_pairs),
        ("dpo", lambda: RunFolder(dpo_dir).is_finished(), lambda: train("dpo", dpo_dir, str(sft_dir), pairs)),
        ("evaluate", lambda: results.is_file(), evaluate),
    ]
    report = {"pipeline": str(path), "steps": {}}
    for name, complete, execute in plan:
        if complete():
            report["steps"][name] = {"status": "skipped (complete)"}
            print(f"pipeline: {name}: complete, skipped")
            continue
        print(f"pipeline: {name}: running")
        start = time.time()
        results.parent.mkdir(parents=True, exist_ok=True)
        execute()
        release_memory()
        report["steps"][name] = {"status": "ran", "seconds": round(time.time() - start, 1)}
    summary = json.loads(results.read_text())
    report["table"] = [
        {"model": label, "accuracy": m["accuracy"], "win_rate_vs_base": (m.get("judge_vs_first") or {}).get("win_rate")}
        for label, m in zip(("base", "sft", "dpo"), summary["models"])
    ]
    report["peak_rss_mb_of_evaluation"] = summary["peak_rss_mb"]
    write_json_atomic(root / "pipeline.json", report)
    print("\n| model | accuracy | win rate vs base (judge) |\n|---|---|---|")
    for row in report["table"]:
        win = "-" if row["win_rate_vs_base"] is None else f"{row['win_rate_vs_base']:.3f}"
        print(f"| {row['model']} | {row['accuracy']:.3f} | {win} |")
    return report


CHAIN_TOP_LEVEL = ("output_dir", "steps")
# Keys of a chain step that the pipeline sets itself.
CHAIN_OWNED = ("output_dir", "resume_from_checkpoint")


def training_chain_commands(path: str | Path, config: dict) -> list[tuple[str, str, list[str]]]:
    """`(step, recipe, --key value arguments)` of each step of a training chain, every recipe parsed with its keys
    (an unknown key or value fails now, not an hour into the chain). A step trains from the previous step's folder
    unless it names its own `model_name_or_path`; a value that is an earlier step's name means that step's folder."""
    from hf_ext.recipe import parse_recipe

    unknown = [key for key in config if key not in CHAIN_TOP_LEVEL]
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(CHAIN_TOP_LEVEL)}")
    if not config.get("output_dir"):
        raise UserInputError(f"{path}: missing key 'output_dir'")
    steps = config["steps"]
    if not isinstance(steps, dict) or not steps:
        raise UserInputError(f"{path}: 'steps' must be a mapping of step name -> {{recipe: ..., key: value}}")
    root = Path(config["output_dir"])
    commands = []
    for index, (name, options) in enumerate(steps.items()):
        if options is not None and not isinstance(options, dict):
            raise UserInputError(f"{path}: step '{name}' must be a mapping of keys (recipe: ..., key: value)")
        options = dict(options or {})
        recipe = options.pop("recipe", None)
        if not recipe:
            raise UserInputError(f"{path}: step '{name}': missing key 'recipe' (e.g. recipes/sft.yaml)")
        owned = [key for key in CHAIN_OWNED if key in options]
        if owned:
            raise UserInputError(f"{path}: step '{name}': key(s) {', '.join(owned)} are set by the pipeline")
        source = options.get("model_name_or_path")
        if source in steps and list(steps).index(source) < index:
            options["model_name_or_path"] = str(root / source)
        elif source is None and index > 0:
            options["model_name_or_path"] = str(root / list(steps)[index - 1])
        keys = {**options, "output_dir": str(root / name), "resume_from_checkpoint": "true"}
        arguments = [arg for key, value in keys.items() for arg in (f"--{key}", _as_option(value))]
        try:
            parse_recipe(recipe, arguments, check_paths=False)  # later steps' models do not exist yet
        except UserInputError as error:
            raise UserInputError(f"{path}: step '{name}': {error}") from None
        commands.append((name, recipe, arguments))
    return commands


def run_training_chain(path: str | Path, config: dict) -> dict:
    """Run a training chain's steps in order, each `hf-ext train <recipe> --key value ...` into
    `<output_dir>/<step>`: a step with `metrics.json` is skipped, an interrupted one resumes from its last checkpoint.
    Writes `<output_dir>/pipeline.json` with each step's status and final metrics."""
    from hf_ext.loading import release_memory
    from hf_ext.run_folder import RunFolder, write_json_atomic
    from hf_ext.train import run

    commands = training_chain_commands(path, config)
    root = Path(config["output_dir"])
    report: dict = {"pipeline": str(path), "steps": {}}
    for name, recipe, arguments in commands:
        folder = RunFolder(root / name)
        if folder.is_finished():
            print(f"pipeline: {name}: complete, skipped")
            report["steps"][name] = {"status": "skipped (complete)"}
        else:
            print(f"pipeline: {name}: running")
            start = time.time()
            run(recipe, arguments)
            release_memory()
            report["steps"][name] = {"status": "ran", "seconds": round(time.time() - start, 1)}
        report["steps"][name]["metrics"] = folder.read_metrics()
    write_json_atomic(root / "pipeline.json", report)
    print(f"pipeline: done; every step's metrics in {root / 'pipeline.json'}")
    return report


def _as_option(value) -> str:
    """A pipeline file's value as `hf-ext train` reads it on the command line."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
