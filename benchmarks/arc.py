"""ARC grid models: training examples/s and voted-inference tasks/s per variant, next to transformers' Llama.

Every variant is built from its shipped recipe's architecture (recipes/arc/<variant>.yaml, hidden 128, 4 heads,
intermediate 384, 2 + 2 layers, the decoder-only variant 4 causal layers), fp32 on CPU, with a task embedding for
the recipe's 154 tasks. The data are real: batches of the recipe's training pairs (ARC-1 train equal-shape <= 10 and
the 42 ARC-1 eval equal-shape <= 10 tasks' demo pairs), built once by the stage's own dataset and collator, so every
model sees the same examples.

1. Training: forward + backward + AdamW step on a fixed cycle of `--batches` real batches of 16 examples;
   examples/s = 16 / median step time (the first two steps are warm-up).
2. Voted inference: `hf_ext.eval.arc.predict_task` (8 augmented views, inverted and voted into 2 attempts) over the
   first `--tasks` tasks of ARC-1 eval equal-shape <= 10; tasks/s = tasks / time.
3. Reference: transformers' `LlamaForCausalLM` (4 layers, same width, RoPE, SDPA) trained on exactly the token
   sequences the decoder-only variant builds (`[SEP] input rows [SEP] output rows [EOS]`, loss on the output) - the
   closest off-the-shelf model to variant 1. Its inference is not measured (it has no grid decoder).

Models alternate in one process (round-robin over `--repeats` rounds, a fresh model each round); medians are
reported. Writes `benchmarks/results/arc.json` and prints the Markdown table for `benchmarks/README.md`.

    python benchmarks/arc.py [--repeats 3] [--steps 12] [--tasks 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).parent / "results" / "arc.json"
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("decoder_only", "encoder_decoder", "grid2d", "grid2d_perminv", "champion")
BATCH = 16


def recipe(variant: str):
    from hf_ext.recipe import parse_recipe

    return parse_recipe(REPO / "recipes" / "arc" / f"{variant}.yaml", ["--output_dir", "/tmp/arc_benchmark"])


def build(kind: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ext.trainers.arc import ArcStage

    torch.manual_seed(seed)
    if kind == "llama":
        fields = recipe("decoder_only").training_args.config_overrides
        config = LlamaConfig(vocab_size=14, hidden_size=fields["hidden_size"], intermediate_size=fields["intermediate_size"],
                             num_hidden_layers=fields["num_encoder_layers"], num_attention_heads=fields["num_attention_heads"],
                             max_position_embeddings=2048, pad_token_id=10, bos_token_id=11, eos_token_id=13,
                             attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    return ArcStage().load_model(recipe(kind))


def real_batches(count: int, seed: int) -> dict[str, list[dict]]:
    """`count` batches of the recipe's training examples per input layout (with / without demo context)."""
    from hf_ext.data.arc import GridCollator
    from hf_ext.trainers.arc import ArcStage

    import numpy as np

    args = recipe("champion").training_args
    dataset = ArcStage().build_datasets(None, args)["train"]
    order = np.random.default_rng(seed).permutation(len(dataset))[: count * BATCH]
    examples = [dataset[int(i)] for i in order]
    chunks = [examples[i * BATCH: (i + 1) * BATCH] for i in range(count)]
    return {
        "plain": [GridCollator()(chunk) for chunk in chunks],
        "context": [GridCollator(context=True, max_context_pairs=args.max_context_pairs)(chunk) for chunk in chunks],
    }


def train_examples_per_second(kind: str, model, batches: dict, steps: int) -> float:
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    plain = batches["context" if kind == "champion" else "plain"]
    if kind == "llama":  # the decoder-only variant's own token sequences, as causal-LM labels
        serializer = build("decoder_only", 0)
        plain = []
        for batch in batches["plain"]:
            ids, mask, labels = serializer.serialize(batch["input_grids"], batch["labels"])
            plain.append({"input_ids": ids, "attention_mask": mask.long(), "labels": labels})
    times = []
    for step in range(steps + 2):
        batch = plain[step % len(plain)]
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def inference_tasks_per_second(model, tasks: dict) -> float:
    from hf_ext.data.arc import GridCollator, inference_augmentations
    from hf_ext.eval.arc import predict_task

    rows = {name: i for i, name in enumerate(model.config.task_names or [])}
    collator = GridCollator(context=model.config.variant == "champion", max_context_pairs=4)
    model.eval()
    start = time.perf_counter()
    for task_id, task in tasks.items():
        predict_task(model, task, rows.get(task_id), inference_augmentations(8), collator)
    return len(tasks) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=12)
    args = parser.parse_args()

    import torch

    import hf_ext  # noqa: F401
    from hf_ext.data.arc import load_subset

    batches = real_batches(args.batches, seed=0)
    tasks = dict(list(load_subset("arc1_eval_equal_shape_max10").items())[: args.tasks])
    kinds = (*VARIANTS, "llama")
    train = {kind: [] for kind in kinds}
    infer = {kind: [] for kind in VARIANTS}
    parameters = {}
    for round_index in range(args.repeats):
        order = kinds if round_index % 2 == 0 else kinds[::-1]
        for kind in order:
            model = build(kind, seed=round_index)
            parameters[kind] = sum(p.numel() for p in model.parameters())
            train[kind].append(train_examples_per_second(kind, model, batches, args.steps))
            if kind != "llama":
                infer[kind].append(inference_tasks_per_second(model, tasks))
            print(f"round {round_index} {kind}: {train[kind][-1]:.1f} examples/s"
                  + (f", {infer[kind][-1]:.2f} tasks/s" if kind != "llama" else ""), flush=True)
    result = {
        "settings": {**vars(args), "batch": BATCH, "torch_threads": torch.get_num_threads(),
                     "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__},
        "parameters": parameters,
        "train_examples_per_second": {k: statistics.median(v) for k, v in train.items()},
        "voted_inference_tasks_per_second": {k: statistics.median(v) for k, v in infer.items()},
        "raw": {"train": train, "inference": infer},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    llama = result["train_examples_per_second"]["llama"]
    print("\n| model | parameters | training examples/s | vs Llama | voted inference tasks/s (8 views) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        speed = result["train_examples_per_second"][kind]
        tasks_per_second = result["voted_inference_tasks_per_second"].get(kind)
        print(f"| {kind if kind != 'llama' else 'transformers Llama (reference)'} | {parameters[kind] / 1e3:.0f}K | "
              f"{speed:.1f} | {speed / llama:.2f}x | {'-' if tasks_per_second is None else f'{tasks_per_second:.2f}'} |")


if __name__ == "__main__":
    main()
