"""DPO overhead: hf_ext's DPO step vs plain `trl.DPOTrainer` on the same pairs, and peak RSS of each.

Same model (real SmolLM2-135M-Instruct, 4-bit nf4 + LoRA r=16 all-linear, fp32 compute), same 2-digit addition
pairs (chosen = right sum, rejected = hard negative) as one chat turn, same batch, beta and seed. The trainers
alternate in one process, `--repeats` times each with a fresh model; seconds per optimizer step are medians (first
step excluded). Peak RSS: one child process per measurement, alternating. Writes
`benchmarks/results/dpo_overhead.json` and prints the Markdown table for `benchmarks/README.md`.

    python benchmarks/dpo_overhead.py [--repeats 3] [--steps 6] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from sft_overhead import SMOLLM2, child_peak_rss, interleaved_step_times, timing_summary

RESULTS = Path(__file__).parent / "results" / "dpo_overhead.json"


def build_trainer(kind: str, steps: int, batch_size: int, output_dir: str):
    import trl
    from datasets import Dataset

    from hf_ext.data.formats import FORMATS
    from hf_ext.data.pairs import task_pairs
    from hf_ext.data.tasks import TASKS
    from hf_ext.loading import load_model, load_tokenizer, peft_config
    from hf_ext.recipe import ModelArguments
    from hf_ext.trainers import dpo

    model_args = ModelArguments(model_name_or_path=SMOLLM2, load_in_4bit=True, use_peft=True)
    tokenizer = load_tokenizer(SMOLLM2)
    task = TASKS["addition"]
    pairs = task_pairs(task, task.splits(steps * batch_size * 2, 0, seed=0)["train"], seed=0)
    common = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=5e-5, beta=0.1,
        report_to=[], save_strategy="no", logging_steps=1000, activation_checkpointing=False, seed=0,
        disable_tqdm=True, max_length=256,
    )
    model = load_model(model_args)
    if kind == "hf_ext":
        messages = FORMATS["messages"]
        encoded = Dataset.from_dict({
            "prompt_ids": [messages.prompt_ids(p, tokenizer) for p in pairs["prompt"]],
            "chosen_ids": [messages.response_ids(p, c, tokenizer) for p, c in zip(pairs["prompt"], pairs["chosen"])],
            "rejected_ids": [messages.response_ids(p, r, tokenizer) for p, r in zip(pairs["prompt"], pairs["rejected"])],
        })
        return dpo.HfExtDPOTrainer(model=model, args=dpo.HfExtDPOConfig(**common), train_dataset=encoded, processing_class=tokenizer,
                           peft_config=peft_config(model_args))
    chat = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in pairs["prompt"]],
        "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
        "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
    })
    return trl.DPOTrainer(model=model, args=trl.DPOConfig(bf16=False, **common), train_dataset=chat,
                          processing_class=tokenizer, peft_config=peft_config(model_args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rss_child", choices=["hf_ext", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        with tempfile.TemporaryDirectory() as output_dir:
            build_trainer(args.rss_child, args.steps, args.batch_size, output_dir).train()
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return

    step_times = interleaved_step_times(build_trainer, args.repeats, args.steps, args.batch_size)
    rss = child_peak_rss(__file__, ("hf_ext", "trl"), args.batch_size)

    result = timing_summary("dpo_overhead", args, step_times, rss)
    median, peak = result["median_seconds_per_step"], result["median_peak_rss_mb"]
    result["rss_ratio_hf_ext_over_trl"] = peak["hf_ext"] / peak["trl"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print("| measure | hf_ext | plain `trl.DPOTrainer` | ratio |\n|---|---|---|---|")
    print(f"| DPO step, QLoRA, batch {args.batch_size} (s, median of {args.repeats}) | {median['hf_ext']:.3f} | "
          f"{median['trl']:.3f} | {result['time_ratio_hf_ext_over_trl']:.3f}x |")
    print(f"| peak RSS, 3 steps (MB, median of 2) | {peak['hf_ext']:.0f} | {peak['trl']:.0f} | {result['rss_ratio_hf_ext_over_trl']:.2f}x |")


if __name__ == "__main__":
    main()
