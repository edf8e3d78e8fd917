"""mHC cost: hf_ext's mHC LM (4 residual streams), eager and fused, vs transformers' `LlamaForCausalLM` of the same shape.

Both models are built from one dict of shared Llama fields (`MHCConfig` subclasses `LlamaConfig`), CPU, fp32,
`attn_implementation="sdpa"`, the same seed before each build. The default shape is recipes/pretrain_mhc.yaml's
(vocab 8192, hidden 384, intermediate 1024, 6 layers, 6 heads, 2 KV heads, tied embeddings, sequence 256,
batch 16; mHC with hc_mult 4, 20 Sinkhorn iterations, learned collapse), mHC once with `hc_kernel="eager"` and once
with `hc_kernel="compiled"` (the hyper-connection math fused by torch.compile, what `"auto"` trains with where a
compiler exists), and for decoding also with `hc_kernel="auto"` (the default: on a CPU, decoding steps call the C++
kernels of hyper_connection_cpu.py). The models alternate in one process, the first one of each repeat rotating too,
a freshly built model each time; we report medians:

1. training step: forward + backward + `torch.optim.AdamW` step (the recipe's lr, betas and weight decay, no
   gradient clipping) on one fixed random batch; seconds per step are the median over the steps of a run (the first
   step is warm-up and excluded), then the median over the repeats. One untimed 2-step run per model warms up the
   process first.
2. decode with KV cache: greedy `model.generate` (batch 1, 32-token random prompt, exactly `--decode_tokens` new
   tokens via `min_new_tokens`). Tokens/s = `(N - 1) / (t(N tokens) - t(1 token))`, each t the median of 3 calls:
   the 1-token call is the prefill plus the first token, so the difference is N - 1 cached decode steps, with
   generate's own per-token work (logits processors, stopping criteria) included for both models.
3. peak RSS: a high-water mark needs a process of its own, so each model runs in a child process (this script with
   `--rss_child MODEL`) that builds it and trains `--steps` steps; 2 children per model, alternating. Two marks: the
   whole run's (compilation included), and the steady state's: `VmHWM` reset after the first step (writing 5 to
   /proc/self/clear_refs), then the peak of the later steps. Parameter counts of the models too.
4. compile time, paid once per process: in the same children, with an empty inductor cache of their own
   (`TORCHINDUCTOR_CACHE_DIR`), the first training step minus the median of the later ones, and the same for the
   first `generate` call (prefill and single-token graphs) minus a later one.
5. `--profile`: the top operators by self CPU time over 2 training steps of each mHC kernel (torch.profiler, after
   warm-up), into the JSON and printed.

`--widths 384,768` repeats the training-step comparison at other hidden sizes (head_dim 64, 3 query heads per KV
head, intermediate 8/3 x hidden) to show how the overhead (memory traffic on the n x C stream tensors) shrinks
relative to the C^2 matmuls as C grows. Writes `benchmarks/results/mhc.json` and prints the Markdown table for
`benchmarks/README.md`.

    python benchmarks/mhc.py [--repeats 3] [--steps 6] [--decode_tokens 128] [--widths 384,768] [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).parent / "results" / "mhc.json"
MODELS = ("mhc_eager", "mhc_compiled", "llama")
# `auto` trains on the compiled path (the same graphs as `compiled`) and decodes on the CPU with the C++ kernels of
# hyper_connection_cpu.py, so only the decode comparison runs it as a model of its own.
DECODE_MODELS = ("mhc_eager", "mhc_compiled", "mhc_auto", "llama")
HEAD_DIM = 64
QUERY_HEADS_PER_KV_HEAD = 3  # 6 heads / 2 KV heads in the recipe
MLP_RATIO = 8 / 3  # 1024 / 384 in the recipe
PROMPT_TOKENS = 32
TRAIN_STEP_GOAL = 1.15  # mHC / Llama seconds per step, at most
DECODE_GOAL = 0.9  # mHC / Llama tokens per second, at least
RSS_GOAL = 1.1  # mHC / Llama peak resident memory, at most
# The recipe's hyper-connection settings (recipes/pretrain_mhc.yaml) and optimizer (learning rate, beta2, decay).
MHC_FIELDS = dict(hc_mult=4, hc_sinkhorn_iters=20, hc_alpha_init=0.01, hc_collapse="learned")
ADAMW = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)


def shared_fields(hidden_size: int, layers: int, vocab_size: int, max_positions: int) -> dict:
    """The Llama fields both models get: the recipe's shape at hidden 384, scaled with head_dim 64 at other widths."""
    heads = max(1, hidden_size // HEAD_DIM)
    kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // QUERY_HEADS_PER_KV_HEAD))
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=max(HEAD_DIM, HEAD_DIM * round(hidden_size * MLP_RATIO / HEAD_DIM)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_model(kind: str, fields: dict, seed: int):
    """A freshly initialised fp32 model on CPU with SDPA attention, in train mode; `torch.manual_seed(seed)` first."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_ext  # noqa: F401  (registers mhc_lm)
    from hf_ext.models.mhc import MHCConfig, MHCForCausalLM

    torch.manual_seed(seed)
    if kind.startswith("mhc_"):
        kernel = kind.removeprefix("mhc_")
        model = MHCForCausalLM(MHCConfig(**fields, **MHC_FIELDS, attn_implementation="sdpa", hc_kernel=kernel))
    else:
        model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    return model.to(torch.float32).train()


def random_tokens(shape: tuple[int, ...], vocab_size: int, seed: int):
    """Token ids in [3, vocab) (0-2 are pad/bos/eos), the same for both models."""
    import torch

    return torch.randint(3, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def train_step_times(model, input_ids, steps: int, optimizer=None) -> list[float]:
    """Wall seconds of each of `steps` forward + backward + AdamW steps on one fixed batch (labels = inputs)."""
    import torch

    optimizer = optimizer or torch.optim.AdamW(model.parameters(), **ADAMW)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def decode_tokens_per_second(model, prompt, new_tokens: int) -> float:
    """Cached greedy decode speed: `(N - 1) / (t(generate N) - t(generate 1))`, which removes the prefill (each t the
    median of 3 calls)."""
    import torch

    def timed_generate(n: int) -> float:
        start = time.perf_counter()
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            use_cache=True, pad_token_id=model.config.pad_token_id,
        )
        elapsed = time.perf_counter() - start
        if output.shape[1] != prompt.shape[1] + n:
            raise RuntimeError(f"generate returned {output.shape[1] - prompt.shape[1]} new tokens, expected {n}")
        return elapsed

    model.eval()
    timed_generate(2)  # warm-up
    # Medians of 3 alternating calls each, so one slow 1-token call cannot swamp the difference.
    one, full = zip(*((timed_generate(1), timed_generate(new_tokens)) for _ in range(3)))
    return (new_tokens - 1) / (statistics.median(full) - statistics.median(one))


def interleaved(repeats: int, measure, models: tuple[str, ...] = MODELS) -> dict[str, list[float]]:
    """`measure(kind)` for every model, `repeats` times, rotating which goes first."""
    results: dict[str, list[float]] = {kind: [] for kind in models}
    for repeat in range(repeats):
        for kind in models[repeat % len(models):] + models[: repeat % len(models)]:
            results[kind].append(measure(kind))
            gc.collect()
            print(f"repeat {repeat} {kind}: {results[kind][-1]:.4g}", file=sys.stderr)
    return results


def training_comparison(fields: dict, args) -> dict[str, list[float]]:
    """Median seconds per training step (first step excluded) of each run, per model."""
    input_ids = random_tokens((args.batch_size, args.seq_len), fields["vocab_size"], args.seed)
    for kind in MODELS:  # untimed warm-up of the process (allocator, kernels) so the first timed run is not penalised
        train_step_times(build_model(kind, fields, args.seed), input_ids, 2)

    def measure(kind: str) -> float:
        model = build_model(kind, fields, args.seed)
        return statistics.median(train_step_times(model, input_ids, args.steps)[1:])

    return interleaved(args.repeats, measure)


def decode_comparison(fields: dict, args) -> dict[str, list[float]]:
    """Cached greedy decode tokens/s of each run, per model (a freshly built model each run)."""
    prompt = random_tokens((1, PROMPT_TOKENS), fields["vocab_size"], args.seed + 1)
    for kind in DECODE_MODELS:  # compiles the generation graphs (builds the C++ kernels) once, outside the timings
        decode_tokens_per_second(build_model(kind, fields, args.seed), prompt, 4)

    def measure(kind: str) -> float:
        return decode_tokens_per_second(build_model(kind, fields, args.seed), prompt, args.decode_tokens)

    return interleaved(args.repeats, measure, DECODE_MODELS)


def child_args(args) -> list[str]:
    """The shape/step flags a `--rss_child` process needs to build and train the same model."""
    return ["--steps", str(args.steps), "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
            "--hidden_size", str(args.hidden_size), "--layers", str(args.layers), "--vocab_size",
            str(args.vocab_size), "--decode_tokens", str(args.decode_tokens), "--seed", str(args.seed)]


def child_peak_rss(args, rounds: int = 2) -> dict[str, list[dict[str, float]]]:
    """`{"peak_rss_mb", "import_rss_mb", "first_step_extra_s", "first_generate_extra_s"}` of `--rss_child MODEL`
    child processes, alternating models, `rounds` each, each with an empty inductor cache of its own.

    Like `child_peak_rss` in sft_overhead.py, which forwards only `--batch_size` (and fixes 3 steps), while these
    children need the whole shape."""
    rss: dict[str, list[dict[str, float]]] = {kind: [] for kind in MODELS}
    for _ in range(rounds):
        for kind in MODELS:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                child = subprocess.run([sys.executable, __file__, "--rss_child", kind, *child_args(args)],
                                       capture_output=True, text=True, check=True, env=env)
            rss[kind].append(json.loads(child.stdout.strip().splitlines()[-1]))
    return rss


def reset_peak_rss() -> None:
    """Resets `VmHWM` to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (`VmHWM`). Not `getrusage`'s `ru_maxrss`: Linux keeps that
    across `execve`, so a child would start at its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def rss_child(kind: str, fields: dict, args) -> None:
    """Builds `kind`, trains `--steps` steps, prints the peak RSS (and the RSS before the model was built, and the peak
    of the steps after the first) as JSON, with the first step's and the first `generate`'s extra seconds (the compile
    time, for the compiled kernel)."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    from hf_ext.models.mhc import MHCForCausalLM  # noqa: F401

    import_rss = peak_rss_mb()
    model = build_model(kind, fields, args.seed)
    input_ids = random_tokens((args.batch_size, args.seq_len), fields["vocab_size"], args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    times = train_step_times(model, input_ids, 1, optimizer)
    peak_rss = peak_rss_mb()
    reset_peak_rss()
    times += train_step_times(model, input_ids, args.steps - 1, optimizer)
    steady_peak_rss = peak_rss_mb()
    peak_rss = max(peak_rss, steady_peak_rss)
    model.eval()
    prompt = random_tokens((1, PROMPT_TOKENS), fields["vocab_size"], args.seed + 1)
    generate_times = []
    for _ in range(3):
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=model.config.pad_token_id)
        generate_times.append(time.perf_counter() - start)
    print(json.dumps({"peak_rss_mb": peak_rss, "steady_peak_rss_mb": steady_peak_rss, "import_rss_mb": import_rss,
                      "first_step_extra_s": times[0] - statistics.median(times[1:]),
                      "first_generate_extra_s": generate_times[0] - statistics.median(generate_times[1:])}))


def top_operators(fields: dict, args, rows: int = 12) -> dict[str, list[dict]]:
    """The `rows` operators with the most self CPU time over 2 training steps, per model (a compiled graph counts as
    one operator, `## Call CompiledFxGraph ... ##`)."""
    from torch.profiler import profile

    input_ids = random_tokens((args.batch_size, args.seq_len), fields["vocab_size"], args.seed)
    tables = {}
    for kind in ("mhc_eager", "mhc_compiled", "llama"):
        model = build_model(kind, fields, args.seed)
        train_step_times(model, input_ids, 2)
        with profile() as prof:
            train_step_times(model, input_ids, 2)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[kind] = [{"name": e.key[:90], "self_ms_per_step": e.self_cpu_time_total / 2e3, "calls_per_step":
                         e.count / 2, "share": e.self_cpu_time_total / total} for e in events[:rows]]
    return tables


def remeasure_memory(args) -> None:
    """Replaces the peak-RSS fields of `RESULTS` (made with the same shape) with new children's."""
    result = json.loads(RESULTS.read_text())
    rss = child_peak_rss(args)
    memory = memory_summary(rss)
    result["peak_rss_mb"] = {kind: [{key: r[key] for key in ("peak_rss_mb", "steady_peak_rss_mb", "import_rss_mb")}
                                    for r in runs] for kind, runs in rss.items()}
    result.update(memory)
    for kind, met in result["goals"]["met"].items():
        met["rss_met"] = memory["rss_ratio_over_llama"][trained_as(kind)] <= RSS_GOAL
    result["peak_rss_command"] = f"python benchmarks/mhc.py {' '.join(sys.argv[1:])}"
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(memory))


def memory_summary(rss: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The median peak RSS per model (whole run, and steps after the first), and their ratios to Llama's."""
    peak = summary({kind: [r["peak_rss_mb"] for r in runs] for kind, runs in rss.items()})
    steady = summary({kind: [r["steady_peak_rss_mb"] for r in runs] for kind, runs in rss.items()})
    return {"median_peak_rss_mb": peak, "rss_ratio_over_llama": {k: peak[k] / peak["llama"] for k in MODELS},
            "median_steady_peak_rss_mb": steady,
            "steady_rss_ratio_over_llama": {k: steady[k] / steady["llama"] for k in MODELS}}


def trained_as(kind: str) -> str:
    """The model whose training measurements stand for `kind`: `auto` trains on the compiled graphs."""
    return "mhc_compiled" if kind == "mhc_auto" else kind


def machine_description() -> str:
    """CPU model, cores, torch and its threads and vector capability: timings differ 2-3x between CPUs."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return (f"{platform.machine()} {names[0] if names else platform.processor()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def summary(values: dict[str, list[float]]) -> dict[str, float]:
    return {kind: statistics.median(v) for kind, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (the first is warm-up)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--hidden_size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--decode_tokens", type=int, default=128, help="new tokens per timed generate (>= 2)")
    parser.add_argument("--widths", type=str, default=None, help="comma-separated hidden sizes for the training-step "
                        "ratio, e.g. 384,768")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", action="store_true", help="also record the top operators of a training step")
    parser.add_argument("--memory_only", action="store_true", help="re-measure only the peak RSS of the children "
                        "into the existing results file (their timings are not kept)")
    parser.add_argument("--rss_child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.decode_tokens < 2:
        parser.error("--steps and --decode_tokens must be >= 2 (the first step / token is excluded)")
    widths = [int(w) for w in args.widths.split(",")] if args.widths else []
    max_positions = max(args.seq_len, PROMPT_TOKENS + args.decode_tokens)
    fields = shared_fields(args.hidden_size, args.layers, args.vocab_size, max_positions)
    if args.rss_child:
        return rss_child(args.rss_child, fields, args)

    import torch
    from transformers.utils import logging

    from hf_ext.models.mhc.modeling_mhc import HC_KERNELS

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.memory_only:
        return remeasure_memory(args)

    train = training_comparison(fields, args)
    decode = decode_comparison(fields, args)
    cpu_decode = HC_KERNELS.cpu_decode  # whether `mhc_auto` really decoded with the C++ kernels
    cpu_decode_kernels = "built" if cpu_decode.library is not None else f"not built ({cpu_decode.unavailable})"
    rss = child_peak_rss(args)
    profile = top_operators(fields, args) if args.profile else None
    parameters = {kind: build_model(kind, fields, args.seed).num_parameters() for kind in MODELS}
    by_width: dict[str, dict] = {}
    for width in widths:
        width_fields = shared_fields(width, args.layers, args.vocab_size, max_positions)
        times = train if width_fields == fields else training_comparison(width_fields, args)
        median = summary(times)
        by_width[str(width)] = {"config": width_fields, "seconds_per_step": times, "median_seconds_per_step": median,
                                "ratio_over_llama": {k: median[k] / median["llama"] for k in MODELS}}

    train_median, decode_median = summary(train), summary(decode)
    memory = memory_summary(rss)
    peak, rss_ratio = memory["median_peak_rss_mb"], memory["rss_ratio_over_llama"]
    steady, steady_ratio = memory["median_steady_peak_rss_mb"], memory["steady_rss_ratio_over_llama"]
    compile_step = summary({kind: [r["first_step_extra_s"] for r in runs] for kind, runs in rss.items()})
    compile_generate = summary({kind: [r["first_generate_extra_s"] for r in runs] for kind, runs in rss.items()})
    train_ratio = {kind: train_median[kind] / train_median["llama"] for kind in MODELS}
    decode_ratio = {kind: decode_median[kind] / decode_median["llama"] for kind in DECODE_MODELS}
    goals = {kind: {"train_met": train_ratio[trained_as(kind)] <= TRAIN_STEP_GOAL,
                    "decode_met": decode_ratio[kind] >= DECODE_GOAL,
                    "rss_met": rss_ratio[trained_as(kind)] <= RSS_GOAL}
             for kind in DECODE_MODELS if kind != "llama"}
    result = {
        "benchmark": "mhc",
        "command": f"python benchmarks/mhc.py {' '.join(sys.argv[1:])}".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "config": {"shared": fields, "mhc": MHC_FIELDS, "dtype": "float32", "attn_implementation": "sdpa",
                   "batch_size": args.batch_size, "seq_len": args.seq_len, "optimizer": "AdamW", **ADAMW,
                   "steps_per_run": args.steps, "repeats": args.repeats, "prompt_tokens": PROMPT_TOKENS,
                   "decode_tokens": args.decode_tokens, "seed": args.seed},
        "decode_timing": ("(N - 1) / (t(generate N new tokens) - t(generate 1 new token)), each t the median of "
                          "3 calls; greedy, batch 1, KV cache, prefill excluded"),
        "parameters": parameters,
        "train_seconds_per_step": train,
        "median_train_seconds_per_step": train_median,
        "train_ratio_over_llama": train_ratio,
        "decode_tokens_per_second": decode,
        "median_decode_tokens_per_second": decode_median,
        "decode_ratio_over_llama": decode_ratio,
        "cpu_decode_kernels": cpu_decode_kernels,
        "peak_rss_mb": rss,
        **memory,
        "median_compile_seconds": {"first_training_step_extra": compile_step, "first_generate_extra": compile_generate},
        "goals": {"train_ratio_at_most": TRAIN_STEP_GOAL, "decode_ratio_at_least": DECODE_GOAL,
                  "rss_ratio_at_most": RSS_GOAL, "met": goals,
                  "note": "mhc_auto trains on the compiled graphs: its training and memory figures are mhc_compiled's"},
    }
    if by_width:
        result["train_by_width"] = by_width
    if profile:
        result["profile_top_self_cpu"] = profile
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))

    def verdict(met: bool) -> str:
        return "met" if met else "**missed**"

    def row(measure: str, values: dict, ratios: dict, goal: str, digits: int = 3, ratio_digits: int = 3) -> str:
        """One table row: eager, compiled, auto ("= compiled" where it trains the same way), Llama, the ratios."""
        cells = [f"{values[kind]:.{digits}f}" if kind in values else "= compiled" for kind in DECODE_MODELS]
        ratio_cells = [f"{ratios[kind]:.{ratio_digits}f}x" if kind in ratios else "= compiled"
                       for kind in DECODE_MODELS if kind != "llama"]
        return f"| {measure} | {' | '.join(cells)} | {' | '.join(ratio_cells)} | {goal} |"

    rounds = len(rss["mhc_eager"])
    auto_goals = goals["mhc_auto"]
    print("| measure | mHC eager | mHC compiled | mHC auto (default) | Llama | eager / Llama | compiled / Llama | "
          "auto / Llama | goal (auto) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row(f"training step, batch {args.batch_size} x {args.seq_len} (s, median of {args.repeats})", train_median,
              train_ratio, f"<= {TRAIN_STEP_GOAL}x: {verdict(auto_goals['train_met'])}"))
    for width, width_row in by_width.items():
        if int(width) != args.hidden_size:
            print(row(f"training step, hidden {width} (s, median of {args.repeats})",
                      width_row["median_seconds_per_step"], width_row["ratio_over_llama"], "-"))
    print(row(f"decode, batch 1, {args.decode_tokens} tokens (tokens/s, median of {args.repeats})", decode_median,
              decode_ratio, f">= {DECODE_GOAL}x: {verdict(auto_goals['decode_met'])}", digits=1))
    print(row(f"peak RSS, {args.steps} steps, compilation included (MB, median of {rounds})", peak, rss_ratio,
              f"<= {RSS_GOAL}x: {verdict(auto_goals['rss_met'])}", digits=0, ratio_digits=2))
    print(row(f"peak RSS of steps 2-{args.steps} (MB, median of {rounds})", steady, steady_ratio, "-", digits=0,
              ratio_digits=2))
    print(f"| compile time paid once: first training step / first generate (s, cold cache, median of {rounds}) | "
          f"{compile_step['mhc_eager']:.1f} / {compile_generate['mhc_eager']:.1f} | "
          f"{compile_step['mhc_compiled']:.1f} / {compile_generate['mhc_compiled']:.1f} | "
          "= compiled / no graph (the C++ build) | "
          f"{compile_step['llama']:.1f} / {compile_generate['llama']:.1f} | - | - | - | - |")
    print(f"| parameters | {parameters['mhc_eager']:,} | {parameters['mhc_compiled']:,} | = compiled | "
          f"{parameters['llama']:,} | {parameters['mhc_eager'] / parameters['llama']:.3f}x | "
          f"{parameters['mhc_compiled'] / parameters['llama']:.3f}x | = compiled | - |")
    print(f"\nC++ decoding kernels for mhc_auto: {cpu_decode_kernels}")
    for kind, rows in (profile or {}).items():
        print(f"\n{kind}: top operators by self CPU time per training step")
        print("| operator | ms / step | calls / step | share |\n|---|---|---|---|")
        for op in rows:
            print(f"| `{op['name']}` | {op['self_ms_per_step']:.1f} | {op['calls_per_step']:.0f} | "
                  f"{op['share']:.1%} |")


if __name__ == "__main__":
    main()
