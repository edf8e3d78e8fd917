"""Model cards rendered from the templates in `model_cards/` (transformers' own card would drop the PEFT metadata)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_ext.loading import PACKAGE_SCHEME, HUB_ID_PATTERN
from hf_ext.resources import shipped_path


def hub_base_model(recipe) -> str | None:
    """The Hub id of the base model, never a local path: `base_model_id` if set, else the reference if it is one."""
    if recipe.script_args.base_model_id:
        return recipe.script_args.base_model_id
    reference = recipe.model_args.model_name_or_path
    if HUB_ID_PATTERN.match(reference) and not Path(reference).exists() and not reference.startswith(PACKAGE_SCHEME):
        return reference
    return None


def render_model_card(recipe, metrics: dict, stage_description: str, template: str = "training_run.md") -> ModelCard:
    model_args, script_args = recipe.model_args, recipe.script_args
    is_adapter = bool(model_args.use_peft)
    base_model = hub_base_model(recipe)
    model_name = Path(recipe.training_args.output_dir).name
    after = metrics.get("accuracy_after")
    eval_results = None
    if after is not None:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=f"hf_ext/{script_args.task}",
                dataset_name=f"hf_ext {script_args.task} (held-out split)",
                dataset_split="test",
                metric_type="accuracy",
                metric_name="exact match",
                metric_value=round(after["accuracy"], 4),
            )
        ]
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["hf_ext", recipe.stage, "trl", *(["lora", "qlora"] if is_adapter and model_args.load_in_4bit else [])],
        eval_results=eval_results,
    )
    base_reference = base_model or model_args.model_name_or_path
    if is_adapter:
        usage = (
            "from peft import AutoPeftModelForCausalLM\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{model_name}")  # loads {base_reference} + this adapter'
        )
    else:
        usage = f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{model_name}")'
    before = metrics.get("accuracy_before")
    curve = metrics.get("loss_curve", {})
    return ModelCard.from_template(
        card_data,
        template_path=str(shipped_path("model_cards", template)),
        model_name=model_name,
        summary=f"{recipe.stage.upper()} of {base_reference}"
        + (f" on the `{script_args.task}` task." if script_args.task else f" on {script_args.dataset_name}."),
        adapter_kind="LoRA adapter" if is_adapter else "model",
        stage=recipe.stage,
        stage_description=stage_description,
        base_model_reference=base_reference,
        data_description=(
            f"{script_args.task_train_size} generated `{script_args.task}` examples"
            if script_args.task
            else f"`{script_args.dataset_name}`"
        ),
        data_format=metrics.get("data_format", script_args.data_format),
        global_step=metrics.get("global_step"),
        final_loss=f"{curve['loss'][-1]:.4f}" if curve.get("loss") else "n/a",
        quantization="4-bit nf4 (bitsandbytes)" if model_args.load_in_4bit else model_args.dtype,
        lora=(
            f"r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}, "
            f"targets={model_args.lora_target_modules}"
            if is_adapter
            else "none (full fine-tuning)"
        ),
        task=script_args.task,
        eval_examples=after["num_examples"] if after else None,
        accuracy_before=before["accuracy"] if before else None,
        accuracy_after=after["accuracy"] if after else None,
        usage=usage,
    )
