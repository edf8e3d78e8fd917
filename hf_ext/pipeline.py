"""`hf-ext pipeline FILE`: a chain of steps, each in its own folder, skipped when complete and resumed when interrupted.

A pipeline file has one of two forms:

- the stage-1 pipeline (top-level keys `generate_sft`, `sft`, `make_pairs`, `dpo`, `evaluate`): generate SFT data ->
  SFT -> preference pairs -> DPO -> sequential evaluation, on a verifiable `task` (`recipes/pipelines/stage1.yaml`),
  or open-ended, starting with `generate_instructions` (`recipes/pipelines/stage1_open_ended.yaml`);
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
import re
import subprocess
import sys
import time
from pathlib import Path

from hf_ext.errors import UserInputError

STEPS = ("generate_sft", "sft", "make_pairs", "dpo", "evaluate")
TOP_LEVEL = ("output_dir", "model_name_or_path", "base_model_id", "task", "data_format", "generate_instructions", *STEPS)
# Arguments of the step functions that the pipeline sets itself (models, task, files), never a step's keys.
PIPELINE_OWNED = ("model", "models", "reference", "prompts", "output", "settings", "task", "path", "instructions")


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
        parts.append({key: left.pop(key) for key in list(left) if key in names and key not in PIPELINE_OWNED})
    owned = [key for key in PIPELINE_OWNED if key in options]
    if left or owned:
        valid = sorted({name for target in targets for name in _parameter_names(target)} - set(PIPELINE_OWNED))
        raise UserInputError(
            f"{source}: step '{step}': key(s) {', '.join(dict.fromkeys([*left, *owned]))} not accepted here (the "
            f"pipeline sets the models, task and files); valid: {', '.join(valid)}"
        )
    return parts


def run_pipeline(path: str | Path) -> dict:
    """Run a pipeline file: a training chain (`steps:`), or the stage-1 pipeline on a verifiable `task`, or, with
    `generate_instructions:` instead of a task, the open-ended stage-1 pipeline (instructions written by the base
    model, responses and pairs kept by the critic and the judge, evaluation by win rate)."""
    from hf_ext.data.fewshot import GenerationSettings, generate_open_ended_sft_data, generate_task_sft_data
    from hf_ext.data.instructions import InstructionPrompts, InstructionSettings, generate_instruction_file
    from hf_ext.data.manifest import verify_manifest
    from hf_ext.data.pairs import check_pair_request, make_pairs
    from hf_ext.data.tasks import TrainingPrompts
    from hf_ext.eval.accuracy import evaluate_models
    from hf_ext.eval.win_rate import evaluate_open_ended
    from hf_ext.loading import release_memory
    from hf_ext.recipe import task_evaluation
    from hf_ext.run_folder import RunFolder, read_yaml_mapping, write_json_atomic

    config = read_yaml_mapping(path)
    if "steps" in config:
        return run_training_chain(path, config)
    unknown = [key for key in config if key not in TOP_LEVEL]
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_LEVEL)}")
    for key in ("output_dir", "model_name_or_path"):
        if not config.get(key):
            raise UserInputError(f"{path}: missing key '{key}'")
    open_ended = "generate_instructions" in config
    if open_ended == bool(config.get("task")):
        raise UserInputError(f"{path}: give either 'task' (a verifiable task) or 'generate_instructions' (open-ended "
                             "instructions written by the base model), not {}".format("both" if open_ended else "neither"))
    root = Path(config["output_dir"])
    base, task, data_format = config["model_name_or_path"], config.get("task"), config.get("data_format", "instruction")
    steps = {name: dict(config.get(name) or {}) for name in ("generate_instructions", *STEPS)}
    instructions = root / "generate_instructions" / "instructions.jsonl"
    sft_data, pairs = root / "generate_sft" / "sft.jsonl", root / "make_pairs" / "pairs.jsonl"
    sft_dir, dpo_dir, results = root / "sft", root / "dpo", root / "evaluate" / "results.json"

    def verified(data: Path, step: str, prompts=None) -> bool:
        """A finished data file: its manifest verifies; made from other prompts than the pipeline now asks, it is an
        error (skipping it could train on what evaluate scores)."""
        try:
            manifest = verify_manifest(data)
        except UserInputError:
            return False
        made_from = manifest["parameters"].get("prompts")
        if prompts is not None and made_from is not None and made_from != prompts.describe():
            raise UserInputError(f"{path}: step '{step}': {data} was made from prompts {made_from}, the pipeline now asks "
                                 f"for {prompts.describe()}; delete {data.parent} to re-run the step")
        return True

    # Every step's keys are checked before the first step runs.
    if open_ended:
        instruction_keys = _split_keys(str(path), "generate_instructions", steps["generate_instructions"],
                                       InstructionSettings, generate_instruction_file)
        generation_keys = _split_keys(str(path), "generate_sft", steps["generate_sft"], InstructionPrompts,
                                      GenerationSettings, generate_open_ended_sft_data)
        pair_keys = _split_keys(str(path), "make_pairs", steps["make_pairs"], InstructionPrompts, make_pairs)
        evaluation_keys = _split_keys(str(path), "evaluate", steps["evaluate"], evaluate_open_ended)
        InstructionSettings(**instruction_keys[0])  # a bad category or threshold fails now
        prompts_for = lambda keys: InstructionPrompts(str(instructions), **keys)  # noqa: E731
    else:
        generation_keys = _split_keys(str(path), "generate_sft", steps["generate_sft"], TrainingPrompts,
                                      GenerationSettings, generate_task_sft_data)
        pair_keys = _split_keys(str(path), "make_pairs", steps["make_pairs"], TrainingPrompts, make_pairs)
        evaluation_keys = _split_keys(str(path), "evaluate", steps["evaluate"], task_evaluation, evaluate_models)
        prompts_for = lambda keys: TrainingPrompts(task, **keys)  # noqa: E731
    GenerationSettings(**generation_keys[1])
    pair_prompts, pair_options = pair_keys
    sft_prompts = prompts_for(generation_keys[0])
    check_pair_request(pair_options.get("method", "best_of_n"), pair_options.get("k", 4), pair_options.get("min_pairs", 1),
                       prompts_for(pair_prompts).num_prompts, task)
    for step in ("sft", "dpo"):
        if "recipe" not in steps[step]:
            raise UserInputError(f"{path}: step '{step}': missing key 'recipe' (e.g. recipes/{step}.yaml)")

    def generate_instructions() -> None:
        settings, rest = instruction_keys
        generate_instruction_file(base, instructions, InstructionSettings(**settings), **rest)

    def generate_sft() -> None:
        prompt_keys, settings, rest = generation_keys
        generate = generate_open_ended_sft_data if open_ended else generate_task_sft_data
        generate(base, prompts_for(prompt_keys), sft_data, GenerationSettings(**settings), **rest)

    def make_preference_pairs() -> None:
        prompt_keys, rest = pair_keys
        defaults = {"data_format": data_format, **({"judge": base} if open_ended else {})}
        make_pairs(str(sft_dir), prompts_for(prompt_keys), pairs, **{**defaults, **rest})

    def training_step(step: str, folder: Path, model: str, data: Path) -> TrainingStep:
        options = dict(steps[step])
        recipe = options.pop("recipe")
        keys = {"model_name_or_path": model, "task": None, "dataset_name": str(data), "data_format": data_format,
                "output_dir": str(folder), "resume_from_checkpoint": True, **options}
        if config.get("base_model_id"):
            keys["base_model_id"] = config["base_model_id"]
        return TrainingStep(step, recipe, step_arguments(keys), folder)

    sft_step = training_step("sft", sft_dir, base, sft_data)
    dpo_step = training_step("dpo", dpo_dir, str(sft_dir), pairs)
    for step in (sft_step, dpo_step):
        check_training_step(path, step)

    def evaluate() -> None:
        if open_ended:
            (rest,) = evaluation_keys
            models = [(str(reference), task_evaluation(str(reference), data_format=data_format))
                      for reference in (base, sft_dir, dpo_dir)]
            summary = evaluate_open_ended(models, InstructionPrompts(str(instructions)).held_out(),
                                          **{"judge": base, **rest})
        else:
            settings, rest = evaluation_keys
            models = [(str(reference), task_evaluation(str(reference), **{"data_format": data_format, **settings}, task=task))
                      for reference in (base, sft_dir, dpo_dir)]
            summary = evaluate_models(models, **{"judge": base, **rest})
        write_json_atomic(results, summary)

    plan = [
        *([("generate_instructions", lambda: verified(instructions, "generate_instructions"), generate_instructions)]
          if open_ended else []),
        ("generate_sft", lambda: verified(sft_data, "generate_sft", sft_prompts), generate_sft),
        ("sft", lambda: RunFolder(sft_dir).is_finished(), lambda: train_step(path, sft_step)),
        ("make_pairs", lambda: verified(pairs, "make_pairs", prompts_for(pair_prompts)), make_preference_pairs),
        ("dpo", lambda: RunFolder(dpo_dir).is_finished(), lambda: train_step(path, dpo_step)),
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
    report["table"] = [summary_row(label, m) for label, m in zip(("base", "sft", "dpo"), summary["models"])]
    report["peak_rss_mb_of_evaluation"] = summary["peak_rss_mb"]
    write_json_atomic(root / "pipeline.json", report)
    print("\n" + summary_table(report["table"]))
    return report


def summary_row(label: str, result: dict) -> dict:
    """One model's line of the stage-1 table: exact match (a task), or the critic's mean score (open-ended), and the
    judge's win rate against the base model with the share of comparisons it decided."""
    judged = result.get("judge_vs_first") or {}
    row = {"model": label, "win_rate_vs_base": judged.get("win_rate"), "judge_decided": judged.get("orders_agree")}
    if "accuracy" in result:
        return {"model": label, "accuracy": result["accuracy"], **row}
    return {**row, "critic_mean_score": result["critic"]["mean_score"], "critic_decided": result["critic"]["orders_agree"]}


def summary_table(rows: list[dict]) -> str:
    number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    if "accuracy" in rows[0]:
        lines = ["| model | accuracy | win rate vs base (judge) |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['accuracy']:.3f} | {number(r['win_rate_vs_base'], '.3f')} |" for r in rows]
    else:
        lines = ["| model | win rate vs base (judge) | judge decided | critic mean P(yes) | critic decided |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {number(r['win_rate_vs_base'], '.3f')} | {number(r['judge_decided'], '.0%')} | "
                  f"{r['critic_mean_score']:.3f} | {r['critic_decided']:.0%} |" for r in rows]
    return "\n".join(lines)


CHAIN_TOP_LEVEL = ("output_dir", "steps")
# Keys of a chain step that the pipeline sets itself.
CHAIN_OWNED = ("output_dir", "resume_from_checkpoint")
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass
class TrainingStep:
    """One `hf-ext train` of a pipeline: its recipe, its `--key value` options and the folder it trains into."""

    name: str
    recipe: str
    arguments: list[str]
    folder: Path


def training_chain_steps(path: str | Path, config: dict) -> list[TrainingStep]:
    """The steps of a training chain, every recipe parsed with its keys (an unknown key or a bad value fails now, not
    an hour into the chain). A step without `model_name_or_path` trains from the previous step's folder; a value that
    is an earlier step's name means that step's folder; `null` builds the model from the recipe (from scratch)."""
    unknown = [key for key in config if key not in CHAIN_TOP_LEVEL]
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(CHAIN_TOP_LEVEL)}")
    if not config.get("output_dir"):
        raise UserInputError(f"{path}: missing key 'output_dir'")
    steps = config["steps"]
    if not isinstance(steps, dict) or not steps:
        raise UserInputError(f"{path}: 'steps' must be a mapping of step name -> {{recipe: ..., key: value}}")
    root = Path(config["output_dir"])
    names = [str(name) for name in steps]
    planned = []
    for index, (name, options) in enumerate(zip(names, steps.values())):
        if not STEP_NAME.fullmatch(name):
            raise UserInputError(f"{path}: step name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
        if options is not None and not isinstance(options, dict):
            raise UserInputError(f"{path}: step '{name}' must be a mapping of keys (recipe: ..., key: value)")
        options = dict(options or {})
        recipe = options.pop("recipe", None)
        if not recipe:
            raise UserInputError(f"{path}: step '{name}': missing key 'recipe' (e.g. recipes/sft.yaml)")
        owned = [key for key in CHAIN_OWNED if key in options]
        if owned:
            raise UserInputError(f"{path}: step '{name}': key(s) {', '.join(owned)} are set by the pipeline")
        if "model_name_or_path" not in options:
            if index > 0:
                options["model_name_or_path"] = str(root / names[index - 1])
        elif options["model_name_or_path"] in names:
            source = options["model_name_or_path"]
            if names.index(source) >= index:
                raise UserInputError(f"{path}: step '{name}': model_name_or_path names step '{source}', which does "
                                     "not run before it")
            options["model_name_or_path"] = str(root / source)
        folder = root / name
        arguments = step_arguments({**options, "output_dir": str(folder), "resume_from_checkpoint": True})
        planned.append(TrainingStep(name, recipe, arguments, folder))
        check_training_step(path, planned[-1])
    return planned


def run_training_chain(path: str | Path, config: dict) -> dict:
    """Run a training chain's steps in order: a finished step (`metrics.json`) is skipped, an interrupted one resumes
    from its last checkpoint. Writes `<output_dir>/pipeline.json` with each step's status, seconds and the headline
    numbers of its `metrics.json`."""
    from hf_ext.run_folder import RunFolder, write_json_atomic

    steps = training_chain_steps(path, config)
    finished = [RunFolder(step.folder).is_finished() for step in steps]
    for index, step in enumerate(steps):  # a finished step after one that will run was trained from an older model
        if finished[index] and not all(finished[:index]):
            earlier = steps[finished.index(False)].name
            raise UserInputError(f"{path}: step '{step.name}': {step.folder} is finished but step '{earlier}' before it "
                                 "is not, so it was trained from an older model; delete the folder to re-run it")
    root = Path(config["output_dir"])
    report: dict = {"pipeline": str(path), "steps": {}}
    for step, done in zip(steps, finished):
        if done:
            print(f"pipeline: {step.name}: complete, skipped")
            report["steps"][step.name] = {"status": "skipped (complete)"}
        else:
            print(f"pipeline: {step.name}: running")
            start = time.time()
            train_step(path, step)
            report["steps"][step.name] = {"status": "ran", "seconds": round(time.time() - start, 1)}
        report["steps"][step.name]["results"] = headline(RunFolder(step.folder).read_metrics())
    write_json_atomic(root / "pipeline.json", report)
    print(f"pipeline: done; every step's metrics in {root / 'pipeline.json'}")
    return report


def headline(metrics: dict) -> dict:
    """The numbers and names of a run's metrics, one level deep (`accuracy_after.accuracy`, `validation.perplexity`),
    without its lists (loss curves, samples, ranks)."""
    scalars = (int, float, str, bool, type(None))
    flat = {key: value for key, value in metrics.items() if isinstance(value, scalars)}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items() if isinstance(v, scalars)})
    return flat


def step_arguments(keys: dict) -> list[str]:
    """A pipeline step's keys as `hf-ext train` options, values as a recipe file would give them; null unsets."""
    from hf_ext.recipe import to_argv

    arguments: list[str] = []
    for key, value in keys.items():
        arguments += [f"--{key}", "null"] if value is None or value == [] else to_argv(key, value)
    return arguments


def check_training_step(source: str | Path, step: TrainingStep):
    """Parse the step's recipe with its options (the models of later steps need not exist yet) and, when its folder
    holds an earlier run, check that the run had the same settings: a finished step is skipped and an interrupted one
    resumes, so a changed key would otherwise be ignored. Returns the parsed recipe."""
    import yaml

    from hf_ext.recipe import parse_recipe
    from hf_ext.run_folder import RunFolder

    try:
        recipe = parse_recipe(step.recipe, step.arguments, check_paths=False)
    except UserInputError as error:
        raise UserInputError(f"{source}: step '{step.name}': {error}") from None
    folder = RunFolder(step.folder)
    if folder.has_recipe():
        saved = folder.read_recipe()
        now = yaml.safe_load(yaml.safe_dump(recipe.resolved(), sort_keys=False))
        # the keys the pipeline sets say how the step runs, not what it trains (a finished run copied into place
        # keeps its old output_dir; a run started by hand may not have resumed)
        changed = [key for key in dict.fromkeys([*now, *saved])
                   if key not in CHAIN_OWNED and saved.get(key) != now.get(key)]
        if changed:
            key = changed[0]
            raise UserInputError(
                f"{source}: step '{step.name}': {step.folder} was trained with {key}: {saved.get(key)!r}, the pipeline "
                f"now gives {now.get(key)!r}{f' (and {len(changed) - 1} more keys)' if len(changed) > 1 else ''}; "
                "delete the folder to re-run the step"
            )
    return recipe


def train_step(source: str | Path, step: TrainingStep) -> None:
    """`hf-ext train <recipe> <options>` in a child process, exactly as a user would run it (the recipe's `env`,
    `accelerate_config` and `num_processes` apply), with its output on this terminal; each step starts with a fresh
    process's memory."""
    command = [sys.executable, "-m", "hf_ext.cli", "train", step.recipe, *step.arguments]
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise UserInputError(f"{source}: step '{step.name}' failed (exit {returncode}; its output is above); re-run "
                             "the pipeline to resume it from its last checkpoint")
