"""The registry of training stages: recipe key `stage` -> the module that implements it.

Each stage module exports `Config` (its TRL config subclass), `Trainer` (its TRL trainer subclass),
`build_datasets(script_args, training_args, tokenizer)` and `CARD_DESCRIPTION` (a sentence for the model card). Modules are imported only when a stage is used.

Optional hooks, for stages that build their own model (`hf_ext.trainers.pretrain`, `hf_ext.trainers.mlm`): `load_tokenizer(recipe)`,
`load_model(recipe, tokenizer)`, `final_metrics(trainer) -> dict` (run on every rank after training),
`render_card(recipe, metrics) -> ModelCard` and `LOSS_LABEL` (the loss plot's y label). `load_tokenizer` may return
None (grids need no tokenizer), and `BUILT_IN_DATA = True` says the stage reads its data from its own keys.
"""

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "sft": "hf_ext.trainers.sft",
    "dpo": "hf_ext.trainers.dpo",
    "pretrain": "hf_ext.trainers.pretrain",
    "mlm": "hf_ext.trainers.mlm",
    "arc": "hf_ext.trainers.arc",
}


def get_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(name)
    return importlib.import_module(STAGES[name])
