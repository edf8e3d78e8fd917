"""Supervised fine-tuning with loss on the response tokens only (`trl.SFTTrainer` subclass).

Rows are validated and encoded by hf_ext (`hf_ext.data.formats`) into `input_ids` + `completion_mask`; TRL's
trainer turns the mask into labels (-100 on prompt tokens) and does everything else unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import trl
from datasets import DatasetDict

from hf_ext.data.formats import detect_format, encode_dataset
from hf_ext.data.sources import describe_source, load_splits
from hf_ext.errors import UserInputError
from hf_ext.trainers.base import TASK_EVAL_SPLIT, Stage, StageConfigMixin, StageTrainerMixin

CARD_DESCRIPTION = (
    "Supervised fine-tuning (a `trl.SFTTrainer` subclass); the loss covers the response tokens and their "
    "end-of-sequence token only, never the prompt."
)


@dataclass
class HfExtSFTConfig(StageConfigMixin, trl.SFTConfig):
    """`trl.SFTConfig`; the loss is on the response tokens unless `completion_only_loss: false`."""

    def __post_init__(self):
        if self.assistant_only_loss:
            raise UserInputError(
                "assistant_only_loss: hf_ext's messages format already trains on assistant turns only (with any chat "
                "template); remove the key"
            )
        if self.completion_only_loss is None:
            self.completion_only_loss = True
        super().__post_init__()


class HfExtSFTTrainer(StageTrainerMixin, trl.SFTTrainer):
    _tag_names = ["trl", "sft", "hf_ext"]
    _name = "SFT"


class SFTStage(Stage):
    """Supervised fine-tuning with loss on the response tokens only."""

    name = "sft"
    config_class = HfExtSFTConfig
    trainer_class = HfExtSFTTrainer
    card_description = CARD_DESCRIPTION

    def build_datasets(self, script_args, training_args, tokenizer) -> DatasetDict:
        """`train` (and `test` if the data has one) as `input_ids` + `completion_mask`, every row validated first; with
        a task, its held-out rows as generated too (`TASK_EVAL_SPLIT`, for the accuracy before and after training)."""
        splits = load_splits(script_args, seed=training_args.seed)
        source = describe_source(script_args)
        data_format = detect_format(splits["train"].column_names, script_args.data_format, source)
        encoded = DatasetDict(
            {
                split: encode_dataset(rows, data_format, tokenizer, training_args.max_length, f"{source} [{split}]")
                for split, rows in splits.items()
            }
        )
        if len(encoded["train"]) == 0:
            raise UserInputError(f"{source}: the training split is empty")
        if script_args.task and "test" in splits:
            encoded[TASK_EVAL_SPLIT] = splits["test"]
        return encoded
