"""SDFT step vs SFT step on the same rows, and hf_ext's SDFT vs plain TRL's (issue 16).

Same model (real SmolLM2-135M-Instruct, 4-bit nf4 + LoRA r=16 all-linear, fp32 compute), the same sorting prompts
with their solved examples, batch 8, seed 0:
- `sft`: hf_ext's SFT trainer on prompt + demonstration as one chat turn (loss on the reply);
- `sdft`: hf_ext's SDFT trainer (the paper's method keys: one sampled completion per prompt, EMA LoRA teacher,
  forward KL over the full vocabulary, 3 tokens skipped), the demonstration in the teacher's prompt;
- `trl_sdft`: plain `trl.experimental.sdft.SDFTTrainer` with the same settings (the reference for hf_ext's own
  overhead: its teacher prompts and teacher-adapter start).
An SDFT step samples exactly `--completion_tokens` tokens per prompt, then runs the student (with gradient) and the teacher (without)
over them. The trainers alternate in one process, `--repeats` times each with a fresh model; seconds per optimizer
step are medians (first step excluded). Peak RSS: one child process per measurement, alternating.
Writes `benchmarks/results/sdft_overhead.json` and prints the Markdown table for `benchmarks/README.md`.

    python benchmarks/sdft_overhead.py [--repeats 3] [--steps 6] [--batch_size 8] [--completion_tokens 24]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from sft_overhead import SMOLLM2, child_peak_rss, interleaved_step_times, timing_summary

RESULTS = Path(__file__).parent / "results" / "sdft_overhead.json"
KINDS = ("sdft", "sft", "trl_sdft")
COMPLETION_TOKENS = 24
GENERATION_SECONDS: dict[str, list[float]] = {"sdft": [], "trl_sdft": []}  # per call of the trainer's sampling


def time_generation(trainer, kind: str):
    """`trainer` with its sampling (`_generate`, once per optimizer step here) timed into GENERATION_SECONDS, the
    first call of a run (warm-up, as the first step) excluded."""
    generate = trainer._generate
    calls = []

    def timed(prompt_ids):
        start = time.perf_counter()
        result = generate(prompt_ids)
        calls.append(time.perf_counter() - start)
        if len(calls) > 1:
            GENERATION_SECONDS[kind].append(calls[-1])
        return result

    trainer._generate = timed
    return trainer


def build_trainer(kind: str, steps: int, batch_size: int, output_dir: str):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from hf_ext.data.formats import FORMATS, encode_dataset
    from hf_ext.data.tasks import TASKS
    from hf_ext.loading import load_model, load_tokenizer, peft_config
    from hf_ext.recipe import ModelArguments
    from hf_ext.trainers import sdft, sft

    model_args = ModelArguments(model_name_or_path=SMOLLM2, load_in_4bit=True, use_peft=True, lora_dropout=0.0)
    tokenizer = load_tokenizer(SMOLLM2)
    rows = TASKS["sorting"].splits(steps * batch_size, 0, seed=0)["train"]
    common = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        learning_rate=2e-4, warmup_steps=0, report_to=[], save_strategy="no", logging_steps=1000, seed=0,
        disable_tqdm=True,
    )
    model = load_model(model_args)
    if kind == "sft":
        dataset = encode_dataset(rows, FORMATS["messages"], tokenizer, 256, "sorting")
        return sft.HfExtSFTTrainer(model=model, args=sft.HfExtSFTConfig(activation_checkpointing=False, **common),
                                   train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config(model_args))
    dataset = sdft.task_rows(rows, "messages")
    # Every sample exactly COMPLETION_TOKENS long, so the cost does not depend on where the model stops.
    method = dict(max_completion_length=COMPLETION_TOKENS, generation_kwargs={"min_new_tokens": COMPLETION_TOKENS},
                  activation_checkpointing=False)
    if kind == "sdft":
        trainer = sdft.HfExtSDFTTrainer(model=model, args=sdft.HfExtSDFTConfig(**method, **common),
                                        train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config(model_args))
        return time_generation(trainer, kind)
    paper = {key: getattr(sdft.HfExtSDFTConfig, key) for key in (
        "teacher_model_kind", "teacher_update_rate", "distillation_mode", "distillation_alpha",
        "num_loss_tokens_to_skip", "num_generations", "teacher_prompt_template", "max_prompt_length", "lr_scheduler_type",
    )}
    trainer = SDFTTrainer(model=model, args=SDFTConfig(bf16=False, **paper, **method, **common), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config(model_args))
    return time_generation(trainer, kind)


def peak_rss_child(mode: str, steps: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        build_trainer(mode, steps, batch_size, output_dir).train()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    global COMPLETION_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--completion_tokens", type=int, default=COMPLETION_TOKENS)
    parser.add_argument("--rss_child", choices=["sdft", "sft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    COMPLETION_TOKENS = args.completion_tokens
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.steps, args.batch_size)

    step_times = interleaved_step_times(build_trainer, args.repeats, args.steps, args.batch_size, kinds=KINDS)
    rss = child_peak_rss(__file__, ("sdft", "sft"), args.batch_size, extra=["--completion_tokens", str(args.completion_tokens)])

    result = timing_summary("sdft_overhead", args, step_times, rss, ratio=("sdft", "sft"))
    median, peak = result["median_seconds_per_step"], result["median_peak_rss_mb"]
    result["completion_tokens"] = args.completion_tokens
    result["time_ratio_sdft_over_trl_sdft"] = median["sdft"] / median["trl_sdft"]
    result["rss_ratio_sdft_over_sft"] = peak["sdft"] / peak["sft"]
    result["sampling_seconds_per_step"] = GENERATION_SECONDS
    result["median_sampling_seconds_per_step"] = {k: statistics.median(v) for k, v in GENERATION_SECONDS.items()}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print("| measure | SDFT (hf_ext) | reference | ratio |\n|---|---|---|---|")
    print(f"| step, QLoRA, batch {args.batch_size}, {args.completion_tokens}-token samples (s, median of {args.repeats}) | "
          f"{median['sdft']:.3f} | {median['sft']:.3f} (hf_ext SFT, same rows) | {result['time_ratio_sdft_over_sft']:.2f}x |")
    print(f"| same step (s, median of {args.repeats}) | {median['sdft']:.3f} | {median['trl_sdft']:.3f} (plain TRL "
          f"`SDFTTrainer`, same settings) | {result['time_ratio_sdft_over_trl_sdft']:.3f}x |")
    sampling = result["median_sampling_seconds_per_step"]["sdft"]
    print(f"| of which sampling the completions (s, median) | {sampling:.3f} | - | {sampling / median['sdft']:.0%} of the step |")
    print(f"| peak RSS, 3 steps (MB, median of 2) | {peak['sdft']:.0f} | {peak['sft']:.0f} (hf_ext SFT) | "
          f"{result['rss_ratio_sdft_over_sft']:.2f}x |")


if __name__ == "__main__":
    main()
