"""The `hf-ext` command.

    hf-ext train RECIPE.yaml [--key value ...] [-- ACCELERATE FLAGS ...]
    hf-ext eval --model PATH[,PATH...] [--task NAME] [--judge PATH] [--num_examples N] ...
    hf-ext eval --task antibody_design --model PATH [--baseline FILE | --write_baseline FILE] ...
    hf-ext eval --task arc --model PATH [--subset NAME | --tasks_file FILE] [--num_votes N] [--ttt_steps N] ...
    hf-ext data generate-sft|make-pairs|manifest|train-tokenizer ...
    hf-ext pipeline recipes/pipelines/stage1.yaml

`hf-ext train --help` lists the stages; `hf-ext train RECIPE.yaml --help` lists every key the recipe's stage accepts.

`hf-ext train` runs the recipe in this process, or, when the recipe sets `num_processes` > 1 or `accelerate_config`
or accelerate flags follow `--`, relaunches exactly `accelerate launch [flags] -m hf_ext.train RECIPE [overrides]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

from hf_ext.errors import UserInputError

ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "fsdp")


def string_to_bool(value: str | bool) -> bool:
    """Boolean options take values as in `hf-ext train` (`--flag`, `--flag true`, `--flag false`)."""
    if isinstance(value, bool) or value.lower() in ("true", "yes", "1"):
        return value if isinstance(value, bool) else True
    if value.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def accelerate_config_path(name_or_path: str) -> str:
    """A shipped launcher config by name (`ddp`, `zero2`, `zero3`, `fsdp`) or a path to one."""
    from hf_ext.resources import shipped_path

    if name_or_path in ACCELERATE_CONFIGS:
        return str(shipped_path("recipes", "accelerate", f"{name_or_path}.yaml"))
    if not Path(name_or_path).is_file():
        raise UserInputError(
            f"accelerate_config: {name_or_path} is neither a shipped config ({', '.join(ACCELERATE_CONFIGS)}) nor a file"
        )
    return name_or_path


def launch_arguments(recipe, recipe_path: str, overrides: list[str], launcher_flags: list[str]) -> list[str]:
    """The `accelerate launch` arguments that run this recipe on every process."""
    flags: list[str] = []
    if recipe.accelerate_config and "--config_file" not in launcher_flags:
        flags += ["--config_file", accelerate_config_path(recipe.accelerate_config)]
    if recipe.num_processes and "--num_processes" not in launcher_flags:
        flags += ["--num_processes", str(recipe.num_processes)]
        if recipe.num_processes > 1 and not recipe.accelerate_config and "--multi_gpu" not in launcher_flags:
            # Several processes without a config: torchrun-style DDP; each rank picks NCCL on GPUs, gloo on CPUs.
            flags += ["--multi_gpu"]
    return [*flags, *launcher_flags, "-m", "hf_ext.train", recipe_path, *overrides]


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCH" in os.environ


TRAIN_USAGE = "usage: hf-ext train RECIPE.yaml [--key value ...] [-- accelerate flags]"


def train_help(recipe_path: str | None) -> str:
    """`hf-ext train --help` (the stages) or `hf-ext train RECIPE --help` (the keys of the recipe's stage)."""
    from hf_ext.recipe import describe_keys, read_yaml_mapping
    from hf_ext.trainers import STAGES, get_stage

    if recipe_path is None:
        lines = [TRAIN_USAGE, "", "Runs one recipe (a YAML file whose key `stage` names the trainer). Stages:"]
        for name in STAGES:
            lines.append(f"  {name:<10} {type(get_stage(name)).__doc__.strip().splitlines()[0]}")
        lines += ["", "hf-ext train RECIPE.yaml --help lists every key of the recipe's stage (type, default, help)."]
        return "\n".join(lines)
    stage = read_yaml_mapping(recipe_path).get("stage")
    if stage not in STAGES:
        raise UserInputError(f"{recipe_path}: key 'stage' must be one of {', '.join(STAGES)}, got {stage!r}")
    return describe_keys(stage)


def train_command(args: list[str]) -> None:
    from hf_ext.train import apply_env, run

    launcher_flags: list[str] = []
    if "--" in args:
        split = args.index("--")
        args, launcher_flags = args[:split], args[split + 1 :]
    if "-h" in args or "--help" in args:
        print(train_help(args[0] if args and not args[0].startswith("-") else None))
        return
    if not args or args[0].startswith("-"):
        raise UserInputError(TRAIN_USAGE)
    recipe_path, overrides = args[0], args[1:]
    apply_env(recipe_path)

    from hf_ext.recipe import parse_recipe

    recipe = parse_recipe(recipe_path, overrides)  # fail on a bad recipe before any process starts
    if _under_launcher() or not (recipe.needs_launcher() or launcher_flags):
        run(recipe_path, overrides)
        return
    from accelerate.commands.launch import launch_command, launch_command_parser

    arguments = launch_arguments(recipe, recipe_path, overrides, launcher_flags)
    print("hf-ext: accelerate launch " + shlex.join(arguments), file=sys.stderr)
    launch_command(launch_command_parser().parse_args(arguments))


def eval_command(args: list[str]) -> None:
    if _option_value(args, "--task") == "antibody_design":
        return antibody_design_command(args)
    if _option_value(args, "--task") == "arc":
        return arc_command(args)
    parser = argparse.ArgumentParser(
        prog="hf-ext eval",
        description="Exact-match accuracy of one or more models on a verifiable task, one model in memory at a time. "
        "Defaults come from the recipe.yaml saved next to a trained model.",
    )
    parser.add_argument("--model", "--models", dest="model", required=True,
                        help="model reference(s), comma-separated, evaluated in order: folder, adapter, .gguf, Hub id, package://")
    parser.add_argument("--task", help="verifiable task (default: the model's recipe.yaml)")
    parser.add_argument("--data_format", help="prompt encoding: messages, instruction or prompt_completion")
    parser.add_argument("--num_examples", type=int, help="held-out examples to score (default: the task_eval_size)")
    parser.add_argument("--seed", type=int, help="split seed (default: the recipe's seed, else 42)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--load_in_4bit", type=string_to_bool, nargs="?", const=True, default=None)
    parser.add_argument("--judge", help="judge model for win rates of every model against the first one")
    parser.add_argument("--output", help="write the results as JSON to this file")
    options = parser.parse_args(args)

    import resource

    from hf_ext.data.formats import detect_format
    from hf_ext.data.tasks import TASKS
    from hf_ext.eval.accuracy import evaluate_task
    from hf_ext.loading import load_model, load_tokenizer, release_memory
    from hf_ext.recipe import ModelArguments, ScriptArguments, read_yaml_mapping

    def peak_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results = []
    for reference in [m.strip() for m in options.model.split(",") if m.strip()]:
        saved = Path(reference, "recipe.yaml")
        recipe = read_yaml_mapping(saved) if saved.is_file() else {}
        sizes = [recipe.get(key, getattr(ScriptArguments, key)) for key in ("task_train_size", "task_eval_size")]
        task_name = options.task or recipe.get("task")
        if task_name not in TASKS:
            raise UserInputError(f"eval: task {task_name!r} is not one of {', '.join(TASKS)} (pass --task)")
        seed = options.seed if options.seed is not None else recipe.get("seed", 42)
        split = TASKS[task_name].splits(*sizes, seed)["test"]
        if options.num_examples:
            split = split.select(range(min(options.num_examples, len(split))))
        data_format = detect_format(split.column_names, options.data_format or recipe.get("data_format", "auto"), f"task {task_name}")
        load_in_4bit = options.load_in_4bit if options.load_in_4bit is not None else recipe.get("load_in_4bit", False)
        model_args = ModelArguments(model_name_or_path=reference, load_in_4bit=load_in_4bit, dtype=recipe.get("dtype", "float32"))
        tokenizer = load_tokenizer(reference)
        model = load_model(model_args)
        result = evaluate_task(model, tokenizer, TASKS[task_name], split, data_format, options.batch_size, options.max_new_tokens, desc=reference)
        del model  # one model in memory at a time
        release_memory()
        results.append({"model": reference, **result, "peak_rss_mb_so_far": peak_rss_mb()})
        print(f"{reference}: {task_name} accuracy {result['accuracy']:.3f} on {result['num_examples']} examples ({data_format.name})")

    if options.judge and len(results) > 1:
        from hf_ext.eval.judge import LogprobJudge

        judge = LogprobJudge(load_model(ModelArguments(model_name_or_path=options.judge)), load_tokenizer(options.judge))
        base = results[0]
        for result in results[1:]:
            triples = [(p, r, b) for p, r, b in zip(base["prompts"], result["responses"], base["responses"])]
            outcomes = Counter(v.outcome for v in judge.compare(triples, desc=f"Judging {result['model']} vs {base['model']}"))
            result["judge_vs_first"] = {
                "judge": options.judge, "against": base["model"], **{k: outcomes.get(k, 0) for k in ("win", "loss", "tie")},
                "win_rate": (outcomes.get("win", 0) + 0.5 * outcomes.get("tie", 0)) / len(triples),
            }
        del judge
        release_memory()

    summary = {"models": results, "peak_rss_mb": peak_rss_mb()}
    print("\n| model | accuracy | win rate vs first (judge) |\n|---|---|---|")
    for result in results:
        judged = result.get("judge_vs_first")
        print(f"| {result['model']} | {result['accuracy']:.3f} | {judged['win_rate']:.3f} |" if judged else f"| {result['model']} | {result['accuracy']:.3f} | - |")
    print(f"peak RSS {summary['peak_rss_mb']:.0f} MB")
    if options.output:
        Path(options.output).write_text(json.dumps(summary, indent=2))


def _option_value(args: list[str], option: str) -> str | None:
    """The value of ``option`` in ``args`` (``--task x`` or ``--task=x``), before any parsing."""
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def antibody_design_command(args: list[str]) -> None:
    """Sample edits of held-out antibodies with a masked LM, print their metrics, compare with a baseline.

    Exits with status 1 (after writing --output) when a metric regressed beyond the tolerance."""
    parser = argparse.ArgumentParser(
        prog="hf-ext eval --task antibody_design",
        description="MLM-sampled edits of held-out antibody sequences: validity, diversity, liabilities, score delta.",
    )
    parser.add_argument("--task", choices=["antibody_design"], required=True)
    parser.add_argument("--model", required=True, help="masked-LM folder with its protein tokenizer (AutoModelForMaskedLM)")
    parser.add_argument("--num_parents", type=int, default=16, help="held-out validation sequences to edit")
    parser.add_argument("--num_variants", type=int, default=8, help="variants per parent")
    parser.add_argument("--num_edits", type=int, default=3, help="positions masked and resampled per variant")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: most likely residue)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parent choice, edit positions and sampling")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--scorer", default="pll",
                        help="pll (pseudo-log-likelihood per residue under the model) or module:function")
    parser.add_argument("--max_positions", type=int, default=None,
                        help="pll: score this many evenly spaced positions per sequence instead of all")
    parser.add_argument("--validation_fraction", type=float,
                        help="antibody corpus split used in training (default: the model's recipe.yaml, else 0.1)")
    parser.add_argument("--split_seed", type=int,
                        help="antibody corpus split seed used in training (default: the recipe's seed, else 42)")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", help="baseline JSON to check the metrics against (exit 1 on a regression)")
    baseline.add_argument("--write_baseline", help="write this run's metrics as a baseline JSON")
    parser.add_argument("--tolerance", default="0.02",
                        help="absolute tolerance: one number, or metric=number,... (unnamed metrics: 0)")
    parser.add_argument("--output", help="write settings, metrics and every variant as JSON to this file")
    options = parser.parse_args(args)

    from hf_ext.eval.antibody_design import (
        METRIC_DIRECTIONS,
        check_regression,
        evaluate_antibody_design,
        parse_tolerance,
        read_baseline,
        write_baseline,
    )

    tolerance = parse_tolerance(options.tolerance)
    stored = read_baseline(options.baseline) if options.baseline else None  # a bad baseline fails before the model runs
    result = evaluate_antibody_design(
        options.model, num_parents=options.num_parents, num_variants=options.num_variants,
        num_edits=options.num_edits, temperature=options.temperature, seed=options.seed,
        batch_size=options.batch_size, scorer=options.scorer, max_positions=options.max_positions,
        validation_fraction=options.validation_fraction, split_seed=options.split_seed,
    )
    metrics = result["metrics"]
    print(f"\n{options.model}: antibody_design, {metrics['num_parents']} held-out parents x {options.num_variants} "
          f"variants = {metrics['num_variants']}, {options.num_edits} edits, temperature {options.temperature}, "
          f"scorer {options.scorer}")
    print("| metric | value | baseline |\n|---|---|---|")
    for name in ("valid_fraction", "unique_fraction", "mean_edits", *list(METRIC_DIRECTIONS)[2:]):
        value = metrics.get(name)
        reference = stored["metrics"].get(name, {}).get("value") if stored else None
        print(f"| {name} | {'-' if value is None else f'{value:.4f}'} | {'-' if reference is None else f'{reference:.4f}'} |")
    introduced = {name: count for name, count in metrics["introduced_liabilities"].items() if count}
    print(f"variants introducing a liability: {json.dumps(introduced) if introduced else 'none'}")

    if options.write_baseline:
        write_baseline(metrics, options.write_baseline, settings=result["settings"])
        print(f"baseline written to {options.write_baseline}")
    regressions = []
    if stored is not None:
        different = [
            f"{key} {value!r} (this run {result['settings'].get(key)!r})"
            for key, value in stored.get("settings", {}).items()
            if result["settings"].get(key) != value
        ]
        if different:
            print(f"hf-ext: warning: the baseline was made with other settings: {', '.join(different)}", file=sys.stderr)
        regressions = check_regression(metrics, options.baseline, tolerance)
        result["regressions"] = regressions
    if options.output:
        Path(options.output).write_text(json.dumps(result, indent=2) + "\n")
    if regressions:
        lines = "\n".join(f"  - {regression}" for regression in regressions)
        print(f"\nhf-ext: REGRESSION: {len(regressions)} metric(s) worse than baseline {options.baseline}:\n{lines}",
              file=sys.stderr)
        sys.exit(1)
    if stored is not None:
        print(f"no regression against baseline {options.baseline} (tolerance {options.tolerance})")


def arc_command(args: list[str]) -> None:
    """Score an ARC model on a named subset (or a task file): voted pass@2, cell and shape accuracy, protocol."""
    parser = argparse.ArgumentParser(
        prog="hf-ext eval --task arc",
        description="Voted pass@2 of an arc_grid model on a named ARC subset, with cell accuracy next to the copy "
        "baseline. Defaults come from the recipe.yaml saved next to the model.",
    )
    parser.add_argument("--task", choices=["arc"], required=True)
    parser.add_argument("--model", required=True, help="arc_grid folder or Hub id (AutoModelForSemanticSegmentation)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--subset", help="named subset, e.g. arc1_eval_equal_shape_max10 (default: the recipe's eval_subset)")
    source.add_argument("--tasks_file", help="a JSON file of ARC tasks ({task_id: task}, or one task) with test outputs")
    parser.add_argument("--num_votes", type=int, help="augmented views voted per test input (default: the recipe's, else 8)")
    parser.add_argument("--ttt_steps", type=int, help="per-task test-time fine-tuning steps on the demo pairs (default: the recipe's, else 0)")
    parser.add_argument("--ttt_learning_rate", type=float, help="(default: the recipe's, else 1e-4)")
    parser.add_argument("--seed", type=int, help="seed of the extra colour permutations and TTT (default: the recipe's, else 0)")
    parser.add_argument("--output", help="write the metrics and settings as JSON to this file")
    parser.add_argument("--attempts", help="write the attempts in ARC Prize submission format to this file")
    options = parser.parse_args(args)

    from transformers import AutoModelForSemanticSegmentation

    import hf_ext  # noqa: F401  (registers arc_grid)
    from hf_ext.data.arc import load_subset, read_task_file
    from hf_ext.eval.arc import check_no_leak, evaluate_arc, summary_line, training_record, write_attempts
    from hf_ext.recipe import read_yaml_mapping

    recipe_path = Path(options.model) / "recipe.yaml"
    recipe = read_yaml_mapping(recipe_path) if recipe_path.is_file() else {}
    if options.tasks_file:
        tasks, subset = read_task_file(options.tasks_file), Path(options.tasks_file).name
    else:
        subset = options.subset or recipe.get("eval_subset") or "arc1_eval_equal_shape_max10"
        tasks = load_subset(subset)
    record = training_record(options.model if Path(options.model).is_dir() else None)
    check_no_leak(record, options.model, tasks)
    model = AutoModelForSemanticSegmentation.from_pretrained(options.model)
    if model.config.model_type != "arc_grid":
        raise UserInputError(f"{options.model}: model_type {model.config.model_type}, expected arc_grid")

    def setting(name: str, default):
        """The command line's value, else the model's recipe's, else `default`."""
        value = getattr(options, name, None)
        return type(default)(recipe.get(name, default)) if value is None else value

    metrics, attempts = evaluate_arc(
        model, tasks, subset, trained_tasks=record.get("tasks_trained_on"),
        num_votes=options.num_votes or int(recipe.get("num_votes", 8)), ttt_steps=setting("ttt_steps", 0),
        ttt_learning_rate=setting("ttt_learning_rate", 1e-4), canvas_margin=setting("canvas_margin", 1),
        max_context_pairs=setting("max_context_pairs", 10), seed=setting("seed", 0),
    )
    print(f"{options.model} ({model.config.variant}): {summary_line(metrics)}")
    if options.output:
        Path(options.output).write_text(json.dumps({"model": options.model, "variant": model.config.variant, **metrics}, indent=2) + "\n")
    if options.attempts:
        write_attempts(options.attempts, attempts)


def data_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf-ext data", description="Make and vet training data (each file gets a QC manifest).")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate-sft", help="SFT rows from a base model by few-shot completion")
    pairs = commands.add_parser("make-pairs", help="preference pairs: hard_negatives, best_of_n or judge")
    for sub in (generate, pairs):
        sub.add_argument("--model", required=True, help="the model that writes the responses")
        sub.add_argument("--task", required=True, help="verifiable task whose training prompts are used")
        sub.add_argument("--num_prompts", type=int, default=200)
        sub.add_argument("--output", required=True, help="the .jsonl file to write (plus .manifest.json)")
        sub.add_argument("--seed", type=int, default=0, help="sampling seed")
        sub.add_argument("--split_seed", type=int, default=42,
                         help="task split seed: prompts come from the train split, never the held-out one (recipes' seed)")
        sub.add_argument("--offset", type=int, default=0,
                         help="skip this many train-split prompts (e.g. those another data step already used)")
        sub.add_argument("--eval_size", type=int, default=200,
                         help="size of the held-out split kept out of the data (recipes' task_eval_size)")
        sub.add_argument("--batch_size", type=int, default=16)
        sub.add_argument("--max_new_tokens", type=int, default=32)
        sub.add_argument("--temperature", type=float, default=None)
        sub.add_argument("--load_in_4bit", type=string_to_bool, nargs="?", const=True, default=False)
    generate.add_argument("--shots", type=int, default=3)
    generate.add_argument("--min_response_chars", type=int, default=1)
    generate.add_argument("--keep_unverified", type=string_to_bool, nargs="?", const=True, default=False,
                          help="keep responses the task verifier rejects")
    pairs.add_argument("--method", choices=["hard_negatives", "best_of_n", "judge"], default="best_of_n")
    pairs.add_argument("--k", type=int, default=4, help="samples per prompt for best_of_n")
    pairs.add_argument("--judge", help="judge model (method judge, or best_of_n without a verifier)")
    pairs.add_argument("--data_format", choices=["prompt_completion", "messages", "instruction"], default="messages")
    vet = commands.add_parser("manifest", help="validate a data file of your own and write its QC manifest")
    vet.add_argument("path")
    tokenizer_parser = commands.add_parser(
        "train-tokenizer", help="train a SentencePiece tokenizer on a corpus' training split (a fast tokenizer folder)"
    )
    tokenizer_parser.add_argument("--corpus", default="python_docs", help="built-in real text corpus")
    tokenizer_parser.add_argument("--vocab_size", type=int, default=8192)
    tokenizer_parser.add_argument("--model_type", choices=["bpe", "unigram"], default="bpe")
    tokenizer_parser.add_argument("--output", required=True, help="folder to write (loads with AutoTokenizer)")
    options = parser.parse_args(args)

    if options.command == "manifest":
        return vet_file(options.path)
    if options.command == "train-tokenizer":
        from hf_ext.data.tokenizer import train_corpus_tokenizer

        tokenizer = train_corpus_tokenizer(options.output, options.vocab_size, options.corpus, options.model_type)
        print(f"{options.output}: {len(tokenizer)} tokens, trained on the {options.corpus} training documents")
        return

    from hf_ext.data.tasks import TASKS
    from hf_ext.loading import load_model, load_tokenizer
    from hf_ext.recipe import ModelArguments

    if options.task not in TASKS:
        raise UserInputError(f"data: unknown task {options.task!r}; valid: {', '.join(TASKS)}")
    task = TASKS[options.task]
    rows = task.splits(options.offset + options.num_prompts, options.eval_size, seed=options.split_seed)["train"]
    rows = rows.select(range(options.offset, len(rows)))
    if options.command == "make-pairs" and options.method == "hard_negatives":
        from hf_ext.data.pairs import task_pairs

        dataset, stats = task_pairs(task, rows, options.seed), {"method": "hard_negatives"}
        stats.update(pairs=len(dataset), negative_kinds=dict(Counter(dataset["negative_kind"])))
        return _write_pairs(dataset, options.output, stats, source_model=None)

    def load(reference):
        return load_model(ModelArguments(model_name_or_path=reference, load_in_4bit=options.load_in_4bit)), load_tokenizer(reference)

    model, tokenizer = load(options.model)
    if options.command == "generate-sft":
        from hf_ext.data.fewshot import GenerationSettings, generate_sft_data

        settings = GenerationSettings(
            shots=options.shots, max_new_tokens=options.max_new_tokens, temperature=options.temperature or 0.0,
            min_response_chars=options.min_response_chars, keep_unverified=options.keep_unverified,
            batch_size=options.batch_size, seed=options.seed,
        )
        manifest = generate_sft_data(model, tokenizer, list(rows["prompt"]), options.output, settings,
                                     answers=list(rows["answer"]), verify=task.verify, source_model=options.model)
        print(f"{options.output}: {manifest['rows']} rows; QC {json.dumps(manifest['qc'])}")
        return

    from hf_ext.data.formats import FORMATS
    from hf_ext.data.pairs import sampled_pairs
    from hf_ext.eval.judge import LogprobJudge

    judge = None
    if options.judge or options.method == "judge":
        judge_model, judge_tokenizer = (model, tokenizer) if options.judge in (None, options.model) else load(options.judge)
        judge = LogprobJudge(judge_model, judge_tokenizer, batch_size=options.batch_size)
    dataset, stats = sampled_pairs(
        model, tokenizer, list(rows["prompt"]), FORMATS[options.data_format], options.method, k=options.k, task=task,
        answers=list(rows["answer"]), judge=judge,
        temperature=options.temperature if options.temperature is not None else 0.8,
        max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, seed=options.seed,
    )
    _write_pairs(dataset, options.output, {**stats, "data_format": options.data_format}, source_model=options.model)


def _write_pairs(dataset, output: str, stats: dict, source_model: str | None) -> None:
    from hf_ext.data.manifest import write_data_file

    if len(dataset) == 0:
        raise UserInputError(
            f"make-pairs: no prompt yielded a pair (every sample scored the same, or the judge's orders disagreed); "
            f"raise --num_prompts, --k or --temperature. Stats: {json.dumps(stats)}"
        )
    manifest = write_data_file(output, list(dataset), generator="hf_ext.data.pairs", qc=stats, source_model=source_model)
    print(f"{output}: {manifest['rows']} pairs; QC {json.dumps(stats)}")


def vet_file(path: str) -> None:
    """Validate every row of a user's .jsonl file (SFT rows or pairs) and write its manifest."""
    from datasets import load_dataset

    from hf_ext.data.formats import detect_format
    from hf_ext.data.manifest import write_manifest
    from hf_ext.data.pairs import validate_pair

    if not Path(path).is_file():
        raise UserInputError(f"{path}: file does not exist")
    rows = load_dataset("json", data_files=path)["train"]
    is_pairs = {"prompt", "chosen", "rejected"} <= set(rows.column_names)
    data_format = None if is_pairs else detect_format(rows.column_names, "auto", path)
    for index, row in enumerate(rows):
        problem = validate_pair(row) if is_pairs else data_format.validate(row)
        if problem:
            raise UserInputError(f"{path}: row {index}: {problem}")
    qc = {"kind": "pairs" if is_pairs else f"sft ({data_format.name})", "rows_validated": len(rows)}
    manifest = write_manifest(path, generator="hf-ext data manifest (user-provided file)", qc=qc)
    print(f"{path}: {manifest['rows']} rows validated; manifest written")


def pipeline_command(args: list[str]) -> None:
    if len(args) != 1:
        raise UserInputError("usage: hf-ext pipeline PIPELINE.yaml")
    from hf_ext.pipeline import run_pipeline

    run_pipeline(args[0])


COMMANDS = {"train": train_command, "eval": eval_command, "data": data_command, "pipeline": pipeline_command}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("\n\n".join(__doc__.strip().split("\n\n")[1:3]))  # usage on stdout, as argparse does
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        usage = __doc__.strip().split("\n\n")[1]
        print(usage if not argv else f"hf-ext: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
        sys.exit(2)
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_ext").setLevel(logging.INFO)  # hf_ext's own results and summary; libraries stay at WARNING
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserInputError as error:
        print(f"hf-ext: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
