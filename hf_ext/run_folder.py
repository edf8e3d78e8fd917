"""The run folder: the one owner of the files a run leaves next to its model, and of how they are written.

| file | written | holds |
|---|---|---|
| `recipe.yaml` | first, before training | the keys the recipe and command line set: `hf-ext train recipe.yaml` re-runs it |
| `training_args.json` | at every save | the trainer's arguments as JSON (never the pickled `training_args.bin`) |
| `arc_training.json` | after ARC training | which tasks' pairs (and test outputs) the model was trained on |
| `loss_curve.png` | after training | the train (and eval) loss per logged step |
| `README.md` | after training | the model card |
| `archive.json`, `best_state.json`, `discovery.json`, `reward_curve.png` | ttt_discover, every step (and in each checkpoint) | the state archive, the best verified state with its lineage, the per-step search record, its plot |
| `metrics.json` | last | every number of the run; its presence marks a finished run |
| `checkpoint-N/` | every `save_steps` (transformers) | weights, optimizer, scheduler, RNG, and `trainer_state.json` last |

Every file is written atomically (a staging file, then `os.replace`), so a reader, or a run killed mid-write, never
sees half a file. A checkpoint folder is written by transformers file by file; it counts as a checkpoint only once its
`trainer_state.json`, the last file transformers writes into it, reads back (`RunFolder.latest_checkpoint`), so a run
killed while saving resumes from the checkpoint before. Settings of a finished run are read back through
`hf_ext.recipe.saved_recipe`, which parses `recipe.yaml` with the stage's own defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_ext.errors import UserInputError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"
CARD_FILE = "README.md"
TRAINING_ARGS_FILE = "training_args.json"
TRAINING_RECORD_FILE = "arc_training.json"
ARCHIVE_FILE = "archive.json"
BEST_STATE_FILE = "best_state.json"
DISCOVERY_FILE = "discovery.json"
REWARD_CURVE_FILE = "reward_curve.png"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR folders
CHECKPOINT_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last into a checkpoint
# The log-history entry (and `metrics.json` key) counting the optimizer steps skipped for a non-finite gradient.
SKIPPED_STEPS_KEY = "nonfinite_steps_skipped"

logger = logging.getLogger("hf_ext")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)
    return path


def write_json_atomic(path: str | Path, data: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Build a folder under a staging name and move it to `target` only when the block finishes without error."""
    target = Path(target)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A recipe (or pipeline) file: a YAML mapping, read with `yaml.safe_load`; errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserInputError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def loss_curve(log_history: list[dict]) -> dict[str, list]:
    """The logged train and eval losses of a trainer's `state.log_history`, as `metrics.json` stores them. A step
    skipped for a non-finite gradient is left out: transformers logs it as the window's mean so far (0 when the
    window is that one step)."""
    skipped = {h["step"] for h in log_history if SKIPPED_STEPS_KEY in h}
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h and h["step"] not in skipped]
    evaluation = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return {
        "step": [s for s, _ in train],
        "loss": [v for _, v in train],
        "eval_step": [s for s, _ in evaluation],
        "eval_loss": [v for _, v in evaluation],
    }


class RunFolder:
    """The output folder of one run (`output_dir`), or a trained model's folder read back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # recipe.yaml
    def write_recipe(self, recipe) -> Path:
        """`recipe.yaml` from a parsed `hf_ext.recipe.Recipe`."""
        path = self.file(RECIPE_FILE)
        return write_text_atomic(path, recipe.to_yaml(saved_as=path))

    def has_recipe(self) -> bool:
        return self.file(RECIPE_FILE).is_file()

    def read_recipe(self) -> dict[str, Any]:
        """The saved recipe's keys as written (no defaults filled in), or {} for a folder hf_ext did not train."""
        path = self.file(RECIPE_FILE)
        return read_yaml_mapping(path) if path.is_file() else {}

    # metrics.json
    def start(self) -> None:
        """Create the folder and mark it unfinished until the new `metrics.json` lands."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.file(METRICS_FILE).unlink(missing_ok=True)

    def write_metrics(self, metrics: dict) -> Path:
        return write_json_atomic(self.file(METRICS_FILE), metrics)

    def read_metrics(self) -> dict:
        path = self.file(METRICS_FILE)
        if not path.is_file():
            raise UserInputError(f"{self.path}: no {METRICS_FILE} (the run did not finish)")
        return json.loads(path.read_text())

    def is_finished(self) -> bool:
        return self.file(METRICS_FILE).is_file()

    # checkpoints
    def checkpoints(self) -> list[Path]:
        """Every `checkpoint-N` folder, complete or not, oldest step first."""
        if not self.path.is_dir():
            return []
        found = [(int(match.group(1)), entry) for entry in self.path.iterdir()
                 if (match := CHECKPOINT_PATTERN.match(entry.name)) and entry.is_dir()]
        return [entry for _, entry in sorted(found)]

    @staticmethod
    def is_complete_checkpoint(checkpoint: Path) -> bool:
        """Whether transformers finished writing `checkpoint`: its trainer state, written last, reads back."""
        try:
            return isinstance(json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text()), dict)
        except (FileNotFoundError, NotADirectoryError, ValueError):  # other OS errors (EIO, EACCES) raise: the folder
            return False  # may be complete, and `latest_checkpoint` must not delete it

    @staticmethod
    def checkpoint_step(checkpoint: Path) -> int:
        """The optimizer step a complete checkpoint was saved at."""
        return int(json.loads((checkpoint / CHECKPOINT_STATE_FILE).read_text())["global_step"])

    def latest_checkpoint(self, remove_incomplete: bool = False) -> Path | None:
        """The newest complete checkpoint, or None. transformers' own `get_last_checkpoint` takes the highest
        step number, which after a kill during a save is a half-written folder (weights without optimizer or trainer
        state) that it then fails on or, worse, resumes from with a fresh optimizer. Incomplete folders newer than the
        one returned are deleted when `remove_incomplete` (the main process only), with one warning each."""
        latest = None
        for checkpoint in reversed(self.checkpoints()):
            if self.is_complete_checkpoint(checkpoint):
                latest = checkpoint
                break
            if remove_incomplete:
                logger.warning("%s: incomplete (the run was stopped while saving it); removed, resuming from the "
                               "checkpoint before", checkpoint)
                shutil.rmtree(checkpoint, ignore_errors=True)
        return latest

    # training record and arguments
    def write_training_record(self, record: dict) -> Path:
        return write_json_atomic(self.file(TRAINING_RECORD_FILE), record, indent=1)

    def read_training_record(self) -> dict:
        """`arc_training.json` (which tasks the model trained on), or {} when there is none."""
        path = self.file(TRAINING_RECORD_FILE)
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_training_args(self, json_text: str) -> Path:
        (self.path / "training_args.bin").unlink(missing_ok=True)  # transformers' pickle: never kept
        return write_text_atomic(self.file(TRAINING_ARGS_FILE), json_text)

    # the search of a ttt_discover run
    def write_discovery(self, archive: dict, best_state: dict, history: list[dict]) -> None:
        """The archive, the best state and the per-step record; `discovery.json` last (a reader of it finds the
        other two of the same step or a later one)."""
        write_json_atomic(self.file(ARCHIVE_FILE), archive, indent=1)
        write_json_atomic(self.file(BEST_STATE_FILE), best_state)
        write_json_atomic(self.file(DISCOVERY_FILE), {"steps": history}, indent=1)

    def read_discovery(self) -> tuple[dict | None, list[dict]]:
        """(archive, per-step record) of a folder a ttt_discover run wrote, or (None, []) when there is none."""
        if not self.file(ARCHIVE_FILE).is_file():
            return None, []
        history = json.loads(self.file(DISCOVERY_FILE).read_text())["steps"] if self.file(DISCOVERY_FILE).is_file() else []
        return json.loads(self.file(ARCHIVE_FILE).read_text()), history

    def plot_reward_curve(self, history: list[dict], title: str) -> Path:
        """`reward_curve.png`: per step, the best value found so far and the batch's mean and best reward."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in history]
        figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
        marker = "." if len(steps) < 40 else None
        axis.plot(steps, [h["best_value"] for h in history], label="best value so far", marker=marker)
        axis.plot(steps, [h["reward_max"] for h in history], label="best reward in the batch", marker=marker, alpha=0.7)
        axis.plot(steps, [h["reward_mean"] for h in history], label="mean reward in the batch", marker=marker, alpha=0.7)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("value / reward")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        return self._save_figure(figure, REWARD_CURVE_FILE)

    # card and plot
    def write_card(self, card) -> Path:
        """Save a `huggingface_hub.ModelCard` as the folder's README.md."""
        return write_text_atomic(self.file(CARD_FILE), str(card))

    def plot_loss_curve(
        self,
        curve: dict[str, list],
        title: str,
        ylabel: str = "loss (response tokens)",
        mean_train_loss: tuple[int, float] | None = None,
    ) -> Path:
        """`loss_curve.png`: the train (and eval) loss per logged step. A run too short to log a step
        (`logging_steps` > `max_steps`) still gets its plot: its mean train loss at its last step,
        `mean_train_loss = (step, loss)`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
        if curve["step"]:
            axis.plot(curve["step"], curve["loss"], label="train loss", marker="." if len(curve["step"]) < 40 else None)
        elif mean_train_loss is not None:
            axis.plot(*mean_train_loss, label="mean train loss (no step logged)", marker="s", linestyle="none")
        if curve["eval_step"]:
            axis.plot(curve["eval_step"], curve["eval_loss"], label="eval loss", marker="o")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        return self._save_figure(figure, LOSS_CURVE_FILE)

    def _save_figure(self, figure, name: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.file(name)
        staging = path.with_name(f"staging{os.getpid()}.{path.name}")  # matplotlib picks the format by suffix
        figure.savefig(staging)
        plt.close(figure)
        os.replace(staging, path)
        return path
