"""Masked-language-model training of a bidirectional model on protein sequences (`transformers.Trainer` subclass).

TRL has no masked-LM trainer, so this stage subclasses the `transformers.Trainer` that TRL's trainers build on, with
transformers' own `DataCollatorForLanguageModeling` (BERT masking: 15% of residues chosen, 80% -> `<mask>`, 10% -> a
random token, 10% unchanged; `<cls>`, `<eos>` and padding are never chosen).

Data: the built-in real antibody corpus (`corpus: antibody_germlines`, `hf_ext.data.protein.load_antibody_corpus`,
validation = held-out V genes) or `dataset_name` (a file or dataset with a `sequence` column). Every sequence is
checked against the amino-acid alphabet first (`on_unknown: error` names the row and character; `unk` maps it).

Held-out MLM perplexity (the one definition used everywhere in hf_ext): the validation sequences are masked once,
with the same BERT scheme and the recipe's seed, before training; perplexity = `exp(mean cross-entropy over those
masked positions)`, so every evaluation of every run on the same data scores the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from datasets import DatasetDict
from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification

from hf_ext.errors import UserInputError
from hf_ext.loading import build_config
from hf_ext.trainers.base import (
    Stage,
    StageConfigMixin,
    StageTrainerMixin,
    final_evaluation,
    perplexity,
    wrap_peft,
)

CARD_DESCRIPTION = (
    "Masked-language-model training of a bidirectional model (a `transformers.Trainer` subclass with BERT-style "
    "masking); loss on the masked residues only."
)
CORPORA = {"antibody_germlines": ("antibody",)}  # built-in corpora and their model-card tags


@dataclass
class HfExtMLMConfig(StageConfigMixin, transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus the model to build, the masking and the sequence checks."""

    _VALID_DICT_FIELDS = transformers.TrainingArguments._VALID_DICT_FIELDS + ["config_overrides"]

    model_type: str | None = field(
        default="mamba_ssm",
        metadata={"help": "Architecture to build from scratch (an AutoConfig model_type); unused with model_name_or_path."},
    )
    config_overrides: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Architecture fields for `model_type` (hidden_size, num_hidden_layers, ...)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; unset: the model's, else hf_ext's protein tokenizer."}
    )
    max_length: int = field(default=1024, metadata={"help": "Longest sequence in tokens (<cls> and <eos> included)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of residues chosen for masking."})
    on_unknown: str = field(
        default="error", metadata={"help": "A character outside the amino-acid alphabet: error, or unk (<unk> token)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a model_name_or_path with its own code."})

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserInputError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.max_length < 3:
            raise UserInputError(f"max_length must be >= 3 (<cls>, a residue, <eos>), got {self.max_length}")
        if self.on_unknown not in ("error", "unk"):
            raise UserInputError(f"on_unknown must be 'error' or 'unk', got {self.on_unknown!r}")
        super().__post_init__()
        if self.model_type:  # a bad architecture field fails here, before any data or output folder
            build_config(self.model_type, self.config_overrides, **masked_lm_fields(self.model_type))


def masked_lm_fields(model_type: str) -> dict:
    """The config fields the architecture sets for a masked LM (Mamba: bidirectional scans), from its extras."""
    from hf_ext.models.extras import extras_for

    return dict(extras_for(model_type).masked_lm_fields)


class MaskedLMCollator:
    """BERT masking for training rows; rows that were masked once already (the validation set) are only padded."""

    def __init__(self, tokenizer, mlm_probability: float):
        self.masking = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
        self.padding = DataCollatorForTokenClassification(tokenizer)  # pads labels with -100

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return self.padding(features) if "labels" in features[0] else self.masking(features)


class HfExtMLMTrainer(StageTrainerMixin, transformers.Trainer):
    _tag_names = ["mlm", "hf_ext"]
    _name = "MLM"

    def __init__(self, model, args: HfExtMLMConfig, processing_class, peft_config=None, data_collator=None, **kwargs):
        model = wrap_peft(model, peft_config)
        data_collator = data_collator or MaskedLMCollator(processing_class, args.mlm_probability)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if f"{metric_key_prefix}_loss" in metrics:
            extra = {f"{metric_key_prefix}_perplexity": perplexity(metrics[f"{metric_key_prefix}_loss"])}
            self.log(extra)
            metrics.update(extra)
        return metrics


def _sequence_splits(script_args, training_args) -> tuple[DatasetDict, str]:
    if script_args.corpus:
        if script_args.corpus not in CORPORA:
            raise UserInputError(f"corpus: stage mlm has the built-in corpora {', '.join(CORPORA)}, not {script_args.corpus!r}")
        from hf_ext.data.protein import load_antibody_corpus

        corpus = load_antibody_corpus(validation_fraction=script_args.corpus_validation_fraction, seed=training_args.seed)
        return DatasetDict({"train": corpus["train"], "test": corpus["validation"]}), f"corpus {script_args.corpus}"
    if script_args.dataset_name:
        from hf_ext.data.sources import load_splits

        return load_splits(script_args, seed=training_args.seed), str(script_args.dataset_name)
    raise UserInputError("mlm: set `corpus` (antibody_germlines) or `dataset_name` (a dataset with a sequence column)")


def mask_once(dataset, tokenizer, mlm_probability: float, seed: int):
    """The validation rows masked with a fixed seed: every evaluation scores the same masked positions."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
    input_ids, labels = [], []
    for row in dataset["input_ids"]:
        batch = collator([{"input_ids": row}])
        input_ids.append(batch["input_ids"][0].tolist())
        labels.append(batch["labels"][0].tolist())
    return dataset.from_dict({"input_ids": input_ids, "labels": labels})


class MLMStage(Stage):
    """Masked-LM training of a bidirectional model on protein sequences."""

    name = "mlm"
    config_class = HfExtMLMConfig
    trainer_class = HfExtMLMTrainer
    card_description = CARD_DESCRIPTION
    loss_label = "masked-LM loss (masked residues, nats)"
    takes_corpus = True
    evaluates_final_model = True
    card_template = "mlm.md"
    auto_class = "AutoModelForMaskedLM"

    def build_datasets(self, script_args, training_args, tokenizer) -> DatasetDict:
        """`train`: `input_ids` per sequence (masked anew every batch); `test`: `input_ids` + `labels`, masked once."""
        from hf_ext.data.protein import validate_sequences

        splits, source = _sequence_splits(script_args, training_args)
        encoded = {}
        for split, rows in splits.items():
            if "sequence" not in rows.column_names:
                raise UserInputError(f"{source} [{split}]: no 'sequence' column (has: {', '.join(rows.column_names)})")
            sequences = validate_sequences(rows["sequence"], training_args.on_unknown, source=f"{source} [{split}]")
            ids = tokenizer(sequences, truncation=False)["input_ids"]
            for index, row in enumerate(ids):
                if len(row) > training_args.max_length:
                    raise UserInputError(
                        f"{source} [{split}] sequence {index}: {len(row)} tokens with <cls>/<eos>, more than max_length "
                        f"{training_args.max_length}"
                    )
            encoded[split] = rows.from_dict({"input_ids": ids})
        if len(encoded["train"]) == 0:
            raise UserInputError(f"{source}: the training split is empty")
        if "test" in encoded and len(encoded["test"]):
            encoded["test"] = mask_once(encoded["test"], tokenizer, training_args.mlm_probability, training_args.seed)
        return DatasetDict(encoded)

    def new_tokenizer(self, recipe):
        """hf_ext's amino-acid tokenizer."""
        from hf_ext.data.protein import build_protein_tokenizer

        return build_protein_tokenizer(model_max_length=recipe.training_args.max_length)

    def load_model(self, recipe, tokenizer):
        """A new bidirectional `model_type` (vocabulary and special tokens from the tokenizer), or `model_name_or_path`."""
        from transformers import AutoModelForMaskedLM

        from hf_ext.data.protein import PROTEIN_MODEL_VOCAB_SIZE
        from hf_ext.loading import new_model, safe_weights_kwargs

        args, model_args = recipe.training_args, recipe.model_args
        if model_args.model_name_or_path:
            reference = model_args.model_name_or_path
            return AutoModelForMaskedLM.from_pretrained(
                reference, dtype=torch.float32, trust_remote_code=args.trust_remote_code,
                **safe_weights_kwargs(reference, reference, model_args.allow_pickle_weights),
            )
        fields = dict(
            vocab_size=max(len(tokenizer), PROTEIN_MODEL_VOCAB_SIZE),  # the protein vocabulary rounded up to 32
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **masked_lm_fields(args.model_type),
        )
        return new_model(AutoModelForMaskedLM, args.model_type, args.config_overrides, args.seed, fields)

    def final_metrics(self, trainer) -> dict:
        """Held-out MLM loss and perplexity of the final model, its size and the residues it was trained on."""
        metrics: dict = {}
        train = trainer.train_dataset
        metrics["train_sequences"] = len(train)
        metrics["train_tokens_per_epoch"] = sum(len(ids) for ids in train["input_ids"])
        if trainer.eval_dataset is not None and len(trainer.eval_dataset):
            evaluation = final_evaluation(trainer)
            metrics["validation"] = {k.removeprefix("eval_"): v for k, v in evaluation.items() if k != "epoch"}
            metrics["validation"]["sequences"] = len(trainer.eval_dataset)
            metrics["validation"]["masked_tokens"] = sum(
                sum(label != -100 for label in row) for row in trainer.eval_dataset["labels"]
            )
        return metrics

    def card_data(self, recipe, metrics: dict) -> dict:
        """Tags `protein` (the stage's data are amino-acid sequences) and the corpus' own (`antibody`)."""
        return dict(
            library_name="peft" if recipe.model_args.use_peft else "transformers", pipeline_tag="fill-mask",
            tags=["protein", *CORPORA.get(recipe.script_args.corpus, ())],
        )

    def card_variables(self, recipe, metrics: dict) -> dict:
        args, corpus = recipe.training_args, recipe.script_args.corpus
        validation = metrics.get("validation", {})
        return dict(
            data_description=(
                f"`{corpus}` (hf_ext built-in: human IMGT germline V-J assemblies from `abnumber`, "
                "validation = held-out V genes)" if corpus else f"`{recipe.script_args.dataset_name}`"
            ),
            validation_loss=f"{validation['loss']:.4f}" if "loss" in validation else "n/a",
            validation_perplexity=f"{validation['perplexity']:.2f}" if "perplexity" in validation else "n/a",
            perplexity_definition=(
                f"exp(mean cross-entropy over the {validation.get('masked_tokens', 'n/a')} residues of the "
                f"{validation.get('sequences', 'n/a')} held-out sequences masked once with seed {args.seed} "
                f"(BERT scheme, mlm_probability {args.mlm_probability})"
            ),
            protein=True,
        )
