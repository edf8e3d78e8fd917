"""`hf-ext pipeline FILE`: generate SFT data -> SFT -> preference pairs -> DPO -> sequential evaluation.

Each step writes into `<output_dir>/<step>/` and runs the same command a user would (`hf-ext data ...`,
`hf-ext train ...`, `hf-ext eval ...`), with the step's keys from the pipeline file as `--key value` options.
A step whose outputs are complete and valid (a data file whose QC manifest verifies, a training folder with
`metrics.json`, an evaluation with `results.json`) is skipped; an interrupted step resumes (training from its last
checkpoint, generation from its partial file).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hf_ext.errors import UserInputError

STEPS = ("generate_sft", "sft", "make_pairs", "dpo", "evaluate")
TOP_LEVEL = ("output_dir", "model_name_or_path", "base_model_id", "task", "data_format", *STEPS)


def _options(step: dict) -> list[str]:
    argv: list[str] = []
    for key, value in step.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def run_pipeline(path: str | Path) -> dict:
    from hf_ext.cli import data_command, eval_command
    from hf_ext.data.manifest import verify_manifest
    from hf_ext.loading import release_memory
    from hf_ext.recipe import read_yaml_mapping
    from hf_ext.report import is_finished
    from hf_ext.train import run

    config = read_yaml_mapping(path)
    unknown = [key for key in config if key not in TOP_LEVEL]
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TOP_LEVEL)}")
    for key in ("output_dir", "model_name_or_path", "task"):
        if not config.get(key):
            raise UserInputError(f"{path}: missing key '{key}'")
    root = Path(config["output_dir"])
    base, task, data_format = config["model_name_or_path"], config["task"], config.get("data_format", "instruction")
    steps = {name: dict(config.get(name) or {}) for name in STEPS}
    sft_data, pairs = root / "generate_sft" / "sft.jsonl", root / "make_pairs" / "pairs.jsonl"
    sft_dir, dpo_dir, results = root / "sft", root / "dpo", root / "evaluate" / "results.json"

    def verified(data: Path) -> bool:
        try:
            verify_manifest(data)
            return True
        except UserInputError:
            return False

    def train(step: str, folder: Path, model: str, data: Path) -> None:
        options = steps[step]
        recipe = options.pop("recipe")
        overrides = ["--model_name_or_path", model, "--task", "", "--dataset_name", str(data), "--data_format",
                     data_format, "--output_dir", str(folder), "--resume_from_checkpoint", "true", *_options(options)]
        if config.get("base_model_id"):
            overrides += ["--base_model_id", config["base_model_id"]]
        run(recipe, overrides)

    plan = [
        ("generate_sft", lambda: verified(sft_data), lambda: data_command(
            ["generate-sft", "--model", base, "--task", task, "--output", str(sft_data), *_options(steps["generate_sft"])])),
        ("sft", lambda: is_finished(sft_dir), lambda: train("sft", sft_dir, base, sft_data)),
        ("make_pairs", lambda: verified(pairs), lambda: data_command(
            ["make-pairs", "--model", str(sft_dir), "--task", task, "--data_format", data_format, "--output", str(pairs),
             *_options(steps["make_pairs"])])),
        ("dpo", lambda: is_finished(dpo_dir), lambda: train("dpo", dpo_dir, str(sft_dir), pairs)),
        ("evaluate", lambda: results.is_file(), lambda: eval_command(
            ["--model", f"{base},{sft_dir},{dpo_dir}", "--task", task, "--data_format", data_format,
             "--output", str(results), *_options({"judge": base, **steps["evaluate"]})])),
    ]
    report = {"pipeline": str(path), "steps": {}}
    for name, complete, execute in plan:
        if complete():
            report["steps"][name] = {"status": "skipped (complete)"}
            print(f"pipeline: {name}: complete, skipped")
            continue
        print(f"pipeline: {name}: running")
        start = time.time()
        results.parent.mkdir(parents=True, exist_ok=True)
        execute()
        release_memory()
        report["steps"][name] = {"status": "ran", "seconds": round(time.time() - start, 1)}
    summary = json.loads(results.read_text())
    report["table"] = [
        {"model": label, "accuracy": m["accuracy"], "win_rate_vs_base": (m.get("judge_vs_first") or {}).get("win_rate")}
        for label, m in zip(("base", "sft", "dpo"), summary["models"])
    ]
    report["peak_rss_mb_of_evaluation"] = summary["peak_rss_mb"]
    (root / "pipeline.json").write_text(json.dumps(report, indent=2))
    print("\n| model | accuracy | win rate vs base (judge) |\n|---|---|---|")
    for row in report["table"]:
        win = "-" if row["win_rate_vs_base"] is None else f"{row['win_rate_vs_base']:.3f}"
        print(f"| {row['model']} | {row['accuracy']:.3f} | {win} |")
    return report
