"""The registry of training stages: recipe key `stage` -> the module that implements it.

Each stage module exports `Config` (its TRL config subclass), `Trainer` (its TRL trainer subclass) and
`build_datasets(script_args, training_args, tokenizer)`. Modules are imported only when a stage is used.
"""

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "sft": "hf_ext.trainers.sft",
}


def get_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(name)
    return importlib.import_module(STAGES[name])
