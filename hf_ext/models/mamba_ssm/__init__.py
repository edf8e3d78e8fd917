"""Mamba selective-SSM models (`model_type: mamba_ssm`), registered with the Auto classes by `import hf_ext`."""

from .configuration_mamba_ssm import MambaSSMConfig
from .modeling_mamba_ssm import (
    MambaSSMCache,
    MambaSSMForCausalLM,
    MambaSSMForMaskedLM,
    MambaSSMForSequenceClassification,
    MambaSSMModel,
    MambaSSMPreTrainedModel,
)

__all__ = [
    "MambaSSMCache",
    "MambaSSMConfig",
    "MambaSSMForCausalLM",
    "MambaSSMForMaskedLM",
    "MambaSSMForSequenceClassification",
    "MambaSSMModel",
    "MambaSSMPreTrainedModel",
]
