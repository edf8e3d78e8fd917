"""hf_ext's architectures, registered with transformers' Auto classes both ways.

- In this process: `AutoConfig` / `AutoModel` / `AutoModelFor...` resolve the `model_type`s below to hf_ext's classes.
- `arc_grid` predicts a class (colour or "outside the grid") per output cell, so its head is registered as
  transformers' per-cell-classification Auto class, `AutoModelForSemanticSegmentation`.
- In every saved checkpoint: `register_for_auto_class` makes `save_pretrained` / `push_to_hub` copy the
  self-contained configuration and modeling files next to the weights and write `auto_map` into config.json, so
  `from_pretrained(path, trust_remote_code=True)` works where hf_ext is not installed.
- In `ARCHITECTURE_EXTRAS` (`hf_ext.models.extras`): what hf_ext's stages need beyond the transformers classes (the
  model card's architecture part, the config fields of a masked LM, the numbers logged at every evaluation).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSemanticSegmentation,
    AutoModelForSequenceClassification,
)

from .arc_grid import ArcGridConfig, ArcGridForGridPrediction, ArcGridModel

from .mamba_ssm import (
    MambaSSMConfig,
    MambaSSMForCausalLM,
    MambaSSMForMaskedLM,
    MambaSSMForSequenceClassification,
    MambaSSMModel,
)
from .extras import ARCHITECTURE_EXTRAS, ArchitectureExtras, Diagnostics
from .mhc import MHCConfig, MHCForCausalLM, MHCModel, health


def register(config_class, base_model_class, head_classes: dict) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, base_model_class, exist_ok=True)
    config_class.register_for_auto_class()
    base_model_class.register_for_auto_class("AutoModel")
    for auto_class, model_class in head_classes.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


register(MHCConfig, MHCModel, {AutoModelForCausalLM: MHCForCausalLM})
register(
    MambaSSMConfig,
    MambaSSMModel,
    {
        AutoModelForCausalLM: MambaSSMForCausalLM,
        AutoModelForMaskedLM: MambaSSMForMaskedLM,
        AutoModelForSequenceClassification: MambaSSMForSequenceClassification,
    },
)
register(ArcGridConfig, ArcGridModel, {AutoModelForSemanticSegmentation: ArcGridForGridPrediction})


ARCHITECTURE_EXTRAS.update(
    {
        MHCConfig.model_type: ArchitectureExtras(
            "mhc_lm.md", diagnostics=Diagnostics("hyper_connections", health.hyper_connection_stats, health.summarize)
        ),
        # A masked LM reads both directions: every Mamba mixer also scans the reversed sequence.
        MambaSSMConfig.model_type: ArchitectureExtras("mamba_ssm.md", masked_lm_fields={"bidirectional": True}),
        ArcGridConfig.model_type: ArchitectureExtras("arc_grid.md"),
    }
)
