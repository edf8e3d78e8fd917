"""mHC language model (`model_type: mhc_lm`), registered with the Auto classes by `import hf_ext`."""

from .configuration_mhc import MHCConfig
from .modeling_mhc import MHCForCausalLM, MHCModel, MHCPreTrainedModel

__all__ = ["MHCConfig", "MHCForCausalLM", "MHCModel", "MHCPreTrainedModel"]
