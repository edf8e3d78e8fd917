"""`python -m hf_ext.train RECIPE [--key value ...]`: run one recipe in this process (the accelerate entry point).

`accelerate launch [flags] -m hf_ext.train recipes/sft.yaml` runs it on every rank; `hf-ext train` builds that
command when the recipe asks for several processes or an accelerate config.

Order of work, so that bad input never leaves a folder that looks finished: parse and validate the recipe, resolve
the model and encode every data row (no output folder yet), then create the output folder with `recipe.yaml`,
train, save, evaluate, and write `metrics.json` last.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hf_ext.errors import UserInputError
from hf_ext.run_folder import RunFolder

logger = logging.getLogger("hf_ext")


def apply_env(recipe_path: str, overrides: list[str] | None = None) -> None:
    """Set the recipe's `env` before torch/transformers/huggingface_hub read their environment at import; with
    `backend: unsloth` (in the recipe or `overrides`), import Unsloth next, as it asks: it patches transformers, TRL
    and PEFT when it is imported. Then register hf_ext's architectures (which imports them; `hf-ext` and
    `python -m hf_ext.train` processes defer that to here, see hf_ext/__init__.py)."""
    from hf_ext.run_folder import read_yaml_mapping

    data = read_yaml_mapping(recipe_path)
    for key, value in (data.get("env") or {}).items():
        os.environ[str(key)] = str(value)
    if (option_value(overrides or [], "--backend") or data.get("backend")) == "unsloth":
        from hf_ext.dependencies import check_unsloth

        check_unsloth()
        import unsloth  # noqa: F401
    import hf_ext.models  # noqa: F401


def option_value(args: list[str], option: str) -> str | None:
    """The value of ``option`` in ``args`` (``--task x`` or ``--task=x``), before any parsing."""
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _resume_argument(value: str | None, output_dir: str, is_main_process: bool) -> str | None:
    """The checkpoint folder to resume from: for `true`, the newest one transformers finished writing (incomplete ones
    after it are removed by the main process); None to start from step 0."""
    if value is None or value.lower() in ("false", "no", "0", ""):
        return None
    if value.lower() in ("true", "yes", "1"):
        latest = RunFolder(output_dir).latest_checkpoint(remove_incomplete=is_main_process)
        if latest is None:
            logger.warning("resume_from_checkpoint: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        return str(latest)
    if not Path(value).is_dir():
        raise UserInputError(f"resume_from_checkpoint: checkpoint folder {value} does not exist")
    if not RunFolder.is_complete_checkpoint(Path(value)):
        raise UserInputError(f"resume_from_checkpoint: {value} is not a complete checkpoint (no readable "
                             "trainer_state.json: the run was stopped while saving it); resume from an earlier one")
    return value


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    """Run a recipe to the end in this process (one rank of a launch); returns the metrics it wrote."""
    import torch
    from accelerate import PartialState
    from peft import PeftModel

    from hf_ext.eval.accuracy import peak_rss_mb
    from hf_ext.loading import peft_config
    from hf_ext.model_card import describe_model, hub_base_model
    from hf_ext.recipe import parse_recipe
    from hf_ext.run_folder import SKIPPED_STEPS_KEY, loss_curve
    from hf_ext.trainers import get_stage

    recipe = parse_recipe(recipe_path, overrides)
    script_args, training_args, model_args = recipe.script_args, recipe.training_args, recipe.model_args
    stage = get_stage(recipe.stage)
    state = PartialState()
    push = hub_push_settings(training_args)  # checked now, pushed once at the end (never by transformers' Trainer)

    tokenizer = stage.load_tokenizer(recipe)
    datasets = stage.build_datasets(script_args, training_args, tokenizer)

    folder = RunFolder(training_args.output_dir)
    if state.is_main_process:
        folder.start()
        folder.write_recipe(recipe)
    state.wait_for_everyone()

    model = stage.load_model(recipe, tokenizer)
    model_name = model_args.model_name_or_path or getattr(training_args, "model_type", None) or "model"
    metrics: dict = {"stage": recipe.stage, "recipe": str(recipe.path), "model": model_name}
    if script_args.eval_before_training and state.is_main_process:
        metrics.update(stage.task_accuracy(recipe, model, tokenizer, datasets, "before training"))

    training_args.push_to_hub = False  # after write_recipe: the saved recipe still pushes (hub_push_settings)
    trainer = stage.trainer_class(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=stage.eval_dataset(datasets, training_args),
        processing_class=tokenizer,
        peft_config=None if isinstance(model, PeftModel) else peft_config(model_args),  # an adapter keeps training
        render_card=lambda progress, summary: stage.render_card(recipe, progress, summary),  # checkpoint cards
    )
    resume = _resume_argument(training_args.resume_from_checkpoint, str(folder.path), state.is_main_process)
    resumed_at = RunFolder.checkpoint_step(Path(resume)) if resume else 0
    result = trainer.train(resume_from_checkpoint=resume)

    trainer.save_model(str(folder.path))
    if state.is_main_process:
        if tokenizer is not None:
            tokenizer.save_pretrained(folder.path)
        if model_args.use_peft:  # the Hub id (for PEFT and the Hub), never the local GGUF conversion cache
            record_adapter_base(folder.path, hub_base_model(recipe) or model_args.model_name_or_path)

    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters() if p.requires_grad)
    metrics.update(stage.final_metrics(trainer))  # on every rank: evaluation is collective
    per_rank = trainer.accelerator.gather_for_metrics(
        [{"rank": state.process_index, "global_step": trainer.state.global_step, "trainable_checksum": checksum}],
        use_gather_object=True,
    )

    if state.is_main_process:
        metrics.update(stage.task_accuracy(recipe, trainer.model, tokenizer, datasets, "after training"))
        curve = loss_curve(trainer.state.log_history)
        # None when a resume found the run at max_steps already (transformers then reports 0 for the 0 steps it trained)
        train_loss = result.metrics.get("train_loss") if trainer.state.global_step > resumed_at else None
        metrics.update(
            task=script_args.task,
            data_format=metrics.get("accuracy_after", {}).get("data_format", script_args.data_format),
            global_step=trainer.state.global_step,
            max_steps=trainer.state.max_steps,
            resumed_from_checkpoint=bool(resume),
            train_runtime_seconds=result.metrics.get("train_runtime"),
            train_loss=train_loss,
            world_size=state.num_processes,
            ranks=per_rank,
            peak_rss_mb=peak_rss_mb(),
            **{SKIPPED_STEPS_KEY: trainer.skipped_nonfinite_steps()},
            loss_curve=curve,
            torch_threads=torch.get_num_threads(),
        )
        folder.plot_loss_curve(
            curve, f"{recipe.stage}: {model_name.split('/')[-1]}", ylabel=stage.loss_label,
            mean_train_loss=(trainer.state.global_step, train_loss) if train_loss is not None else None,
        )
        metrics["model_summary"] = describe_model(trainer.accelerator.unwrap_model(trainer.model))
        folder.write_card(stage.render_card(recipe, metrics, metrics["model_summary"]))
        folder.write_metrics(metrics)
        logger.info("done: %s; outputs in %s", closing_summary(metrics), folder.path)
    state.wait_for_everyone()
    if push is not None and state.is_main_process:  # after the barrier: no rank waits on the upload
        from hf_ext.hub import push_run

        push_run(folder.path, **push)
    return metrics


def hub_push_settings(training_args) -> dict | None:
    """`push_run`'s arguments when the recipe sets `push_to_hub: true`, checked before any model loads (repo id,
    token, offline mode). `run` turns transformers' own push off: it would replace hf_ext's card and push every
    checkpoint."""
    if not training_args.push_to_hub:
        return None
    from hf_ext.hub import check_push_target

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    token = check_push_target(repo_id, training_args.hub_token, key="hub_model_id")
    return {"repo_id": repo_id, "private": bool(training_args.hub_private_repo), "revision": training_args.hub_revision,
            "token": token}


def closing_summary(metrics: dict) -> str:
    """`stage sft, 100 steps, train loss 0.412, accuracy 0.000 -> 0.805`: the run in one line."""
    parts = [f"stage {metrics['stage']}", f"{metrics['global_step']} steps"]
    if metrics.get("train_loss") is not None:
        parts.append(f"train loss {metrics['train_loss']:.4g}")
    if "accuracy_after" in metrics:
        before = f"{metrics['accuracy_before']['accuracy']:.3f} -> " if "accuracy_before" in metrics else ""
        parts.append(f"accuracy {before}{metrics['accuracy_after']['accuracy']:.3f}")
    for name in ("validation", "arc_eval"):
        if isinstance(metrics.get(name), dict):
            shown = {k: v for k, v in metrics[name].items() if k in ("loss", "perplexity", "pass2_task_mean")}
            parts += [f"{name} {k} {v:.4g}" for k, v in shown.items() if isinstance(v, float)]
    return ", ".join(parts)


def record_adapter_base(adapter_dir: Path, reference: str) -> None:
    import json

    from hf_ext.run_folder import write_text_atomic

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = reference
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hf_ext.train RECIPE.yaml [--key value ...]")
        sys.exit(0 if argv else 2)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # hf_ext's own results and summary; libraries stay at WARNING
    try:
        apply_env(argv[0], argv[1:])
        run(argv[0], argv[1:])
    except UserInputError as error:
        print(f"hf-ext: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
