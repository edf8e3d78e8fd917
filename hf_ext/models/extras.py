"""What hf_ext's stages need to know of an architecture beyond its transformers classes, declared by the architecture.

Stages are generic: they ask `extras_for(model_type)` and never compare `model_type` themselves. `hf_ext.models`
declares the extras of each architecture it registers; an architecture hf_ext does not ship (Llama, SmolLM2, ...)
gets the defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Diagnostics:
    """Numbers an architecture reports about itself at every evaluation, from one batch of validation inputs.

    `compute(model, input_ids, attention_mask)` returns the full report (stored in `metrics.json` under `name`);
    `summarize(report)` the scalars logged with the evaluation metrics (as `eval_<key>`)."""

    name: str
    compute: Callable
    summarize: Callable[[dict], dict[str, float]]


@dataclass(frozen=True)
class ArchitectureExtras:
    card_template: str = "default.md"  # the architecture part of a model card, in model_cards/architectures/
    masked_lm_fields: Mapping = field(default_factory=lambda: MappingProxyType({}))  # config fields of a masked LM
    diagnostics: Diagnostics | None = None


ARCHITECTURE_EXTRAS: dict[str, ArchitectureExtras] = {}  # model_type -> extras, filled by `hf_ext.models`


def extras_for(model_type: str) -> ArchitectureExtras:
    import hf_ext.models  # noqa: F401  (each architecture registers its extras)

    return ARCHITECTURE_EXTRAS.get(model_type, ArchitectureExtras())
