"""The `hf-ext` command.

    hf-ext train RECIPE.yaml [--key value ...] [-- ACCELERATE FLAGS ...]
    hf-ext eval --model PATH [--task NAME] [--num_examples N] ...

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

ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "fsdp")


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


def train_command(args: list[str]) -> None:
    from hf_ext.train import apply_env, run

    launcher_flags: list[str] = []
    if "--" in args:
        split = args.index("--")
        args, launcher_flags = args[:split], args[split + 1 :]
    if not args or args[0].startswith("-"):
        raise UserInputError("usage: hf-ext train RECIPE.yaml [--key value ...] [-- accelerate flags]")
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
    parser = argparse.ArgumentParser(
        prog="hf-ext eval",
        description="Exact-match accuracy of one or more models on a verifiable task, one model in memory at a time. "
        "Defaults come from the recipe.yaml saved next to a trained model.",
    )
    parser.add_argument("--model", required=True, help="model reference(s), comma-separated: folder, adapter, .gguf, Hub id, package://")
    parser.add_argument("--task", help="verifiable task (default: the model's recipe.yaml)")
    parser.add_argument("--data_format", help="prompt encoding: messages, instruction or prompt_completion")
    parser.add_argument("--num_examples", type=int, help="held-out examples to score (default: the task_eval_size)")
    parser.add_argument("--seed", type=int, help="split seed (default: the recipe's seed, else 42)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--output", help="write the results as JSON to this file")
    options = parser.parse_args(args)

    import gc

    from hf_ext.data.formats import detect_format
    from hf_ext.data.tasks import TASKS
    from hf_ext.eval.accuracy import evaluate_task
    from hf_ext.loading import load_model, load_tokenizer
    from hf_ext.recipe import ModelArguments, ScriptArguments, read_yaml_mapping

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
        results.append({"model": reference, **result})
        print(f"{reference}: {task_name} accuracy {result['accuracy']:.3f} on {result['num_examples']} examples ({data_format.name})")
        del model
        gc.collect()
    if options.output:
        Path(options.output).write_text(json.dumps(results, indent=2))


COMMANDS = {"train": train_command, "eval": eval_command}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n")[1] if argv[:1] in ([], ["-h"], ["--help"]) else f"hf-ext: unknown command {argv[0]!r}", file=sys.stderr)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except UserInputError as error:
        print(f"hf-ext: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
