"""Direct Preference Optimization (`trl.DPOTrainer` subclass).

Pairs (`prompt`, `chosen`, `rejected`) come from a pairs file (`hf-ext data make-pairs`, with a QC manifest) or
from a verifiable task (chosen = the reference answer, rejected = a hard negative). hf_ext encodes them with the same
data formats as SFT, so the prompt is tokenized exactly as at generation time and each response carries its END/EOS;
TRL's trainer takes the encoded `prompt_ids` / `chosen_ids` / `rejected_ids` unchanged.

From the base model: LoRA (`use_peft: true`), the reference is the base with the adapter disabled. On top of an SFT
adapter (`model_name_or_path: outputs/sft`): the adapter keeps training and TRL freezes a copy of it as reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl
from datasets import DatasetDict

from hf_ext.data.formats import FORMATS
from hf_ext.data.pairs import task_pairs, validate_pair
from hf_ext.data.sources import describe_source, load_splits
from hf_ext.dependencies import check_unsloth
from hf_ext.errors import UserInputError
from hf_ext.trainers.base import TASK_EVAL_SPLIT, Stage, StageConfigMixin, StageTrainerMixin

BACKENDS = ("transformers", "unsloth")
CARD_DESCRIPTION = (
    "Direct Preference Optimization (a `trl.DPOTrainer` subclass) on (prompt, chosen, rejected) pairs; the "
    "reference model is the starting point with its weights frozen."
)


@dataclass
class HfExtDPOConfig(StageConfigMixin, trl.DPOConfig):
    """`trl.DPOConfig` plus the model backend."""

    backend: str = field(
        default="transformers",
        metadata={"help": "transformers (default) or unsloth (needs a CUDA GPU and `pip install hf_ext[unsloth]`).", "choices": list(BACKENDS)},
    )

    def __post_init__(self):
        if self.backend == "unsloth":
            check_unsloth()
        super().__post_init__()


class HfExtDPOTrainer(StageTrainerMixin, trl.DPOTrainer):
    _tag_names = ["trl", "dpo", "hf_ext"]
    _name = "DPO"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # encoded by hf_ext's build_datasets
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class DPOStage(Stage):
    """Direct Preference Optimization on (prompt, chosen, rejected) pairs."""

    name = "dpo"
    config_class = HfExtDPOConfig
    trainer_class = HfExtDPOTrainer
    card_description = CARD_DESCRIPTION

    def build_datasets(self, script_args, training_args, tokenizer) -> DatasetDict:
        """`train` (and `test`) as `prompt_ids` / `chosen_ids` / `rejected_ids`, every pair validated first."""
        splits = load_splits(script_args, seed=training_args.seed)
        source = describe_source(script_args)
        task_eval = splits.get("test") if script_args.task else None
        if script_args.task:
            from hf_ext.data.tasks import TASKS

            splits = DatasetDict({name: task_pairs(TASKS[script_args.task], rows, training_args.seed) for name, rows in splits.items()})
        columns = splits["train"].column_names
        if not {"prompt", "chosen", "rejected"} <= set(columns):
            raise UserInputError(f"{source}: DPO needs columns prompt, chosen, rejected; found {', '.join(columns)}")
        # As in SFT, `auto` on prompt/response text is plain text; `messages` renders the prompt as a chat turn.
        data_format = FORMATS["prompt_completion" if script_args.data_format == "auto" else script_args.data_format]

        encoded = {}
        for name, rows in splits.items():
            if "margin" in rows.column_names and len(rows) and all(m == 0 for m in rows["margin"]):
                raise UserInputError(
                    f"{source} [{name}]: every one of its {len(rows)} pairs is a tie (margin 0: the scorer preferred "
                    "neither response), so DPO has nothing to learn; rebuild the pairs (e.g. `hf-ext data make-pairs "
                    "--method on_policy`)"
                )
            for index, row in enumerate(rows):
                problem = validate_pair(row)
                if problem:
                    raise UserInputError(f"{source} [{name}]: row {index + 1}: {problem}")

            def encode(row):
                return {
                    "prompt_ids": data_format.prompt_ids(row["prompt"], tokenizer),
                    "chosen_ids": data_format.response_ids(row["prompt"], row["chosen"], tokenizer),
                    "rejected_ids": data_format.response_ids(row["prompt"], row["rejected"], tokenizer),
                }

            encoded[name] = rows.map(encode, remove_columns=rows.column_names, desc=f"Encoding {source} [{name}] ({data_format.name})")
            if training_args.max_length is not None:
                for index, row in enumerate(encoded[name]):
                    length = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
                    if length > training_args.max_length:
                        raise UserInputError(
                            f"{source} [{name}]: row {index + 1}: {length} tokens is longer than max_length {training_args.max_length}"
                        )
        if len(encoded["train"]) == 0:
            raise UserInputError(f"{source}: no training pairs")
        if task_eval is not None:
            encoded[TASK_EVAL_SPLIT] = task_eval
        return DatasetDict(encoded)

    def load_model(self, recipe, tokenizer):
        """The named model, through Unsloth's loader with `backend: unsloth`."""
        if recipe.training_args.backend == "unsloth":
            from hf_ext.loading import load_unsloth_model

            return load_unsloth_model(recipe.model_args, recipe.training_args.max_length or 2048)
        return super().load_model(recipe, tokenizer)
