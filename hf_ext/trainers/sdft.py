"""Self-distillation fine-tuning (SDFT, arXiv 2601.19897) on TRL's experimental `SDFTTrainer`, with the paper's setup.

The student sees the prompt only. The teacher is the same model with a demonstration in its prompt (the paper's
template). The student samples one completion per prompt, and the loss is the per-token divergence between the
teacher's and the student's next-token distributions on that completion. The teacher is an EMA of the student
(rate 0.01): with LoRA, a second adapter `teacher`.

hf_ext's defaults are the paper's and the official code's (`docs/stages/sdft.md` has the table), not TRL's. Where
TRL 1.16 falls short (specs/sdft.md, S1-S6):
- S1: a model built or loaded in memory gets a deep-copied teacher, not one re-read from a Hub id it does not have;
- S4: teacher prompts have their own limit (`max_teacher_prompt_length`), are never truncated, and a demonstration
  that does not fit is a data error before any model loads;
- S5: the defaults below;
- S6: a `teacher` adapter that already exists (a resumed run's, restored by transformers) is reused, not reset;
- S2: the LoRA EMA teacher adapter starts as a copy of the student's adapter (the paper's teacher starts as the
  model being trained), not at zero. Zero is the base model: a run that continues an adapter (task B after task A)
  would distil from a teacher without task A, and even a fresh adapter's teacher would hold only w² of the
  student's ΔW after n steps (w = 1-(1-rate)^n) where a full-weight EMA holds w. From the copy it holds w, up to
  -w(1-w)·dB·dA, the product of the two factors' drifts since the start; A and B are still averaged separately.
  `teacher_adapter_init: zero` is TRL's behaviour;
- S3 (importance-sampling correction only matters with vLLM) is documented, not changed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import Dataset, DatasetDict
from trl.data_utils import is_conversational
from trl.experimental.sdft import SDFTConfig, SDFTTrainer
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder
from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback, SyncTeacherModelCallback

from hf_ext.data.sources import describe_source, load_splits
from hf_ext.errors import UserInputError
from hf_ext.trainers.base import TASK_EVAL_SPLIT, Stage, StageConfigMixin, StageTrainerMixin

CARD_DESCRIPTION = (
    "Self-distillation fine-tuning (a `trl.experimental.sdft.SDFTTrainer` subclass): the model, shown a "
    "demonstration, teaches itself without it, on its own samples (forward KL over the full vocabulary, EMA teacher)."
)
# The official code's teacher prompt (main.py), without its leading and trailing newline.
PAPER_TEACHER_TEMPLATE = (
    "{prompt}\n\nThis is an example for a response to the question:\n{privileged_context}\n\n"
    "Now answer with a response of your own, including the thinking process."
)
PRESETS = {
    "paper": {},  # forward KL, the setting of every published number (official README, paper v2)
    "paper_v1_reverse": {"distillation_alpha": 1.0},  # reverse KL, as paper v1's text describes it
}
TEACHER_ADAPTER = "teacher"
logger = logging.getLogger("hf_ext")


@dataclass
class HfExtSDFTConfig(StageConfigMixin, SDFTConfig):
    """`trl.experimental.sdft.SDFTConfig` with the paper's defaults, a teacher prompt limit of its own and presets."""

    teacher_model_kind: str = field(
        default="ema", metadata={"help": "ema (paper), base (the initial model) or live (the student itself)."}
    )
    teacher_update_rate: float = field(default=0.01, metadata={"help": "EMA rate: teacher = (1-a) teacher + a student."})
    distillation_mode: Literal["sampled_token", "full_logits", "topk_logits"] = field(
        default="full_logits", metadata={"help": "full_logits (paper: the whole vocabulary), topk_logits, sampled_token."}
    )
    distillation_alpha: float = field(
        default=0.0, metadata={"help": "0: forward KL(teacher||student) (paper), 1: reverse KL, between: JSD."}
    )
    num_loss_tokens_to_skip: int = field(
        default=3, metadata={"help": "First completion tokens left out of the loss (paper: 3, against 'Based on the example')."}
    )
    num_generations: int = field(default=1, metadata={"help": "Completions sampled per prompt (paper: 1)."})
    teacher_prompt_template: str = field(
        default=PAPER_TEACHER_TEMPLATE,
        metadata={"help": "The teacher's prompt; must contain {prompt} and {privileged_context} (default: the paper's)."},
    )
    max_prompt_length: int | None = field(default=2048, metadata={"help": "Student prompt limit (left-truncated)."})
    max_teacher_prompt_length: int = field(
        default=8192, metadata={"help": "Teacher prompt limit in tokens; a longer teacher prompt is a data error."}
    )
    max_completion_length: int | None = field(default=2048, metadata={"help": "Tokens sampled per completion."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Paper grid: 5e-6, 1e-5, 5e-5."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(default=10, metadata={"help": "Warm-up optimizer steps (a value below 1: a fraction)."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Prompts per device and micro-batch."})
    gradient_accumulation_steps: int = field(default=32, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs (paper: 2 for skills, 4 for knowledge)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (paper: 0)."})
    teacher_adapter_init: Literal["student", "zero"] = field(
        default="student",
        metadata={"help": "LoRA EMA teacher's first weights: student (a copy of the adapter being trained, as the "
                          "paper's teacher) or zero (TRL: the base model)."},
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "paper (the defaults) or paper_v1_reverse (sets distillation_alpha 1.0: reverse KL).",
                  "choices": list(PRESETS)},
    )

    def __post_init__(self):
        for key, value in PRESETS.get(self.preset, {}).items():
            setattr(self, key, value)
        for placeholder in ("{prompt}", "{privileged_context}"):
            if placeholder not in self.teacher_prompt_template:
                raise UserInputError(f"teacher_prompt_template: must contain {placeholder}, got {self.teacher_prompt_template!r}")
        if self.teacher_adapter_init not in ("student", "zero"):
            raise UserInputError(f"teacher_adapter_init: must be student or zero, got {self.teacher_adapter_init!r}")
        if self.generate_from_teacher:  # TRL encodes those prompts with the student's limit, cutting the question (S4)
            raise UserInputError("generate_from_teacher: not supported by stage sdft (sampling is from the student, as in the paper)")
        if self.max_prompt_length is not None and self.max_teacher_prompt_length < self.max_prompt_length:
            raise UserInputError(
                f"max_teacher_prompt_length ({self.max_teacher_prompt_length}) must be at least max_prompt_length "
                f"({self.max_prompt_length}): the teacher's prompt holds the student's plus the demonstration"
            )
        try:
            super().__post_init__()
        except ValueError as error:  # TRL's checks (batch divisibility, sampled_token needs alpha 1)
            raise UserInputError(str(error)) from None


def teacher_prompt(template: str, prompt: str | list[dict], privileged_context: str) -> str | list[dict]:
    """The teacher's prompt: `template` filled with the question and the demonstration; for a conversation, its last
    user turn is replaced by the filled template (earlier turns kept)."""
    if isinstance(prompt, list):
        filled = template.format(prompt=prompt[-1]["content"], privileged_context=privileged_context)
        return [*prompt[:-1], {"role": "user", "content": filled}]
    return template.format(prompt=prompt, privileged_context=privileged_context)


def encode_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of prompts as TRL's SDFT trainer encodes them: a conversation through the chat template with the
    generation prompt, text as it is."""
    if is_conversational({"prompt": prompts[0]}):
        return tokenizer.apply_chat_template(
            prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )["input_ids"]
    return tokenizer(text=prompts)["input_ids"]


class TeacherContextBuilder(DemonstrationTeacherContextBuilder):
    """TRL's builder, with the teacher prompt encoded to its own limit instead of the student's (S4)."""

    def _compose_teacher_prompt(self, prompt, privileged_context):
        return teacher_prompt(self.trainer.args.teacher_prompt_template, prompt, privileged_context)

    def build(self, prompts, privileged_contexts, completion_ids, completion_mask):
        import torch
        from trl.trainer.utils import pad

        trainer = self.trainer
        teacher_prompts = [self._compose_teacher_prompt(p, c) for p, c in zip(prompts, privileged_contexts, strict=True)]
        ids = encode_prompts(trainer.processing_class, teacher_prompts, trainer.chat_template_kwargs)
        longest = max(len(row) for row in ids)
        if longest > trainer.args.max_teacher_prompt_length:  # the stage checked every row before training
            raise ValueError(f"teacher prompt of {longest} tokens > max_teacher_prompt_length")
        device = completion_ids.device
        rows = [torch.tensor(row) for row in ids]
        prompt_ids = pad(rows, padding_value=trainer._tokenizer.pad_token_id, padding_side="left").to(device)
        prompt_mask = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="left").to(device)
        return {
            "teacher_input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "teacher_attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
        }


class TeacherAdapterEMACallback(PEFTAdapterEMACallback):
    """TRL's EMA `teacher` LoRA adapter, starting as a copy of the student's adapter (S2; `from_student=False`: at
    zero, as TRL) and surviving a resume (S6): transformers restores every adapter of the checkpoint, teacher
    included, and TRL's callback would then re-add the teacher at zero; an existing teacher adapter is reused with
    its weights instead."""

    def __init__(self, *args, from_student: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.from_student = from_student

    def _initialize_teacher_adapter(self):
        if self._initialized:
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
        if self.teacher_adapter_name not in model.peft_config:
            super()._initialize_teacher_adapter()
            if not self.from_student:
                return
            student = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
            active = model.active_adapter
            model.set_adapter(self.teacher_adapter_name)
            set_peft_model_state_dict(model, student, adapter_name=self.teacher_adapter_name)
            model.set_adapter(active)
        weights = get_peft_model_state_dict(model, adapter_name=self.teacher_adapter_name)
        self.shadow_weights = {key: value.detach().clone() for key, value in weights.items()}
        self._initialized = True


class HfExtSDFTTrainer(StageTrainerMixin, SDFTTrainer):
    _tag_names = ["trl", "sdft", "hf_ext"]
    _name = "SDFT"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_context_builder = TeacherContextBuilder(self)
        self._warned_unscored = False

    def _record_completion_metrics(self, mode: str, batch) -> None:
        """TRL's completion metrics, plus `completions/unscored_ratio`: the share of the generation batch (every
        completion of an optimizer step) no longer than `num_loss_tokens_to_skip`, which have no token in the loss.
        When it is 1 in training, the step's loss and gradient are exactly zero (the model answers in fewer tokens
        than are skipped); that is warned about once."""
        super()._record_completion_metrics(mode, batch)
        skip = self.args.num_loss_tokens_to_skip
        unscored = (batch["completion_mask"].sum(dim=1) <= skip).float()
        ratio = self.accelerator.gather(unscored).mean().item()
        self._metrics[mode]["completions/unscored_ratio"].append(ratio)
        if mode == "train" and ratio == 1.0 and not self._warned_unscored:
            self._warned_unscored = True
            logger.warning(
                "sdft: in optimizer step %d every completion is at most num_loss_tokens_to_skip=%d tokens long, so "
                "the loss and its gradient are zero; for answers this short lower num_loss_tokens_to_skip",
                self.state.global_step + 1, skip,
            )

    def _setup_teacher_model(self) -> None:
        from accelerate.utils import is_peft_model

        kind = self.args.teacher_model_kind
        if kind == "ema" and self._use_peft_ema_teacher_adapter():
            self.add_callback(
                TeacherAdapterEMACallback(
                    model=self.model, teacher_adapter_name=TEACHER_ADAPTER, update_rate=self.args.teacher_update_rate,
                    sync_steps=self.args.teacher_sync_steps, accelerator=self.accelerator,
                    from_student=self.args.teacher_adapter_init == "student",
                )
            )
            self.teacher_model = self.model
            return
        if kind == "live" or is_peft_model(self.model) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._setup_teacher_model()
        # S1: TRL re-reads the teacher from the student's Hub id, which a model built or converted in memory (an
        # hf_ext architecture from scratch, a GGUF conversion) does not have; an unsharded copy is the same weights.
        teacher = copy.deepcopy(self.accelerator.unwrap_model(self.model)).requires_grad_(False).eval()
        self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        if kind == "ema":
            self.add_callback(SyncTeacherModelCallback(teacher_model=self.teacher_model, accelerator=self.accelerator))


class SDFTStage(Stage):
    """Self-distillation fine-tuning from demonstrations (the model is its own teacher, on its own samples)."""

    name = "sdft"
    config_class = HfExtSDFTConfig
    trainer_class = HfExtSDFTTrainer
    card_description = CARD_DESCRIPTION
    loss_label = "distillation loss (per completion token)"

    def build_datasets(self, script_args, training_args: HfExtSDFTConfig, tokenizer) -> DatasetDict:
        """`train` (and `test`) rows of `prompt` (text, or a conversation ending with a user turn) and
        `privileged_context` (the demonstration); from a task, the prompt in the recipe's `data_format` and the
        task's solved example as the demonstration. Every teacher prompt must fit `max_teacher_prompt_length`."""
        splits = load_splits(script_args, seed=training_args.seed)
        source = describe_source(script_args)
        task_eval = splits.get("test") if script_args.task else None
        if script_args.task:
            splits = DatasetDict({name: task_rows(rows, script_args.data_format) for name, rows in splits.items()})
        checked = DatasetDict(
            {name: validated_rows(rows, training_args, tokenizer, f"{source} [{name}]") for name, rows in splits.items()}
        )
        if len(checked["train"]) == 0:
            raise UserInputError(f"{source}: the training split is empty")
        if task_eval is not None:
            checked[TASK_EVAL_SPLIT] = task_eval
        return checked


def task_rows(rows: Dataset, data_format: str) -> Dataset:
    """A task's rows as SDFT rows: the prompt (a user turn for `messages`, text for `prompt_completion`) and the solved
    completion as the demonstration."""
    if data_format not in ("messages", "prompt_completion", "auto"):
        raise UserInputError(f"data_format: stage sdft takes messages or prompt_completion prompts, not {data_format}")
    as_turn = data_format == "messages"
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] if as_turn else p for p in rows["prompt"]],
            "privileged_context": list(rows["completion"]),
        }
    )


def validated_rows(rows: Dataset, args: HfExtSDFTConfig, tokenizer, source: str) -> Dataset:
    """`rows` with exactly the columns `prompt` and `privileged_context`, every row checked (one-line error naming
    `source` and the row)."""
    missing = [column for column in ("prompt", "privileged_context") if column not in rows.column_names]
    if missing:
        raise UserInputError(f"{source}: no column {', '.join(missing)} (has: {', '.join(rows.column_names)})")
    prompts, contexts = list(rows["prompt"]), [_as_text(c) for c in rows["privileged_context"]]
    for index, (prompt, context) in enumerate(zip(prompts, contexts)):
        problem = _prompt_problem(prompt) or (None if context.strip() else "privileged_context (the demonstration) is empty")
        if problem:
            raise UserInputError(f"{source} row {index + 1}: {problem}")
    teacher_prompts = [teacher_prompt(args.teacher_prompt_template, p, c) for p, c in zip(prompts, contexts)]
    teacher_ids = encode_prompts(tokenizer, teacher_prompts, args.chat_template_kwargs)
    for index, ids in enumerate(teacher_ids):
        if len(ids) > args.max_teacher_prompt_length:
            raise UserInputError(
                f"{source} row {index + 1}: the teacher prompt is {len(ids)} tokens, more than max_teacher_prompt_length "
                f"{args.max_teacher_prompt_length} (shorten the demonstration or raise the limit)"
            )
    return Dataset.from_dict({"prompt": prompts, "privileged_context": contexts})


def _as_text(context: Any) -> str:
    """A demonstration as text: a string, or the contents of a list of messages joined by newlines."""
    if isinstance(context, list):
        return "\n".join(str(message.get("content", "")) for message in context if isinstance(message, dict))
    return "" if context is None else str(context)


def _prompt_problem(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return None if prompt.strip() else "prompt is empty"
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        if prompt[-1].get("role") != "user":
            return f"a conversation prompt must end with a user turn, ends with {prompt[-1].get('role')!r}"
        return None if str(prompt[-1].get("content", "")).strip() else "the last user turn is empty"
    return f"prompt must be text or a list of messages, got {type(prompt).__name__}"
