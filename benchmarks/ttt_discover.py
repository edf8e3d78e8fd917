"""TTT-Discover against Best-of-N and against search without training, at the same number of rollouts (issue 17).

On each built-in problem (`golomb_ruler`, `spread_points`) and seed, with SmolLM2-135M-Instruct (fp32, LoRA):
  (a) Best-of-N: the frozen model samples every rollout from the initial state (`sampler: fixed`, no reuse);
  (b) PUCT, frozen: the archive picks the parents as in TTT-Discover, the model never trains;
  (c) TTT-Discover: `recipes/ttt_discover.yaml` (the archive, entropic adaptive-beta advantages, KL shaping, LoRA).
All three sample `steps` batches of `groups_per_batch` x `group_size` completions with the same prompts, temperature
and length limit; (a) and (b) run the same problem, archive and prompt code as the stage, with `generate` directly
(they have nothing to train). Reports the best verified value per method (mean and spread over seeds), the curve of
the best value against rollouts (PNG), rollouts per second and where the time of a TTT-Discover step goes.

Each run is kept under --output_dir and skipped when complete, so an interrupted benchmark resumes (runs are matched
by folder name: delete the folder after changing --steps). Results are kept per problem in one JSON.

    python benchmarks/ttt_discover.py --problems golomb_ruler         # 10 steps (the recipe's), about 45 minutes here
    python benchmarks/ttt_discover.py --problems spread_points        # 10 steps, longer prompts: about 75 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "ttt_discover.yaml"
RESULTS = Path(__file__).parent / "results" / "ttt_discover.json"
METHODS = {"best_of_n": "(a) Best-of-N, frozen", "puct_frozen": "(b) PUCT search, frozen", "ttt_discover": "(c) TTT-Discover"}
COMPLETION_LENGTH = {"golomb_ruler": 64, "spread_points": 64}


def recipe_settings() -> dict:
    import yaml

    return yaml.safe_load(RECIPE.read_text())


def run_ttt_discover(problem: str, seed: int, folder: Path, steps: int) -> dict:
    """(c): the shipped recipe, resumed if interrupted, skipped if finished."""
    from hf_ext.loading import release_memory
    from hf_ext.run_folder import RunFolder
    from hf_ext.train import run

    if not RunFolder(folder).is_finished():
        overrides = ["--problem", problem, "--seed", str(seed), "--output_dir", str(folder), "--max_steps", str(steps),
                     "--max_completion_length", str(COMPLETION_LENGTH[problem]), "--resume_from_checkpoint", "true"]
        run(str(RECIPE), overrides)
        release_memory()
    metrics = RunFolder(folder).read_metrics()
    history = RunFolder(folder).read_discovery()[1]
    discovery = metrics["discovery"]
    return {
        "best_value": discovery["value"],
        "best_construction": discovery["state"]["construction"],
        "curve": [h["best_value"] for h in history],
        "valid_fraction": discovery["valid_fraction"],
        "rollouts": discovery["rollouts"],
        "seconds": discovery["seconds"],
        "train_runtime_seconds": metrics["train_runtime_seconds"],
    }


def run_frozen(model, tokenizer, problem_name: str, sampler: str, seed: int, folder: Path, steps: int) -> dict:
    """(a) or (b): the stage's problem, archive and prompts with the frozen model; cached as result.json."""
    import torch
    from transformers import set_seed

    from hf_ext.eval.discovery import SandboxLimits, get_problem
    from hf_ext.run_folder import write_json_atomic
    from hf_ext.trainers.puct_archive import PUCTArchive
    from hf_ext.trainers.ttt_discover import initial_archive, model_prompt

    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    settings = recipe_settings()
    groups, k = settings["groups_per_batch"], settings["group_size"]
    problem = get_problem(problem_name)
    archive = initial_archive(problem, PUCTArchive(sampler=sampler), groups)
    limits = SandboxLimits()
    set_seed(seed)
    curve, valid, seconds = [], 0, {"generation": 0.0, "verification": 0.0}
    tokenizer.padding_side = "left"
    for step in range(1, steps + 1):
        parents = archive.select(groups)
        prompts = [model_prompt(problem, p, tokenizer) for p in parents]  # the trainer's prompts, tokenized as TRL does
        if isinstance(prompts[0], list):
            prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
            batch = tokenizer([p for p in prompts for _ in range(k)], return_tensors="pt", padding=True,
                              add_special_tokens=False)
        else:
            batch = tokenizer([p for p in prompts for _ in range(k)], return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=COMPLETION_LENGTH[problem_name], pad_token_id=tokenizer.pad_token_id)
        seconds["generation"] += time.perf_counter() - start
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        start = time.perf_counter()
        for index, text in enumerate(texts):
            parent = parents[index // k]
            attempt = problem.attempt(problem.answer_prefix + text, parent.construction, parent.code, limits)
            valid += attempt.valid
            key = problem.key(attempt.construction) if attempt.valid else None
            archive.record(parent, attempt.construction, attempt.value if attempt.valid else None, key=key,
                           code=attempt.code, output=attempt.output, step=step)
        archive.flush()
        seconds["verification"] += time.perf_counter() - start
        curve.append(archive.best.value)
        print(f"  {sampler} seed {seed} step {step}: best {archive.best.value:.4f}", flush=True)
    result = {
        "best_value": archive.best.value,
        "best_construction": archive.best.construction,
        "curve": curve,
        "valid_fraction": valid / archive.total_visits,
        "rollouts": archive.total_visits,
        "seconds": seconds,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result_file, result)
    return result


def summarize(runs: dict) -> dict:
    """Mean, spread and per-seed best values per problem and method."""
    table = {}
    for problem, methods in runs.items():
        table[problem] = {}
        for method, seeds in methods.items():
            values = [r["best_value"] for r in seeds.values()]
            table[problem][method] = {
                "best_value_mean": statistics.mean(values),
                "best_value_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "best_value_per_seed": values,
                "valid_fraction_mean": statistics.mean(r["valid_fraction"] for r in seeds.values()),
            }
        best = table[problem]
        table[problem]["goals"] = {
            "c_beats_a": best["ttt_discover"]["best_value_mean"] > best["best_of_n"]["best_value_mean"],
            "c_beats_b": best["ttt_discover"]["best_value_mean"] > best["puct_frozen"]["best_value_mean"],
        }
    return table


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), dpi=120, squeeze=False)
    for axis, (problem, methods) in zip(axes[0], runs.items()):
        for method, seeds in methods.items():
            curves = [r["curve"] for r in seeds.values()]
            per_step = list(zip(*curves))
            rollouts_per_step = next(iter(seeds.values()))["rollouts"] / len(per_step)
            x = [(i + 1) * rollouts_per_step for i in range(len(per_step))]
            mean = [statistics.mean(v) for v in per_step]
            axis.plot(x, mean, label=METHODS[method], marker=".")
            axis.fill_between(x, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.15)
        axis.set_title(f"{problem}: best verified value (mean, min-max over seeds)")
        axis.set_xlabel("rollouts")
        axis.set_ylabel("best value so far")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--problems", default="golomb_ruler,spread_points")
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default: the recipe's max_steps).")
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "ttt_discover_benchmark"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    import hf_ext  # noqa: F401
    from hf_ext.loading import load_model, load_tokenizer, release_memory
    from hf_ext.recipe import ModelArguments

    settings = recipe_settings()
    steps = args.steps or settings["max_steps"]
    seeds = [int(s) for s in args.seeds.split(",")]
    problems = args.problems.split(",")
    root = Path(args.output_dir)
    runs: dict = {p: {m: {} for m in METHODS} for p in problems}
    started = time.time()
    tokenizer = load_tokenizer(settings["model_name_or_path"])
    model = load_model(ModelArguments(model_name_or_path=settings["model_name_or_path"], dtype="float32")).eval()
    for problem in problems:
        for seed in seeds:
            for method, sampler in (("best_of_n", "fixed"), ("puct_frozen", "puct")):
                runs[problem][method][seed] = run_frozen(
                    model, tokenizer, problem, sampler, seed, root / problem / method / f"seed{seed}", steps
                )
    del model
    release_memory()
    for problem in problems:
        for seed in seeds:
            runs[problem]["ttt_discover"][seed] = run_ttt_discover(
                problem, seed, root / problem / "ttt_discover" / f"seed{seed}", steps
            )
    table = summarize(runs)
    timing = {}
    for problem in problems:
        seconds = [r["seconds"] for r in runs[problem]["ttt_discover"].values()]
        runtimes = [r["train_runtime_seconds"] for r in runs[problem]["ttt_discover"].values()]
        rollouts = [r["rollouts"] for r in runs[problem]["ttt_discover"].values()]
        frozen = [r["seconds"]["generation"] for r in runs[problem]["best_of_n"].values()]
        timing[problem] = {
            "ttt_discover_rollouts_per_second": statistics.mean(n / t for n, t in zip(rollouts, runtimes)),
            "ttt_discover_seconds_per_step": statistics.mean(runtimes) / steps,
            "share_generation": statistics.mean(s["generation"] / t for s, t in zip(seconds, runtimes)),
            "share_verification": statistics.mean(s["verification"] / t for s, t in zip(seconds, runtimes)),
            "share_scoring_and_kl": statistics.mean((s["rollouts_total"] - s["generation"] - s["verification"]) / t
                                                    for s, t in zip(seconds, runtimes)),
            "share_training_step": statistics.mean(s["training"] / t for s, t in zip(seconds, runtimes)),
            "frozen_rollouts_per_second": statistics.mean(
                r["rollouts"] / g for r, g in zip(runs[problem]["best_of_n"].values(), frozen)
            ),
        }
    # one entry per problem, so that problems measured in separate invocations (other --steps) share the file
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"problems": {}}
    for problem in problems:
        result["problems"][problem] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "model": settings["model_name_or_path"],
            "settings": {"steps": steps, "groups_per_batch": settings["groups_per_batch"],
                         "group_size": settings["group_size"],
                         "rollouts_per_run": steps * settings["groups_per_batch"] * settings["group_size"],
                         "max_completion_length": COMPLETION_LENGTH[problem],
                         "learning_rate": settings["learning_rate"], "seeds": seeds},
            "summary": table[problem],
            "timing": timing[problem],
            "runs": {m: {str(s): r for s, r in seeds_.items()} for m, seeds_ in runs[problem].items()},
            "wall_seconds": time.time() - started,
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    every = {p: {m: {int(k): v for k, v in ms.items()} for m, ms in e["runs"].items()} for p, e in result["problems"].items()}
    plot(every, RESULTS.with_suffix(".png"))
    print("| problem | rollouts | method | best value (mean ± std) | per seed | valid rollouts |")
    print("|---|---|---|---|---|---|")
    for problem, entry in result["problems"].items():
        for method, label in METHODS.items():
            row = entry["summary"][method]
            per_seed = ", ".join(f"{v:.4f}" for v in row["best_value_per_seed"])
            print(f"| {problem} | {entry['settings']['rollouts_per_run']} | {label} | {row['best_value_mean']:.4f} ± "
                  f"{row['best_value_std']:.4f} | {per_seed} | {100 * row['valid_fraction_mean']:.1f}% |")
    print(json.dumps({p: e["summary"]["goals"] for p, e in result["problems"].items()}),
          json.dumps({p: e["timing"] for p, e in result["problems"].items()}, indent=1))


if __name__ == "__main__":
    main()
