"""Which DPO settings improve on their SFT starting point (issue 19): a small recorded sweep, then 3 seeds.

Every run is `hf-ext train recipes/dpo.yaml` in its own process, on top of an SFT adapter, scored by exact match on
the task's 200 held-out additions before and after (greedy, the recipe's own evaluation). Two starting points:

- `recipe`: the `make demo` SFT adapter (`outputs/sft`, 80.5%), with the recipe's own pairs (chosen = the right sum,
  rejected = a hard negative), exactly `hf-ext train recipes/dpo.yaml --model_name_or_path outputs/sft`;
- `pipeline`: the stage-1 pipeline's SFT adapter (`outputs/stage1/sft`), with the pipeline's pairs file
  (`outputs/stage1/make_pairs/pairs.jsonl`: on-policy pairs from that adapter's own samples).

The settings compared (`SETTINGS`): TRL's plain sigmoid loss; sigmoid plus an NLL term on the chosen answers
(`loss_type: [sigmoid, sft]`, TRL 1.16's form of RPO's `rpo_alpha`); that at a higher beta and learning rate; and the
NLL term alone as a control (is it the preference term or the extra SFT that helps?).

    python benchmarks/dpo_sweep.py --start recipe --settings sigmoid sigmoid_sft --seeds 42
    python benchmarks/dpo_sweep.py --start recipe --settings sigmoid_sft --seeds 42 43 44

A finished run (its folder has metrics.json) is read, not re-run. Merges its rows into
benchmarks/results/dpo_sweep.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "dpo_sweep.json"

STARTS = {
    "recipe": {"model_name_or_path": "outputs/sft"},
    "pipeline": {"model_name_or_path": "outputs/stage1/sft", "task": "", "task_eval": "addition",
                 "dataset_name": "outputs/stage1/make_pairs/pairs.jsonl", "data_format": "instruction",
                 "max_steps": 40, "save_steps": 20},  # as the pipeline's dpo step
}
SETTINGS = {
    "sigmoid": {"loss_type": ["sigmoid"], "loss_weights": None, "beta": 0.1, "learning_rate": 5e-5},
    "sigmoid_sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "beta": 0.1, "learning_rate": 5e-5},
    "sigmoid_sft_beta0.5_lr1e-4": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "beta": 0.5,
                                   "learning_rate": 1e-4},
    "sft_only": {"loss_type": ["sft"], "loss_weights": None, "beta": 0.1, "learning_rate": 5e-5},
}


def run(start: str, setting: str, seed: int, root: Path, extra: list[str]) -> dict:
    folder = root / start / f"{setting}-seed{seed}"
    # the seed varies the training (data order, dropout, hard negatives), never the held-out split (task_seed 42)
    keys = {**STARTS[start], **SETTINGS[setting], "seed": seed, "task_seed": 42, "output_dir": str(folder)}
    task_eval = keys.pop("task_eval", None)
    if not (folder / "metrics.json").is_file():
        from hf_ext.pipeline import step_arguments

        command = [sys.executable, "-m", "hf_ext.cli", "train", "recipes/dpo.yaml", *step_arguments(keys), *extra]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=REPO)
    if task_eval and not (folder / "eval.json").is_file():  # a pairs-file run has no held-out task of its own
        subprocess.run([sys.executable, "-m", "hf_ext.cli", "eval", "--model", f"{keys['model_name_or_path']},{folder}",
                        "--task", task_eval, "--seed", "42", "--num_examples", "200", "--batch_size", "50",
                        "--max_new_tokens", "8", "--output", str(folder / "eval.json")], check=True, cwd=REPO)
    metrics = json.loads((folder / "metrics.json").read_text())
    if task_eval:
        models = json.loads((folder / "eval.json").read_text())["models"]
        before, after = models[0]["accuracy"], models[1]["accuracy"]
    else:
        before, after = metrics["accuracy_before"]["accuracy"], metrics["accuracy_after"]["accuracy"]
    return {"start": start, "setting": setting, "seed": seed, **SETTINGS[setting], "sft_accuracy": before,
            "dpo_accuracy": after, "gain_points": round(100 * (after - before), 2), "train_loss": metrics["train_loss"],
            "train_seconds": round(metrics["train_runtime_seconds"], 1), "folder": str(folder)}


def table(rows: list[dict]) -> str:
    lines = ["| start | setting | seeds | SFT | DPO, mean ± sd | gain (points) |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["start"], row["setting"]), []).append(row)
    for (start, setting), group in groups.items():
        after = [100 * r["dpo_accuracy"] for r in group]
        spread = f" ± {statistics.stdev(after):.1f}" if len(after) > 1 else ""
        gain = statistics.mean(r["gain_points"] for r in group)
        lines.append(f"| {start} | {setting} | {', '.join(str(r['seed']) for r in group)} | "
                     f"{100 * group[0]['sft_accuracy']:.1f}% | {statistics.mean(after):.1f}%{spread} | {gain:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", choices=list(STARTS), default="recipe")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--output_root", default=str(REPO / "outputs" / "dpo_sweep"))
    parser.add_argument("extra", nargs="*", help="more `--key value` options for every run (after --)")
    options = parser.parse_args()
    sys.path.insert(0, str(REPO))

    rows = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    for setting in options.settings:
        for seed in options.seeds:
            row = run(options.start, setting, seed, Path(options.output_root), options.extra)
            rows = [r for r in rows if (r["start"], r["setting"], r["seed"]) != (row["start"], setting, seed)] + [row]
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
