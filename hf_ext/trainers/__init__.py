"""The registry of training stages: recipe key `stage` -> the `Stage` subclass that implements it.

A stage is one class (`hf_ext.trainers.base.Stage`) whose methods are the hooks `train.run` calls; its module also
holds the stage's config and trainer classes, named `HfExt<Stage>Config` / `HfExt<Stage>Trainer` so that they never
shadow transformers' or TRL's names. Modules are imported only when a stage is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_ext.trainers.base import Stage

STAGES: dict[str, str] = {
    "sft": "hf_ext.trainers.sft:SFTStage",
    "dpo": "hf_ext.trainers.dpo:DPOStage",
    "pretrain": "hf_ext.trainers.pretrain:PretrainStage",
    "mlm": "hf_ext.trainers.mlm:MLMStage",
    "arc": "hf_ext.trainers.arc:ArcStage",
    "sdft": "hf_ext.trainers.sdft:SDFTStage",
    "ttt_discover": "hf_ext.trainers.ttt_discover:TTTDiscoverStage",
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(name)
    module, class_name = STAGES[name].split(":")
    return getattr(importlib.import_module(module), class_name)()
