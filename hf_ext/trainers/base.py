"""What every hf_ext stage config and trainer adds to its TRL parent."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_ext.errors import UserInputError
from hf_ext.model_card import describe_model
from hf_ext.run_folder import SKIPPED_STEPS_KEY, RunFolder, loss_curve

logger = logging.getLogger("hf_ext")

# The key of `build_datasets`' result that holds the task's held-out rows as generated (`prompt`, `answer`), which
# `Stage.task_accuracy` scores before and after training.
TASK_EVAL_SPLIT = "task_eval"


class NonFiniteTrainingError(UserInputError):
    """The loss or the gradient became NaN or infinite; the run stopped after saving the last good state."""


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class StageConfigMixin:
    """A recipe runs unchanged on a laptop and on a pod, so hardware-dependent settings follow the hardware:

    - precision: bf16 on a GPU that has it, fp32 on a CPU (TRL defaults to bf16 everywhere, which fails on a CPU);
    - several processes on a machine without CUDA: `use_cpu`, without which accelerate does not set up DDP over gloo
      and every process would train alone as rank 0.

    Every stage also takes `skip_nonfinite_steps` (see `StageTrainerMixin._get_grad_norm`).
    """

    skip_nonfinite_steps: bool = field(default=False, metadata={"help": (
        "When the loss or a gradient is NaN or infinite: false (default) saves a checkpoint of the last good state "
        "and stops with the step and the first module whose output was not finite; true skips that optimizer step "
        "(no update) and counts it in metrics.json as nonfinite_steps_skipped.")})

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_supported()
        if not self.use_cpu and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True
        super().__post_init__()


class StageTrainerMixin:
    """Checkpoints hold no pickle: the training arguments are saved as JSON instead of `training_args.bin`.

    (Weights are safetensors; optimizer, scheduler and RNG states are tensors that transformers reads back with
    `torch.load(weights_only=True)`, which cannot execute code.)

    Parameters matching the model's `_no_weight_decay_patterns` (e.g. mHC's mapping biases and gates) take no
    weight decay, on top of transformers' biases and norms. Checkpoint cards are hf_ext's (`create_model_card`), and
    the architecture's diagnostics (`hf_ext.models.extras`) are there for the stages to log.
    """

    def __init__(self, *args, render_card=None, **kwargs):
        """`render_card(metrics, model_summary)`: the run's model card (`Stage.render_card`), written at every
        checkpoint in place of TRL's generic one; None keeps the parent's card."""
        self.render_card = render_card
        self.nonfinite_batch = None  # this step's first micro-batch whose loss was not finite, for the diagnosis
        super().__init__(*args, **kwargs)
        if self.args.skip_nonfinite_steps and self.is_deepspeed_enabled:
            raise UserInputError("skip_nonfinite_steps: not available under DeepSpeed, whose engine steps the optimizer "
                                 "during the backward pass, before the gradient norm can be checked")

    def _run_epoch(self, *args, **kwargs):
        """transformers' epoch, except when the run already reached `max_steps`: resuming from the final checkpoint of
        a run killed before it finished (transformers 5.23-5.24 would train one step past `max_steps` there, as its
        loop checks the step count only after a step)."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_rng_state(self, output_dir):
        """Every rank's files are on disk before the main one writes `trainer_state.json`, the file that makes a
        checkpoint complete (`RunFolder.is_complete_checkpoint`): transformers writes the RNG states last but one and
        has no barrier there."""
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.nonfinite_batch is None and not torch.isfinite(loss).all():
            self.nonfinite_batch = inputs
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' gradient norm, taken before every optimizer step; a NaN or infinite one (from a non-finite
        loss on any micro-batch or rank, or a gradient) never reaches the optimizer. With `skip_nonfinite_steps` the
        gradients are dropped, so the step changes no weight (the schedule still advances); otherwise the weights,
        still those of the last good step, are saved as `checkpoint-<last good step>` (unless that checkpoint exists
        already) and the run stops with a `NonFiniteTrainingError` naming the step and where the batch first became
        non-finite.

        Left to the library: fp16 (its gradient scaler skips overflowing steps and lowers the scale itself) and
        DeepSpeed (its engine has stepped the optimizer already, inside the backward pass)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        nonfinite_batch, self.nonfinite_batch = self.nonfinite_batch, None
        if (grad_norm is None or math.isfinite(float(grad_norm)) or self.accelerator.scaler is not None
                or self.is_deepspeed_enabled):
            return grad_norm
        step = self.state.global_step + 1
        if self.args.skip_nonfinite_steps:
            model.zero_grad(set_to_none=True)
            skipped = self.skipped_nonfinite_steps() + 1
            logger.warning("step %d: gradient norm %s; step skipped (%d so far)", step, float(grad_norm), skipped)
            self.state.log_history.append({SKIPPED_STEPS_KEY: skipped, "step": step})
            return grad_norm
        model.zero_grad(set_to_none=True)
        where = ("the loss was finite on this rank: a gradient is not" if nonfinite_batch is None else
                 "the batch is not run again under FSDP" if self.is_fsdp_enabled else
                 self.first_nonfinite_output(model, nonfinite_batch))
        checkpoint = Path(self._get_output_dir(trial=None), f"checkpoint-{self.state.global_step}")
        if not RunFolder.is_complete_checkpoint(checkpoint):
            self._save_checkpoint(model, trial=None)
        raise NonFiniteTrainingError(
            f"step {step}: the gradient norm is {float(grad_norm)} ({where}); the last good state (step "
            f"{self.state.global_step}) is in {checkpoint}. Resume from it with skip_nonfinite_steps: true, or start a "
            "new run with a lower learning rate (a resume restores the checkpoint's learning rate)"
        )

    def skipped_nonfinite_steps(self) -> int:
        """How many optimizer steps this run (resumes included) skipped for a non-finite gradient."""
        return max((entry[SKIPPED_STEPS_KEY] for entry in self.state.log_history if SKIPPED_STEPS_KEY in entry),
                   default=0)

    @staticmethod
    def first_nonfinite_output(model, inputs) -> str:
        """Where `inputs` (a micro-batch whose loss was not finite) first make the forward pass non-finite: the first
        module, in call order, whose output holds a NaN or an infinity (a decoder layer's name says which layer; for
        mHC, `ffn_hc` / `attn_hc` name a hyper-connection), found by running the batch once more without gradient."""
        found: list[str] = []

        def check(name):
            def hook(module, args, output):
                if isinstance(output, dict):  # a ModelOutput too
                    output = list(output.values())
                tensors = output if isinstance(output, (tuple, list)) else [output]
                if not found and any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
                                     for t in tensors):
                    found.append(name)
            return hook

        handles = [module.register_forward_hook(check(name)) for name, module in model.named_modules() if name]
        try:
            with torch.no_grad():
                model(**{k: v for k, v in inputs.items() if torch.is_tensor(v)})
        except Exception as error:  # a diagnosis only (a DPO or GRPO batch is not `forward`'s keywords): the run stops
            return f"the batch could not be run again to find the layer: {type(error).__name__}"
        finally:
            for handle in handles:
                handle.remove()
        return f"first non-finite output: {found[0]}" if found else "the forward pass is finite: the gradient is not"

    @property
    def diagnostics(self):
        """The numbers the model's architecture reports about itself at evaluation (`hf_ext.models.extras`), or None."""
        from hf_ext.models.extras import extras_for

        return extras_for(self.accelerator.unwrap_model(self.model).config.model_type).diagnostics

    def architecture_diagnostics(self, eval_dataset=None) -> dict | None:
        """The architecture's diagnostics on the first validation batch (None when it declares none)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.diagnostics is None or dataset is None or len(dataset) == 0:
            return None
        model = self.accelerator.unwrap_model(self.model)
        batch = self.data_collator([dataset[i] for i in range(min(len(dataset), self.args.per_device_eval_batch_size))])
        return self.diagnostics.compute(model, batch["input_ids"].to(model.device))

    def create_model_card(self, *args, **kwargs):
        """hf_ext's card of the run so far (TRL calls this at every checkpoint, transformers before a push)."""
        if self.render_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            RunFolder(self.args.output_dir).write_card(self.progress_card())
        return None

    def _save_checkpoint(self, model, trial):
        """Each checkpoint folder holds the run's card too (PEFT writes a generic one into it), and so does the output
        folder for the stages whose parent (`transformers.Trainer`, TRL's experimental trainers) writes none."""
        super()._save_checkpoint(model, trial)
        if self.render_card is None or not self.is_world_process_zero():
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        card = self.progress_card()
        checkpoint = Path(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        for folder in (Path(self.args.output_dir), checkpoint):
            if folder.is_dir():
                RunFolder(folder).write_card(card)

    def progress_card(self):
        """The run's card at the current step."""
        progress = {"global_step": self.state.global_step, "loss_curve": loss_curve(self.state.log_history),
                    "in_progress": True}
        return self.render_card(progress, describe_model(self.accelerator.unwrap_model(self.model)))

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        patterns = [re.compile(p) for p in getattr(model, "_no_weight_decay_patterns", None) or []]
        return [name for name in names if not any(p.search(name) for p in patterns)]

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # transformers calls _save on every rank; only the saving one writes
            return
        from hf_ext.run_folder import RunFolder

        RunFolder(output_dir or self.args.output_dir).write_training_args(self.args.to_json_string())


def perplexity(loss: float) -> float:
    """`exp(loss)`, capped at `exp(50)` so an early, huge loss logs a number rather than `inf`."""
    return math.exp(min(loss, 50.0))


def wrap_peft(model, peft_config):
    """`model` with a new PEFT adapter when `peft_config` is given (what TRL's trainers do for themselves; the stages
    built on `transformers.Trainer` call this)."""
    if peft_config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def final_evaluation(trainer) -> dict:
    """The evaluation metrics of the final model: the ones the trainer logged at the last step when it evaluated there
    (`eval_strategy: steps` with `max_steps` a multiple of `eval_steps`), else a new `trainer.evaluate()`, so the final
    model is evaluated once."""
    step = trainer.state.global_step
    logged = [e for e in trainer.state.log_history if e.get("step") == step and any(k.startswith("eval_") for k in e)]
    if not logged or trainer.args.load_best_model_at_end:  # the saved model is then the best checkpoint's
        return trainer.evaluate()
    merged: dict = {}
    for entry in logged:  # evaluate() logs its metrics, then hf_ext's extras (perplexity, mHC numbers), at one step
        merged.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return merged


class Stage:
    """One training stage. The recipe's `stage:` name picks a subclass (`hf_ext.trainers.STAGES`), and `train.run`
    calls these methods in this order: `load_tokenizer`, `build_datasets`, `load_model`, `eval_dataset`, then
    `trainer_class(...).train()`, then `final_metrics` (on every rank) and `render_card` (on the main one).

    A subclass sets the class attributes and implements `build_datasets`; every other method has a default that
    fits a stage fine-tuning a named model (SFT, DPO). Adding a stage: docs/adding_a_stage.md.
    """

    name: str
    config_class: type  # the recipe's stage keys: a TRL config (or `transformers.TrainingArguments`) subclass
    trainer_class: type  # a TRL trainer (or `transformers.Trainer`) subclass taking `peft_config`
    card_description: str  # one sentence for the model card
    card_template: str = "fine_tuning.md"  # the stage's part of the model card, in model_cards/stages/
    loss_label: str = "loss (response tokens)"  # the loss plot's y label
    auto_class: str = "AutoModelForCausalLM"  # the transformers Auto class the card's snippets load the model with
    built_in_data: bool = False  # the stage reads its data from its own keys, not dataset_name / task / corpus
    takes_corpus: bool = False  # the stage accepts `corpus` (raw text or sequences)
    evaluates_final_model: bool = False  # `final_metrics` evaluates on the `test` split, whatever `eval_strategy`

    def load_tokenizer(self, recipe):
        """The tokenizer named by `tokenizer_name_or_path` (a key of the stages that build models from scratch), else
        the one of `model_name_or_path`, else `new_tokenizer(recipe)` (None is allowed: grids need no tokenizer)."""
        from hf_ext.loading import load_tokenizer

        named = getattr(recipe.training_args, "tokenizer_name_or_path", None) or recipe.model_args.model_name_or_path
        return load_tokenizer(named) if named else self.new_tokenizer(recipe)

    def new_tokenizer(self, recipe):
        """The tokenizer of a model built from scratch when the recipe names none."""
        raise UserInputError(f"stage {self.name}: set model_name_or_path (the model and its tokenizer)")

    def build_datasets(self, script_args, training_args, tokenizer) -> dict:
        """`{"train": ..., "test": ...}` (test optional) with the columns `trainer_class` needs, every row validated
        first (an error names the file, row and field); with a `task`, also `TASK_EVAL_SPLIT`, its held-out rows."""
        raise NotImplementedError(f"stage {self.name} must implement build_datasets")

    def load_model(self, recipe, tokenizer):
        """`model_name_or_path` through hf_ext's one loader (GGUF, 4-bit, an adapter that keeps training)."""
        from hf_ext.loading import load_model

        return load_model(
            recipe.model_args, trust_remote_code=recipe.training_args.trust_remote_code, trainable_adapter=True
        )

    def eval_dataset(self, datasets: dict, training_args):
        """The split the trainer evaluates on: `test` when the recipe evaluates during training or the stage
        evaluates its final model."""
        evaluates = self.evaluates_final_model or training_args.eval_strategy != "no"
        return datasets.get("test") if evaluates else None

    def task_accuracy(self, recipe, model, tokenizer, datasets: dict, label: str) -> dict:
        """`{"accuracy_before" | "accuracy_after": ...}`: exact-match accuracy of `model` on the held-out rows of the
        recipe's task that `build_datasets` kept (`datasets[TASK_EVAL_SPLIT]`, encoded as in training); {} when the
        recipe has no task. `label` is "before training" or "after training"."""
        rows = datasets.get(TASK_EVAL_SPLIT)
        if rows is None:
            return {}
        from hf_ext.data.formats import detect_format
        from hf_ext.data.tasks import TASKS
        from hf_ext.eval.accuracy import evaluate_task

        args = recipe.script_args
        data_format = detect_format(rows.column_names, args.data_format, f"task {args.task}")
        result = evaluate_task(
            model, tokenizer, TASKS[args.task], rows, data_format, args.eval_batch_size, args.eval_max_new_tokens,
            desc=f"Accuracy {label}",
        )
        logger.info("accuracy %s: %.3f", label, result["accuracy"])
        return {f"accuracy_{label.split()[0]}": result}

    def final_metrics(self, trainer) -> dict:
        """Metrics of the final model, added to `metrics.json` (called on every rank: evaluation is collective)."""
        return {}

    def render_card(self, recipe, metrics: dict, model_summary: dict, model_id: str | None = None):
        """The model card after (or, at a checkpoint, during) the run: `hf_ext.model_card.render_card` with this
        stage's `card_template`, `card_data` and `card_variables`; `model_id` is the name its snippets load."""
        from hf_ext.model_card import render_card

        return render_card(recipe, self, metrics, model_summary, model_id)

    def card_data(self, recipe, metrics: dict) -> dict:
        """The card's front matter (`ModelCardData` fields) beyond the license, name and the tags every card has
        (`hf_ext`, the stage, the model_type): a fine-tuned model's, with the base model and the task accuracy."""
        from huggingface_hub import EvalResult

        from hf_ext.model_card import hub_base_model

        model_args, task = recipe.model_args, recipe.script_args.task
        after = metrics.get("accuracy_after")
        eval_results = None
        if after is not None:
            eval_results = [
                EvalResult(
                    task_type="text-generation",
                    dataset_type=f"hf_ext/{task}",
                    dataset_name=f"hf_ext {task} (held-out split)",
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_name="exact match",
                    metric_value=round(after["accuracy"], 4),
                )
            ]
        adapter_tags = ["lora", "qlora"] if model_args.use_peft and model_args.load_in_4bit else []
        return dict(
            base_model=hub_base_model(recipe),
            library_name="peft" if model_args.use_peft else "transformers",
            pipeline_tag="text-generation",
            tags=["trl", *adapter_tags],
            eval_results=eval_results,
        )

    def card_variables(self, recipe, metrics: dict) -> dict:
        """The variables of `model_cards/stages/<card_template>` (a fine-tuned model's by default)."""
        from hf_ext.model_card import hub_base_model

        model_args, script_args = recipe.model_args, recipe.script_args
        is_adapter = bool(model_args.use_peft)
        base_reference = hub_base_model(recipe) or model_args.model_name_or_path
        before, after = metrics.get("accuracy_before"), metrics.get("accuracy_after")
        curve = metrics.get("loss_curve", {})
        return dict(
            summary=f"{recipe.stage.upper()} of {base_reference}"
            + (f" on the `{script_args.task}` task." if script_args.task else f" on {script_args.dataset_name}."),
            adapter_kind="LoRA adapter" if is_adapter else "model",
            data_description=(
                f"{script_args.task_train_size} generated `{script_args.task}` examples"
                if script_args.task
                else f"`{script_args.dataset_name}`"
            ),
            data_format=metrics.get("data_format", script_args.data_format),
            final_loss=f"{curve['loss'][-1]:.4f}" if curve.get("loss") else "n/a",
            quantization="4-bit nf4 (bitsandbytes)" if model_args.load_in_4bit else model_args.dtype,
            lora=(
                f"r={model_args.lora_r}, alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}, "
                f"targets={model_args.lora_target_modules}"
                if is_adapter
                else "none (full fine-tuning)"
            ),
            task=script_args.task,
            eval_examples=after["num_examples"] if after else None,
            accuracy_before=before["accuracy"] if before else None,
            accuracy_after=after["accuracy"] if after else None,
        )
