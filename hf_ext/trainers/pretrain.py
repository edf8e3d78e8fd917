"""Causal-LM pretraining on raw text packed into fixed-length blocks (`trl.SFTTrainer` subclass).

A recipe either builds a model from scratch (`model_type` + `config_overrides`, like transformers' `run_clm.py`) or
continues pretraining `model_name_or_path`. Text comes from a built-in real corpus (`corpus: python_docs`) or from
`dataset_name` (a `text` column). Documents are tokenized, joined with EOS and cut into blocks of `max_length`
tokens (TRL's `wrapped` packing); the loss covers every token. Validation perplexity is `exp(eval_loss)`: the mean
next-token negative log-likelihood over every predicted token of the packed validation blocks.

Without a tokenizer (`tokenizer_name_or_path` unset and no `model_name_or_path`), a SentencePiece tokenizer is trained
on the corpus' training split once and cached, so every recipe on the same corpus and vocabulary size shares it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import trl
from datasets import DatasetDict

from hf_ext.errors import UserInputError
from hf_ext.loading import build_config
from hf_ext.trainers.base import (
    Stage,
    StageConfigMixin,
    StageTrainerMixin,
    final_evaluation,
    perplexity,
)

CARD_DESCRIPTION = (
    "Causal language-model pretraining from scratch (a `trl.SFTTrainer` subclass): documents joined with EOS and "
    "packed into fixed-length blocks, loss on every token."
)


@dataclass
class HfExtPretrainConfig(StageConfigMixin, trl.SFTConfig):
    """`trl.SFTConfig` set up for language modelling, plus how to build the model and where the text comes from."""

    _VALID_DICT_FIELDS = trl.SFTConfig._VALID_DICT_FIELDS + ["config_overrides"]

    model_type: str | None = field(
        default=None,
        metadata={"help": "Architecture to build from scratch (an AutoConfig model_type: mhc_lm, llama, ...)."},
    )
    config_overrides: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Architecture fields for `model_type` (hidden_size, num_hidden_layers, hc_mult, ...)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id; unset: the model's, or one trained on the corpus."},
    )
    tokenizer_vocab_size: int = field(
        default=8192, metadata={"help": "Vocabulary of the SentencePiece tokenizer trained on the corpus."}
    )

    def __post_init__(self):
        self.packing = True
        self.packing_strategy = "wrapped"
        self.completion_only_loss = False
        if self.max_length is None or self.max_length < 2:
            raise UserInputError(f"max_length: the block length must be >= 2 tokens, got {self.max_length}")
        super().__post_init__()
        if self.model_type:  # a bad architecture field fails here, before any data or output folder
            build_config(self.model_type, self.config_overrides)


class HfExtPretrainTrainer(StageTrainerMixin, trl.SFTTrainer):
    _tag_names = ["trl", "pretrain", "hf_ext"]
    _name = "Pretrain"

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Gradient checkpointing turns the KV cache off in the config; a saved model generates with it.
        self.accelerator.unwrap_model(self.model).config.use_cache = True
        super()._save(output_dir, state_dict)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Adds perplexity and the architecture's diagnostics of one validation batch (mHC: its health numbers)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        extra = {}
        if f"{metric_key_prefix}_loss" in metrics:
            extra[f"{metric_key_prefix}_perplexity"] = perplexity(metrics[f"{metric_key_prefix}_loss"])
        report = self.architecture_diagnostics(eval_dataset)
        if report is not None:
            summary = self.diagnostics.summarize(report)
            extra.update({f"{metric_key_prefix}_{key}": value for key, value in summary.items()})
        if extra:
            self.log(extra)
            metrics.update(extra)
        return metrics


def _text_splits(script_args, training_args) -> tuple[DatasetDict, str]:
    if script_args.dataset_name:
        from hf_ext.data.sources import load_splits

        splits = load_splits(script_args, seed=training_args.seed)
        source = str(script_args.dataset_name)
    elif script_args.corpus:
        from hf_ext.data.corpus import load_text_corpus

        try:
            corpus = load_text_corpus(script_args.corpus, validation_fraction=script_args.corpus_validation_fraction)
        except ValueError as error:
            raise UserInputError(f"corpus: {error}") from None
        splits = DatasetDict({"train": corpus["train"], "test": corpus["validation"]})
        source = f"corpus {script_args.corpus}"
    else:
        raise UserInputError("pretrain: set `corpus` (e.g. python_docs) or `dataset_name` (a dataset with a text column)")
    return splits, source


def corpus_tokenizer(texts: list[str], vocab_size: int, name: str):
    """A SentencePiece tokenizer trained on `texts` (the training split only), cached by content and settings."""
    import sentencepiece
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from hf_ext.data.tokenizer import train_sentencepiece_tokenizer
    from hf_ext.loading import cache_root, portable_tokenizer
    from hf_ext.run_folder import staged_directory

    digest = hashlib.sha256(f"{vocab_size}|{sentencepiece.__version__}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    folder = cache_root() / "tokenizers" / f"{name}-sp{vocab_size}-{digest.hexdigest()[:12]}"
    with PartialState().main_process_first():
        if not (folder / "tokenizer_config.json").is_file():
            with staged_directory(folder) as staging:
                train_sentencepiece_tokenizer(texts, vocab_size=vocab_size, output_dir=staging)
    return portable_tokenizer(AutoTokenizer.from_pretrained(folder))


def check_model_source(recipe) -> None:
    if recipe.training_args.model_type and recipe.model_args.model_name_or_path:
        raise UserInputError("pretrain: set either model_type (a new model) or model_name_or_path (continue), not both")
    if not recipe.training_args.model_type and not recipe.model_args.model_name_or_path:
        raise UserInputError("pretrain: set model_type (+ config_overrides) to train from scratch, or model_name_or_path")


class PretrainStage(Stage):
    """Causal-LM pretraining on packed raw text, from scratch or continued."""

    name = "pretrain"
    config_class = HfExtPretrainConfig
    trainer_class = HfExtPretrainTrainer
    card_description = CARD_DESCRIPTION
    loss_label = "loss (every token, nats)"
    takes_corpus = True
    evaluates_final_model = True
    card_template = "pretrain.md"

    def build_datasets(self, script_args, training_args, tokenizer) -> DatasetDict:
        """`train` and `test` with one `text` column of non-empty documents; TRL tokenizes and packs them."""
        splits, source = _text_splits(script_args, training_args)
        column = training_args.dataset_text_field
        checked = {}
        for split, rows in splits.items():
            if column not in rows.column_names:
                raise UserInputError(f"{source} [{split}]: no {column!r} column (has: {', '.join(rows.column_names)})")
            for index, text in enumerate(rows[column]):
                if not isinstance(text, str) or not text.strip():
                    raise UserInputError(f"{source} [{split}] row {index + 1}: {column!r} must be non-empty text, got {text!r:.60}")
            checked[split] = rows.select_columns([column])
        if len(checked["train"]) == 0:
            raise UserInputError(f"{source}: the training split is empty")
        return DatasetDict(checked)

    def load_tokenizer(self, recipe):
        check_model_source(recipe)
        return super().load_tokenizer(recipe)

    def new_tokenizer(self, recipe):
        """A SentencePiece tokenizer trained on the corpus' training split (cached)."""
        args, corpus = recipe.training_args, recipe.script_args.corpus
        if not corpus:
            raise UserInputError("pretrain: set tokenizer_name_or_path, or a corpus to train a tokenizer on")
        splits, _ = _text_splits(recipe.script_args, args)
        return corpus_tokenizer(splits["train"]["text"], args.tokenizer_vocab_size, name=corpus)

    def load_model(self, recipe, tokenizer):
        """A new model of `model_type` (vocabulary and special tokens from the tokenizer), or `model_name_or_path`."""
        from transformers import AutoModelForCausalLM

        from hf_ext.loading import load_model as load_named_model
        from hf_ext.loading import new_model

        args, model_args = recipe.training_args, recipe.model_args
        check_model_source(recipe)
        if not args.model_type:
            return load_named_model(model_args, trust_remote_code=args.trust_remote_code, trainable_adapter=True)
        fields = dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=args.max_length,
        )
        return new_model(
            AutoModelForCausalLM, args.model_type, args.config_overrides, args.seed, fields,
            attn_implementation=model_args.attn_implementation,
        )

    def final_metrics(self, trainer) -> dict:
        """Validation loss and perplexity of the final model, its size and the tokens it was trained on."""
        metrics: dict = {}
        args = trainer.args
        metrics["tokens_seen"] = (
            trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size * args.max_length
        )
        if trainer.eval_dataset is not None:
            evaluation = final_evaluation(trainer)
            metrics["validation"] = {
                k.removeprefix("eval_"): v for k, v in evaluation.items() if k not in ("epoch", "eval_num_tokens")
            }
            metrics["validation"]["blocks"] = len(trainer.eval_dataset)
            report = trainer.architecture_diagnostics()
            if report is not None:
                metrics[trainer.diagnostics.name] = report
        return metrics

    def card_data(self, recipe, metrics: dict) -> dict:
        return dict(library_name="transformers", pipeline_tag="text-generation", tags=["trl"])

    def card_variables(self, recipe, metrics: dict) -> dict:
        validation = metrics.get("validation", {})
        corpus = recipe.script_args.corpus
        return dict(
            data_description=f"`{corpus}` (hf_ext built-in corpus)" if corpus else f"`{recipe.script_args.dataset_name}`",
            block_length=recipe.training_args.max_length,
            tokens_seen=f"{metrics.get('tokens_seen', 0) / 1e6:.2f}M",
            validation_loss=f"{validation['loss']:.4f}" if "loss" in validation else "n/a",
            validation_perplexity=f"{validation['perplexity']:.2f}" if "perplexity" in validation else "n/a",
        )
