"""What a finished run leaves next to its model: `metrics.json` (written last, so its presence marks a finished run)
and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"


def loss_curve(log_history: list[dict]) -> dict[str, list]:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evaluation = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return {
        "step": [s for s, _ in train],
        "loss": [v for _, v in train],
        "eval_step": [s for s, _ in evaluation],
        "eval_loss": [v for _, v in evaluation],
    }


def plot_loss_curve(
    curve: dict[str, list],
    path: Path,
    title: str,
    ylabel: str = "loss (response tokens)",
    mean_train_loss: tuple[int, float] | None = None,
) -> None:
    """The train (and eval) loss per logged step. A run too short to log a step (`logging_steps` > `max_steps`) still
    gets its plot: the run's mean train loss at its last step, `mean_train_loss = (step, loss)`."""
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
    figure.savefig(path)
    plt.close(figure)


def write_metrics(output_dir: str | Path, metrics: dict) -> Path:
    """Write `metrics.json` atomically: a reader never sees a half-written file."""
    path = Path(output_dir) / METRICS_FILE
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(metrics, indent=2))
    os.replace(staging, path)
    return path


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / METRICS_FILE).is_file()
