"""Model cards: one renderer for every stage, composed from the templates in `model_cards/`.

A card is `card.md` (front matter and title), then the architecture's part (`architectures/<card_template>` of
`hf_ext.models.extras.extras_for(model_type)`), then the stage's part (`stages/<Stage.card_template>`), rendered with
huggingface_hub's `ModelCard.from_template` (Jinja2). The variables are the common ones below plus the stage's
`Stage.card_variables`; the front matter is a `ModelCardData` from `Stage.card_data`.

TRL's trainers write their own card at every checkpoint; hf_ext's trainers write this one instead
(`StageTrainerMixin.create_model_card`), so a checkpoint's card and the final card come from the same templates.
transformers' own card would drop the PEFT metadata.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from hf_ext.loading import HUB_ID_PATTERN, PACKAGE_SCHEME
from hf_ext.resources import shipped_path


def hub_base_model(recipe) -> str | None:
    """The Hub id of the base model, never a local path: `base_model_id` if set, else the reference if it is one."""
    if recipe.script_args.base_model_id:
        return recipe.script_args.base_model_id
    reference = recipe.model_args.model_name_or_path
    if not reference:
        return None
    if HUB_ID_PATTERN.match(reference) and not Path(reference).exists() and not reference.startswith(PACKAGE_SCHEME):
        return reference
    return None


def usage_snippet(model_id: str, auto_class: str, model_type: str, model_args, base_model: str | None,
                  has_tokenizer: bool = True) -> str:
    """The card's loading code, both ways: with hf_ext installed (the architecture is registered) or without it
    (`trust_remote_code=True`: the modeling code is saved with the weights); an adapter on its base loaded as it was
    trained (dtype and 4-bit quantization), from the base's Hub id or a local copy of it."""
    from hf_ext.models.extras import ARCHITECTURE_EXTRAS

    custom = model_type in ARCHITECTURE_EXTRAS
    # transformers reads config.json first and, for a model_type it does not know, asks whether to run the remote
    # code (an interactive prompt of 15 s); trust_remote_code=False skips the question: the tokenizer is a standard one
    tokenizer = (f'tokenizer = AutoTokenizer.from_pretrained("{model_id}", trust_remote_code=False)  # a standard one\n'
                 if custom else f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n')
    imports = f"from transformers import {auto_class}" + (", AutoTokenizer" if has_tokenizer else "")
    tail = tokenizer if has_tokenizer else ""
    if not model_args.use_peft:
        if not custom:
            return f'{imports}\nmodel = {auto_class}.from_pretrained("{model_id}")\n{tail}'
        return (
            f"import hf_ext  # noqa: F401  (registers {model_type}; without hf_ext, see below)\n{imports}\n"
            f'model = {auto_class}.from_pretrained("{model_id}")\n'
            f"# without hf_ext, the modeling code saved next to the weights runs:\n"
            f'# model = {auto_class}.from_pretrained("{model_id}", trust_remote_code=True)\n{tail}'
        )
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    base = base_model or "<the base model: its Hub id or a local copy>"
    options = [f"dtype=torch.{dtype}"]
    if model_args.load_in_4bit:
        options.append(
            "quantization_config=BitsAndBytesConfig(\n        load_in_4bit=True, "
            f'bnb_4bit_quant_type="{model_args.bnb_4bit_quant_type}", '
            f"bnb_4bit_use_double_quant={model_args.use_bnb_nested_quant}, bnb_4bit_compute_dtype=torch.{dtype},\n    )"
        )
    if custom:
        options.append("trust_remote_code=True")  # harmless with hf_ext installed; needed without it
    reference = model_args.model_name_or_path or ""
    from_gguf = reference.endswith(".gguf") or reference.startswith(PACKAGE_SCHEME)
    note = (f"# Trained on {reference} (a GGUF, dequantized); the Hub weights of {base} differ slightly.\n"
            if from_gguf and base_model else "")
    one_line = (f"# or, with the base named in adapter_config.json (loaded in its own dtype, unquantized):\n"
                f'# model = AutoPeftModelForCausalLM.from_pretrained("{model_id}"'
                f'{", trust_remote_code=True" if custom else ""})\n' if auto_class == "AutoModelForCausalLM" else "")
    return (
        "import torch\nfrom peft import PeftModel\n"
        f"{imports}{', BitsAndBytesConfig' if model_args.load_in_4bit else ''}\n\n{note}"
        f'base = {auto_class}.from_pretrained(\n    "{base}",  # offline: the path of a local copy\n'
        f"    {(',' + chr(10) + '    ').join(options)},\n)\n"
        f'model = PeftModel.from_pretrained(base, "{model_id}")\n{one_line}{tail}'
    )


def describe_model(model) -> dict:
    """What a card says about a trained model, kept in `metrics.json` as `model_summary` so that `hf-ext card` and
    `hf-ext push` render the card again from the folder alone (an adapter's folder has no base config)."""
    return {
        "model_type": model.config.model_type,
        "parameters": model.num_parameters(),
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "config": {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"},  # no local path
    }


def render_card(recipe, stage, metrics: dict, model_summary: dict, model_id: str | None = None) -> ModelCard:
    """The card of a model trained by `recipe` with `stage`, with the run's `metrics` so far and its
    `describe_model` summary. `model_id` (a Hub repo id when pushing) is the name the usage snippets load; by default
    the output folder's name."""
    from hf_ext.models.extras import extras_for

    model_type = model_summary["model_type"]
    training_args, model_args = recipe.training_args, recipe.model_args
    parameters = model_summary["parameters"]
    without_embeddings = model_summary["parameters_without_embeddings"]
    model_name = model_id or Path(training_args.output_dir).name
    variables = dict(
        model_name=model_name,
        model_type=model_type,
        model_config=model_summary["config"],
        config=getattr(training_args, "config_overrides", None) or {},
        parameters=f"{parameters / 1e6:.2f}M",
        parameters_without_embeddings=f"{without_embeddings / 1e6:.2f}M",
        from_scratch=not model_args.model_name_or_path,
        stage=recipe.stage,
        stage_description=stage.card_description,
        base_model_reference=hub_base_model(recipe) or model_args.model_name_or_path,
        usage=usage_snippet(model_name, stage.auto_class, model_type, model_args, hub_base_model(recipe),
                            has_tokenizer=stage.auto_class != "AutoModelForSemanticSegmentation"),
        seed=training_args.seed,
        global_step=metrics.get("global_step"),
        in_progress=metrics.get("in_progress", False),
    )
    variables.update(stage.card_variables(recipe, metrics))
    template = "".join(
        shipped_path("model_cards", *part).read_text()
        for part in (
            ("card.md",),
            ("architectures", extras_for(model_type).card_template),
            ("stages", stage.card_template),
        )
    )
    card_data = ModelCardData(license="apache-2.0", model_name=model_name, **stage.card_data(recipe, metrics))
    card_data.tags = [tag for tag in dict.fromkeys(["hf_ext", recipe.stage, *(card_data.tags or []), model_type]) if tag]
    card = ModelCard.from_template(card_data, template_str=template, **variables)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # an empty part leaves no gap
