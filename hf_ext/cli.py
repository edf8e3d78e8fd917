"""The `hf-ext` command.

    hf-ext train RECIPE.yaml [--key value ...] [-- ACCELERATE FLAGS ...]
    hf-ext eval --model PATH[,PATH...] [--task NAME] [--judge PATH] [--num_examples N] ...
    hf-ext eval --model PATH,PATH[,...] --instructions FILE --judge PATH ...
    hf-ext eval --task antibody_design --model PATH [--baseline FILE | --write_baseline FILE] ...
    hf-ext eval --task arc --model PATH [--subset NAME | --tasks_file FILE] [--num_votes N] [--ttt_steps N] ...
    hf-ext data generate-sft|generate-instructions|make-pairs|manifest|train-tokenizer ...
    hf-ext pipeline PIPELINE.yaml   (recipes/pipelines/stage1.yaml, stage1_open_ended.yaml, blueprint.yaml)
    hf-ext push OUTPUT_DIR --repo-id USER/NAME [--private] [--revision BRANCH] [--commit-message TEXT]
    hf-ext card OUTPUT_DIR [--repo-id USER/NAME]

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
from pathlib import Path

from hf_ext.errors import UserInputError
from hf_ext.train import option_value

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
    from hf_ext.recipe import describe_keys
    from hf_ext.run_folder import read_yaml_mapping
    from hf_ext.trainers import STAGES, get_stage

    if recipe_path is None:
        lines = [TRAIN_USAGE, "", "Runs one recipe (a YAML file whose key `stage` names the trainer). Stages:"]
        for name in STAGES:
            lines.append(f"  {name:<12} {type(get_stage(name)).__doc__.strip().splitlines()[0]}")
        lines += ["", "hf-ext train RECIPE.yaml --help lists every key of the recipe's stage (type, default, help)."]
        return "\n".join(lines)
    stage = read_yaml_mapping(recipe_path).get("stage")
    if stage not in STAGES:
        raise UserInputError(f"{recipe_path}: key 'stage' must be one of {', '.join(STAGES)}, got {stage!r}")
    return describe_keys(stage)


def redacted(arguments: list[str]) -> list[str]:
    """`arguments` with the values of `--*_token` options replaced, for printing."""
    shown = []
    for index, argument in enumerate(arguments):
        key, eq, _ = argument.partition("=")
        if eq and key.startswith("--") and key.endswith("_token"):
            argument = f"{key}=<redacted>"
        elif index and arguments[index - 1].startswith("--") and arguments[index - 1].endswith("_token"):
            argument = "<redacted>"
        shown.append(argument)
    return shown


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
    apply_env(recipe_path, overrides)

    from hf_ext.recipe import parse_recipe

    recipe = parse_recipe(recipe_path, overrides)  # fail on a bad recipe before any process starts
    if _under_launcher() or not (recipe.needs_launcher() or launcher_flags):
        run(recipe_path, overrides)
        return
    from accelerate.commands.launch import launch_command, launch_command_parser

    arguments = launch_arguments(recipe, recipe_path, overrides, launcher_flags)
    print("hf-ext: accelerate launch " + shlex.join(redacted(arguments)), file=sys.stderr)
    launch_command(launch_command_parser().parse_args(arguments))


def eval_command(args: list[str]) -> None:
    if option_value(args, "--task") == "antibody_design":
        return antibody_design_command(args)
    if option_value(args, "--task") == "arc":
        return arc_command(args)
    parser = argparse.ArgumentParser(
        prog="hf-ext eval",
        description="Exact-match accuracy of one or more models on a verifiable task, or with --instructions their "
        "win rate against the first model on held-out open-ended instructions; one model in memory at a time. "
        "Defaults come from the recipe.yaml saved next to a trained model.",
    )
    parser.add_argument("--model", "--models", dest="model", required=True,
                        help="model reference(s), comma-separated, evaluated in order: folder, adapter, .gguf, Hub id, package://")
    parser.add_argument("--task", help="verifiable task (default: the model's recipe.yaml)")
    parser.add_argument("--data_format", help="prompt encoding: messages, instruction or prompt_completion")
    parser.add_argument("--num_examples", type=int, help="held-out examples to score (default: the task_eval_size)")
    parser.add_argument("--seed", type=int, help="split seed (default: the recipe's task_seed, else its seed, else 42)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, help="default: 16 for a task, 64 with --instructions")
    parser.add_argument("--load_in_4bit", type=string_to_bool, nargs="?", const=True, default=None)
    parser.add_argument("--judge", help="judge model for win rates of every model against the first one")
    parser.add_argument("--instructions", help="open-ended: a file written by `hf-ext data generate-instructions`; "
                        "its held-out instructions (which the data tools never use) are answered and judged")
    parser.add_argument("--output", help="write the results as JSON to this file")
    options = parser.parse_args(args)
    if options.instructions:
        return open_ended_eval(options)

    from hf_ext.eval.accuracy import evaluate_models
    from hf_ext.recipe import task_evaluation
    from hf_ext.run_folder import write_json_atomic

    references = [m.strip() for m in options.model.split(",") if m.strip()]
    models = [
        (reference, task_evaluation(reference, options.task, options.seed, options.data_format, options.load_in_4bit,
                                    options.num_examples))
        for reference in references
    ]
    summary = evaluate_models(models, options.batch_size, options.max_new_tokens or 16, judge=options.judge)
    print("\n| model | accuracy | win rate vs first (judge) |\n|---|---|---|")
    for result in summary["models"]:
        judged = result.get("judge_vs_first")
        print(f"| {result['model']} | {result['accuracy']:.3f} | {judged['win_rate']:.3f} |" if judged else f"| {result['model']} | {result['accuracy']:.3f} | - |")
    print(f"peak RSS {summary['peak_rss_mb']:.0f} MB")
    if options.output:
        write_json_atomic(options.output, summary)


def open_ended_eval(options) -> None:
    """`hf-ext eval --instructions FILE`: win rates against the first model, with the judge's reliability."""
    from hf_ext.data.instructions import InstructionPrompts
    from hf_ext.eval.win_rate import evaluate_open_ended
    from hf_ext.recipe import task_evaluation
    from hf_ext.run_folder import write_json_atomic

    if options.task:
        raise UserInputError("eval: --task and --instructions exclude each other (a task is scored by exact match)")
    references = [m.strip() for m in options.model.split(",") if m.strip()]
    if not options.judge or len(references) < 2:
        raise UserInputError("eval --instructions: open-ended answers have no verifier, so give --judge and at least two "
                             "--model references (each is judged against the first)")
    instructions = InstructionPrompts(options.instructions).held_out()
    models = [(reference, task_evaluation(reference, data_format=options.data_format, load_in_4bit=options.load_in_4bit))
              for reference in references]
    summary = evaluate_open_ended(models, instructions, options.judge, options.batch_size, options.max_new_tokens or 64)
    print("\n| model | win rate vs first (judge) | judge decided | critic mean P(yes) | critic decided |\n|---|---|---|---|---|")
    for result in summary["models"]:
        judged, critic = result.get("judge_vs_first"), result["critic"]
        won = f"{judged['win_rate']:.3f} | {judged['orders_agree']:.0%}" if judged else "- | -"
        print(f"| {result['model']} | {won} | {critic['mean_score']:.3f} | {critic['orders_agree']:.0%} |")
    if options.output:
        write_json_atomic(options.output, summary)


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
    from hf_ext.recipe import saved_recipe
    from hf_ext.run_folder import write_json_atomic

    tolerance = parse_tolerance(options.tolerance)
    stored = read_baseline(options.baseline) if options.baseline else None  # a bad baseline fails before the model runs
    saved = saved_recipe(options.model) if Path(options.model).is_dir() else None
    split = {  # the split the model trained with, so that its parents are unseen
        "validation_fraction": options.validation_fraction,
        "split_seed": options.split_seed,
    }
    if saved is not None:
        split["validation_fraction"] = split["validation_fraction"] or saved.setting("corpus_validation_fraction")
        split["split_seed"] = saved.setting("seed") if split["split_seed"] is None else split["split_seed"]
    result = evaluate_antibody_design(
        options.model, num_parents=options.num_parents, num_variants=options.num_variants,
        num_edits=options.num_edits, temperature=options.temperature, seed=options.seed,
        batch_size=options.batch_size, scorer=options.scorer, max_positions=options.max_positions,
        **{key: value for key, value in split.items() if value is not None},
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
        write_json_atomic(options.output, result)
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
    if options.num_votes is not None and options.num_votes < 1:
        raise UserInputError(f"--num_votes must be >= 1, got {options.num_votes}")

    from transformers import AutoModelForSemanticSegmentation

    from hf_ext.data.arc import load_subset, read_task_file
    from hf_ext.eval.arc import check_no_leak, evaluate_arc, summary_line, write_attempts
    from hf_ext.recipe import saved_recipe
    from hf_ext.run_folder import RunFolder, write_json_atomic
    from hf_ext.trainers.arc import HfExtArcConfig

    saved = saved_recipe(options.model) if Path(options.model).is_dir() else None
    saved = saved if saved is not None and saved.stage == "arc" else None  # another stage's folder: no ARC settings

    def setting(name: str):
        """The command line's value, else the model's recipe's, else the arc stage's default (seed: 0)."""
        value = getattr(options, name, None)
        if value is not None:
            return value
        if saved is not None:
            return saved.setting(name)
        return 0 if name == "seed" else getattr(HfExtArcConfig, name)

    if options.tasks_file:
        tasks, subset = read_task_file(options.tasks_file), Path(options.tasks_file).name
    else:
        subset = options.subset or setting("eval_subset")
        tasks = load_subset(subset)
    record = RunFolder(options.model).read_training_record() if Path(options.model).is_dir() else {}
    check_no_leak(record, options.model, tasks)
    from hf_ext.loading import safe_weights_kwargs

    weights = safe_weights_kwargs(options.model, options.model)
    model = AutoModelForSemanticSegmentation.from_pretrained(options.model, **weights)
    if model.config.model_type != "arc_grid":
        raise UserInputError(f"{options.model}: model_type {model.config.model_type}, expected arc_grid")

    metrics, attempts = evaluate_arc(
        model, tasks, subset, trained_tasks=record.get("tasks_trained_on"), num_votes=setting("num_votes"),
        ttt_steps=setting("ttt_steps"), ttt_learning_rate=setting("ttt_learning_rate"),
        canvas_margin=setting("canvas_margin"), max_context_pairs=setting("max_context_pairs"), seed=setting("seed"),
    )
    print(f"{options.model} ({model.config.variant}): {summary_line(metrics)}")
    if options.output:
        write_json_atomic(options.output, {"model": options.model, "variant": model.config.variant, **metrics})
    if options.attempts:
        write_attempts(options.attempts, attempts)


def data_command(args: list[str]) -> None:
    from hf_ext.data.pairs import METHODS

    parser = argparse.ArgumentParser(prog="hf-ext data", description="Make and vet training data (each file gets a QC manifest).")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate-sft", help="SFT rows from a base model by few-shot completion")
    pairs = commands.add_parser("make-pairs", help="preference pairs: hard_negatives, on_policy, best_of_n or judge")
    for sub in (generate, pairs):
        sub.add_argument("--model", required=True, help="the model that writes the responses")
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--task", help="verifiable task whose training prompts are used")
        source.add_argument("--instructions",
                            help="open-ended instructions: a .jsonl written by `hf-ext data generate-instructions`")
        sub.add_argument("--num_prompts", type=int, default=200)
        sub.add_argument("--output", required=True, help="the .jsonl file to write (plus .manifest.json)")
        sub.add_argument("--seed", type=int, default=0, help="sampling seed")
        sub.add_argument("--split_seed", type=int, default=42,
                         help="task split seed: prompts come from the train split, never the held-out one (recipes' seed)")
        sub.add_argument("--offset", type=int, default=0,
                         help="skip this many train-split prompts (e.g. those another data step already used)")
        sub.add_argument("--eval_size", type=int, default=200,
                         help="size of the task's held-out split kept out of the data (recipes' task_eval_size); an "
                              "instruction file's held-out count is in its manifest")
        sub.add_argument("--batch_size", type=int, default=16)
        sub.add_argument("--max_new_tokens", type=int, default=32)
        sub.add_argument("--temperature", type=float, default=None)
        sub.add_argument("--load_in_4bit", type=string_to_bool, nargs="?", const=True, default=False)
    generate.add_argument("--shots", type=int, default=3)
    generate.add_argument("--min_response_chars", type=int, default=1)
    generate.add_argument("--keep_unverified", type=string_to_bool, nargs="?", const=True, default=False,
                          help="keep responses the task verifier rejects")
    generate.add_argument("--critic", help="open-ended instructions: the critic model (default: --model)")
    generate.add_argument("--critic_threshold", type=float, default=0.5,
                          help="open-ended instructions: keep responses whose critic P(yes), mean of both label orders, "
                               "is at least this")
    pairs.add_argument("--method", choices=list(METHODS), default="best_of_n")
    pairs.add_argument("--k", type=int, default=4, help="samples per prompt for on_policy and best_of_n")
    pairs.add_argument("--min_pairs", type=int, default=1,
                       help="fail (before any model loads, if the prompts cannot give this many) below this many pairs")
    pairs.add_argument("--judge", help="judge model (method judge, or best_of_n without a verifier)")
    pairs.add_argument("--data_format", choices=["prompt_completion", "messages", "instruction"], default="messages")
    instructions = commands.add_parser(
        "generate-instructions", help="open-ended instructions written by a base model, kept by a log-probability critic"
    )
    instructions.add_argument("--model", required=True, help="the base model that writes the instructions")
    instructions.add_argument("--output", required=True, help="the .jsonl file to write (plus .manifest.json)")
    instructions.add_argument("--num_instructions", type=int, default=200, help="attempts (the manifest counts the kept)")
    instructions.add_argument("--categories", default="qa,completion,generation,creative,analytical",
                              help="comma-separated categories, taken in turn")
    instructions.add_argument("--critic", help="critic model (default: --model)")
    instructions.add_argument("--critic_threshold", type=float, default=0.5,
                              help="keep instructions whose critic P(yes), mean of both label orders, is at least this")
    instructions.add_argument("--eval_size", type=int, default=50,
                              help="the first this many kept instructions are held out for `hf-ext eval --instructions` "
                                   "(recorded in the manifest; the data tools never use them)")
    instructions.add_argument("--shots", type=int, default=3)
    instructions.add_argument("--max_new_tokens", type=int, default=48)
    instructions.add_argument("--temperature", type=float, default=0.9)
    instructions.add_argument("--min_chars", type=int, default=12)
    instructions.add_argument("--max_chars", type=int, default=300)
    instructions.add_argument("--batch_size", type=int, default=16)
    instructions.add_argument("--seed", type=int, default=0, help="sampling seed")
    instructions.add_argument("--load_in_4bit", type=string_to_bool, nargs="?", const=True, default=False)
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
        from hf_ext.data.manifest import vet_file

        manifest = vet_file(options.path)
        print(f"{options.path}: {manifest['rows']} rows validated; manifest written")
        return
    if options.command == "train-tokenizer":
        from hf_ext.data.tokenizer import train_corpus_tokenizer

        tokenizer = train_corpus_tokenizer(options.output, options.vocab_size, options.corpus, options.model_type)
        print(f"{options.output}: {len(tokenizer)} tokens, trained on the {options.corpus} training documents")
        return

    if options.command == "generate-instructions":
        from hf_ext.data.instructions import InstructionSettings, generate_instruction_file

        settings = InstructionSettings(  # checked here, before any model loads
            num_instructions=options.num_instructions, categories=tuple(filter(None, options.categories.split(","))),
            shots=options.shots, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
            min_chars=options.min_chars, max_chars=options.max_chars, critic_threshold=options.critic_threshold,
            eval_size=options.eval_size, batch_size=options.batch_size, seed=options.seed,
        )
        manifest = generate_instruction_file(options.model, options.output, settings, options.critic,
                                             options.load_in_4bit)
        print(f"{options.output}: {manifest['rows']} instructions; QC {json.dumps(manifest['qc'])}")
        return

    if options.task:
        from hf_ext.data.tasks import TrainingPrompts

        prompts = TrainingPrompts(options.task, options.num_prompts, options.offset, options.eval_size, options.split_seed)
    else:
        from hf_ext.data.instructions import InstructionPrompts

        prompts = InstructionPrompts(options.instructions, options.num_prompts, options.offset)
    if options.command == "generate-sft":
        from hf_ext.data.fewshot import GenerationSettings, generate_open_ended_sft_data, generate_task_sft_data

        settings = GenerationSettings(  # checked here, before any model loads
            shots=options.shots, max_new_tokens=options.max_new_tokens, temperature=options.temperature or 0.0,
            min_response_chars=options.min_response_chars, keep_unverified=options.keep_unverified,
            critic_threshold=options.critic_threshold, batch_size=options.batch_size, seed=options.seed,
        )
        if options.task:
            manifest = generate_task_sft_data(options.model, prompts, options.output, settings, options.load_in_4bit)
        else:
            manifest = generate_open_ended_sft_data(options.model, prompts, options.output, settings, options.critic,
                                                    options.load_in_4bit)
        print(f"{options.output}: {manifest['rows']} rows; QC {json.dumps(manifest['qc'])}")
        return

    from hf_ext.data.pairs import make_pairs

    manifest = make_pairs(
        options.model, prompts, options.output, options.method, options.data_format, k=options.k, judge=options.judge,
        temperature=options.temperature if options.temperature is not None else 0.8,
        max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, seed=options.seed,
        min_pairs=options.min_pairs, load_in_4bit=options.load_in_4bit,
    )
    print(f"{options.output}: {manifest['rows']} pairs; QC {json.dumps(manifest['qc'])}")


PIPELINE_USAGE = "usage: hf-ext pipeline PIPELINE.yaml"


def pipeline_command(args: list[str]) -> None:
    if args in (["-h"], ["--help"]):
        print(f"{PIPELINE_USAGE}\n\nRun a chain of steps, each in its own folder, skipped when complete and resumed when "
              "interrupted (docs/pipeline.md). Two forms: the stage-1 pipeline, generate SFT data -> SFT -> preference "
              "pairs -> DPO -> evaluation, on a verifiable task (recipes/pipelines/stage1.yaml) or open-ended from "
              "instructions the base model writes (recipes/pipelines/stage1_open_ended.yaml); or a training chain, "
              "`steps:` of recipes, "
              "each training from the previous step's model (recipes/pipelines/blueprint.yaml: mHC pretrain -> SDFT -> "
              "TTT-Discover).")
        return
    if len(args) != 1:
        raise UserInputError(PIPELINE_USAGE)
    from hf_ext.pipeline import run_pipeline

    run_pipeline(args[0])


def push_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hf-ext push",
        description="Push a finished run (model or adapter, tokenizer, recipe, metrics, plots) to the Hugging Face Hub "
        "in one commit, with hf_ext's card. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("output_dir", help="the run's output folder (written by hf-ext train)")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="a branch to push to (created from main if missing)")
    parser.add_argument("--commit-message", "--commit_message", dest="commit_message")
    options = parser.parse_args(args)
    from hf_ext.hub import push_run

    print(push_run(options.output_dir, options.repo_id, private=options.private, revision=options.revision,
                   commit_message=options.commit_message))


def card_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hf-ext card",
        description="Render a finished run's model card again into OUTPUT_DIR/README.md (what `hf-ext push` uploads).",
    )
    parser.add_argument("output_dir", help="the run's output folder (written by hf-ext train)")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", help="the repo id the usage snippets load")
    options = parser.parse_args(args)
    from hf_ext.hub import render_run_card
    from hf_ext.run_folder import RunFolder

    print(RunFolder(options.output_dir).write_card(render_run_card(options.output_dir, options.repo_id)))


COMMANDS = {"train": train_command, "eval": eval_command, "data": data_command, "pipeline": pipeline_command,
            "push": push_command, "card": card_command}


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
        # What `import hf_ext` does in other processes (hf_ext/__init__.py); `train` does it once the recipe's env is
        # set (train.apply_env), and help needs no architecture.
        if argv[0] != "train" and not {"-h", "--help"} & set(argv):
            import hf_ext.models  # noqa: F401
        COMMANDS[argv[0]](argv[1:])
    except UserInputError as error:
        print(f"hf-ext: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
