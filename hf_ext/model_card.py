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


def render_card(recipe, stage, metrics: dict, model) -> ModelCard:
    """The card of the model `model` trained by `recipe` with `stage`, with the run's `metrics` so far."""
    from hf_ext.models.extras import ARCHITECTURE_EXTRAS, extras_for

    config = model.config
    model_type = config.model_type
    training_args, model_args = recipe.training_args, recipe.model_args
    parameters = model.num_parameters()
    without_embeddings = model.num_parameters(exclude_embeddings=True)
    variables = dict(
        model_name=Path(training_args.output_dir).name,
        model_type=model_type,
        model_config=config.to_dict(),
        config=getattr(training_args, "config_overrides", None) or {},
        parameters=f"{parameters / 1e6:.2f}M",
        parameters_without_embeddings=f"{without_embeddings / 1e6:.2f}M",
        from_scratch=not model_args.model_name_or_path,
        stage=recipe.stage,
        stage_description=stage.card_description,
        base_model_reference=hub_base_model(recipe) or model_args.model_name_or_path,
        import_hf_ext=(
            f"import hf_ext  # registers {model_type}; without hf_ext pass trust_remote_code=True (the code is saved "
            "with the weights)\n" if model_type in ARCHITECTURE_EXTRAS else ""
        ),
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
    card_data = ModelCardData(license="apache-2.0", model_name=variables["model_name"], **stage.card_data(recipe, metrics))
    card_data.tags = [tag for tag in dict.fromkeys(["hf_ext", recipe.stage, *(card_data.tags or []), model_type]) if tag]
    card = ModelCard.from_template(card_data, template_str=template, **variables)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # an empty part leaves no gap
