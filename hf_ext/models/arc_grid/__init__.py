"""ARC grid model family (`model_type: arc_grid`), registered with the Auto classes by `import hf_ext`."""

from .configuration_arc_grid import ArcGridConfig
from .modeling_arc_grid import ArcGridForGridPrediction, ArcGridModel, ArcGridPreTrainedModel

__all__ = ["ArcGridConfig", "ArcGridForGridPrediction", "ArcGridModel", "ArcGridPreTrainedModel"]
