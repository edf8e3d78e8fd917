"""Mamba SSM cost: hf_ext's `mamba_ssm` models vs transformers' Mamba2 and Mamba-1 on CPU (spec: mamba.md, section 12).

All models have the spec's section-9 shape: 2 layers, hidden 256, d_inner 512 (expand 2), vocab 33, state size
N = 16, conv kernel 4, fp32, `torch.set_num_threads(2)`. The SSD models (ours and transformers' Mamba2) have
head_dim 64 -> 8 heads, n_groups 1, chunk 64 and are built from one `Mamba2Config` (ours through
`MambaSSMConfig.from_mamba2_config`, so both have the same 822,640 parameters); Mamba-1 is `MambaConfig` with the
same width, state and kernel. Implementations:

- `ours_causal`: `hf_ext.models.mamba_ssm.MambaSSMForCausalLM` (pure-PyTorch chunked SSD scan; `use_kernels=False`);
- `ours_bidirectional`: `MambaSSMForMaskedLM` with `bidirectional=True` (training only: it cannot generate);
- `mamba2`: transformers `Mamba2ForCausalLM`; without `mamba_ssm` / `causal_conv1d` its fused
  `mamba_split_conv1d_scan_combined` falls back (returns None) to the torch path (`F.conv1d` + `torch_forward`'s
  chunked einsum scan);
- `mamba1_loop`: transformers `MambaForCausalLM`, `use_mambapy=False`: the token-by-token Python loop fallback;
- `mamba1_mambapy`: the same with `use_mambapy=True` (mambapy's parallel scan), only if `mambapy` is installed
  (`pip install mambapy==1.2.0`); recorded as skipped ("not installed") otherwise.

Metrics and protocol:

1. training tokens/s at L in {128, 512, 2048} with 4,096 tokens per step (B = 32 / 8 / 2): a step is forward + the
   model's own cross-entropy loss (`labels = input_ids`) + backward, no optimizer, `model.train()` (all dropout is 0),
   `use_cache=False`. Per length, every implementation gets warm-up steps first (2, or 1 when a step takes over
   `--slow_step` seconds); then `--rounds` interleaved rounds, round-robin with the starting implementation rotating
   each round; in each round an implementation runs `--steps` timed steps (1 when its faster warm-up step took over
   2 s) and contributes their median. Implementations whose warm-up step took over `--slow_step` seconds (the Mamba-1
   loop) get a single timed step in total (round 0 only; repeated up to `--retries` times when another process was
   busy during it): their per-run `note` says so. We report the median over rounds and the interquartile range
   (linear interpolation), over the clean rounds (see 4) when at least min(3, planned rounds) are clean.
2. per-step budget (`--budget` seconds): a run whose warm-up step exceeds it is recorded as `"skipped"` with the
   reason. Lengths grow by the same factor (x4), so before starting an implementation at a length its step time is
   extrapolated geometrically from its two previous lengths; a run projected over budget is skipped without being
   started (again with the reason), which keeps the measuring under ~25 minutes.
3. decode at batch 1: greedy `model.generate` (64-token random prompt, `do_sample=False`, exactly N new tokens via
   `min_new_tokens = max_new_tokens = N`), each model's own recurrent cache. prefill ms = t(generate 1 token) (the
   prompt forward plus one argmax); decode ms/token = (t(generate 64) - t(generate 1)) / 63, each t the median over
   `--decode_rounds` (10) interleaved rounds (after one warm-up call of each).
4. contention (the machine is shared, and 4 busy threads on 2 cores slow a torch step down by far more than 2x):
   before each warm-up, each implementation's turn in a round and each decode round, the script waits (1 s
   samples, at most `--quiet_wait` s each and `--quiet_wait_total` s in all) until other processes use under
   `--quiet_threshold` cores. Every timed step records the cores other processes used meanwhile (`/proc/stat` busy
   time minus our CPU time) and our CPU / wall ratio (~2.0 = our 2 threads had the cores to themselves). A round is
   clean when other processes stayed under the threshold during all its steps; medians use the clean rounds only
   (the table says "k/n clean" when some were dropped, "contended" when too few were clean and all were used).
   Every value stays in the JSON, and `--resummarize PATH` recomputes the summaries, ratios and table of a results
   file without measuring.

Ratios and goals (spec): ours' per-token training cost at L = 2048 over L = 128 (<= 1.5x); ours / Mamba2 training
tokens/s (>= 1.0x at every length, as the ratio of the medians; the median of the per-round ratios is reported
next to it); ours / Mamba-1 loop at L = 512 (>= 100x).

`--device cuda` moves everything to the GPU and synchronizes around each timing; it adds nothing on a CPU-only
machine (kernels on / off comparisons with the first call excluded are for later). Writes
`benchmarks/results/mamba.json` (environment, config, per-run values, medians, IQRs, ratios, goals) and prints the
Markdown table for `benchmarks/README.md`.

    python benchmarks/mamba.py [--quick] [--rounds 5] [--steps 3] [--budget 150] [--output PATH] [--device cpu]
    python benchmarks/mamba.py --resummarize benchmarks/results/mamba.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.metadata
import importlib.util
import math
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "mamba.json"
THREADS = 2
TOKENS_PER_STEP = 4096
LENGTHS = (128, 512, 2048)
PROMPT_TOKENS = 64
NEW_TOKENS = 64
# Section-9 shape, shared by every implementation.
SHAPE = dict(vocab_size=33, hidden_size=256, expand=2, state_size=16, conv_kernel=4, num_hidden_layers=2)
SSD = dict(num_heads=8, head_dim=64, n_groups=1, chunk_size=64)
SPECIAL_TOKENS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)  # Mamba2Config's defaults, used by all
LENGTH_GOAL = 1.5  # ours: seconds per token at L=2048 / at L=128, at most
MAMBA2_GOAL = 1.0  # ours / Mamba2 training tokens/s, at least (every length)
LOOP_GOAL = 100.0  # ours / Mamba-1 loop training tokens/s at L=512, at least
LOOP_GOAL_LENGTH = 512

IMPLS = {
    "ours_causal": "hf_ext MambaSSMForCausalLM (SSD, causal)",
    "ours_bidirectional": "hf_ext MambaSSMForMaskedLM (SSD, bidirectional)",
    "mamba2": "transformers Mamba2ForCausalLM (torch path)",
    "mamba1_mambapy": "transformers MambaForCausalLM, use_mambapy=True",
    "mamba1_loop": "transformers MambaForCausalLM, loop fallback",
}
DECODERS = ("ours_causal", "mamba2", "mamba1_mambapy", "mamba1_loop")  # the bidirectional model cannot generate


def mambapy_installed() -> bool:
    return importlib.util.find_spec("mambapy") is not None


def mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(**SHAPE, **SSD, tie_word_embeddings=True, **SPECIAL_TOKENS)


def mamba1_config(use_mambapy: bool):
    from transformers import MambaConfig

    return MambaConfig(**SHAPE, use_mambapy=use_mambapy, tie_word_embeddings=True, **SPECIAL_TOKENS)


def build_model(name: str, seed: int, device: str):
    """A freshly initialised fp32 model of implementation `name`, in train mode; `torch.manual_seed(seed)` first."""
    import torch
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    from hf_ext.models.mamba_ssm import MambaSSMConfig, MambaSSMForCausalLM, MambaSSMForMaskedLM

    torch.manual_seed(seed)
    if name == "ours_causal":
        model = MambaSSMForCausalLM(MambaSSMConfig.from_mamba2_config(mamba2_config(), use_kernels=False))
    elif name == "ours_bidirectional":
        model = MambaSSMForMaskedLM(
            MambaSSMConfig.from_mamba2_config(mamba2_config(), use_kernels=False, bidirectional=True)
        )
    elif name == "mamba2":
        model = Mamba2ForCausalLM(mamba2_config())
    elif name in ("mamba1_loop", "mamba1_mambapy"):
        model = MambaForCausalLM(mamba1_config(use_mambapy=name == "mamba1_mambapy"))
    else:
        raise ValueError(name)
    return model.to(device=device, dtype=torch.float32).train()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Machine:
    """What the rest of the machine is doing: CPU seconds used by other processes, from `/proc/stat` minus our own
    process CPU time (Linux; elsewhere it reports nothing and never waits)."""

    def __init__(self, threshold: float, max_wait: float, max_total_wait: float, log):
        self.threshold, self.max_wait, self.max_total_wait, self.log = threshold, max_wait, max_total_wait, log
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = self.busy_seconds() is not None
        self.waited: list[float] = []

    def busy_seconds(self) -> float | None:
        """CPU seconds all processes have been busy since boot (user + nice + system + irq + softirq + steal)."""
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / self.hz

    def mark(self) -> tuple[float, float, float] | None:
        busy = self.busy_seconds()
        return None if busy is None else (busy, time.process_time(), time.perf_counter())

    def foreign_cores(self, start) -> float | None:
        """Cores' worth of CPU used by other processes since `start` (a `mark()`): 0 = we had the machine alone."""
        end = self.mark()
        if start is None or end is None or end[2] <= start[2]:
            return None
        return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))

    def wait_for_quiet(self, what: str) -> float:
        """Sleeps (1 s samples) until other processes use under `threshold` cores, at most `max_wait` seconds (and
        `max_total_wait` over the whole benchmark); returns the seconds waited."""
        max_wait = min(self.max_wait, self.max_total_wait - sum(self.waited))
        if not self.available or max_wait <= 0:
            return 0.0
        began = time.perf_counter()
        while True:
            start = self.mark()
            time.sleep(1.0)
            load = self.foreign_cores(start)
            waited = time.perf_counter() - began
            if load is None or load < self.threshold:
                break
            if waited >= max_wait:
                self.log(f"{what}: machine still busy ({load:.2f} other cores) after {waited:.0f} s; measuring anyway")
                break
        waited = time.perf_counter() - began - 1.0
        if waited > 0.5:
            self.log(f"{what}: waited {waited:.0f} s for a quiet machine")
        self.waited.append(waited)
        return waited


def random_tokens(shape: tuple[int, ...], seed: int, device: str):
    """Token ids in [3, vocab) (0-2 are bos/pad/eos), the same for every implementation."""
    import torch

    return torch.randint(3, SHAPE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed)).to(device)


def train_step(model, input_ids, device: str, machine: Machine) -> tuple[float, float, float | None]:
    """(wall seconds, process CPU seconds, other processes' cores) of one forward + CE loss + backward on
    `input_ids` (labels = inputs)."""
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = machine.mark()
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, machine.foreign_cores(start)


def quartiles(values: list[float]) -> dict[str, float | None]:
    """Median, Q1, Q3 and IQR / median (None with fewer than 2 values)."""
    median = statistics.median(values)
    if len(values) < 2:
        return {"median": median, "q1": None, "q3": None, "iqr_over_median": None}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "iqr_over_median": (q3 - q1) / median}


def projected_step(history: dict[int, float], length: int) -> float | None:
    """Geometric extrapolation of the step time to `length` from the two previous lengths' warm-up steps."""
    done = sorted(history)
    if len(done) < 2:
        return None
    l1, l2 = done[-2:]
    t1, t2 = history[l1], history[l2]
    if t1 <= 0 or t2 <= 0:
        return None
    return t2 * (t2 / t1) ** (math.log(length / l2) / math.log(l2 / l1))


def training(impls: list[str], args, log, machine: Machine) -> dict[str, dict[str, dict]]:
    """Per implementation and length: warm-up, interleaved rounds, tokens/s per round (or the reason it was skipped)."""
    models = {name: build_model(name, args.seed, args.device) for name in impls}
    warmup_history: dict[str, dict[int, float]] = {name: {} for name in impls}
    skipped_before: dict[str, str] = {}
    results: dict[str, dict[str, dict]] = {name: {} for name in impls}
    for length in args.lengths:
        batch = TOKENS_PER_STEP // length
        input_ids = random_tokens((batch, length), args.seed + length, args.device)
        active: dict[str, dict] = {}
        for name in impls:
            if name in skipped_before:
                results[name][str(length)] = {"skipped": skipped_before[name]}
                continue
            projected = projected_step(warmup_history[name], length)
            if projected is not None and projected > args.budget:
                reason = (f"projected step {projected:.0f} s > budget {args.budget:.0f} s (geometric extrapolation of "
                          f"the warm-up steps at L={', '.join(map(str, sorted(warmup_history[name])))}: "
                          f"{', '.join(f'{t:.1f}' for t in warmup_history[name].values())} s); not started")
                results[name][str(length)] = {"skipped": reason}
                skipped_before[name] = f"skipped at a shorter length ({reason})"
                log(f"L={length} {name}: skipped, {reason}")
                continue
            machine.wait_for_quiet(f"L={length} {name} warm-up")
            first, _, first_other = train_step(models[name], input_ids, args.device, machine)
            warmup_history[name][length] = first
            log(f"L={length} {name}: warm-up step {first:.3f} s")
            if first > args.budget:
                reason = f"warm-up step took {first:.1f} s > budget {args.budget:.0f} s"
                results[name][str(length)] = {"skipped": reason, "warmup_seconds": [first],
                                              "warmup_other_processes_cores": [first_other]}
                skipped_before[name] = f"skipped at a shorter length ({reason})"
                continue
            warmups, warmup_others = [first], [first_other]
            if first <= args.slow_step:
                wall, _, other = train_step(models[name], input_ids, args.device, machine)
                warmups.append(wall)
                warmup_others.append(other)
            slow = first > args.slow_step
            active[name] = {
                "batch_size": batch, "seq_len": length, "warmup_seconds": warmups,
                "warmup_other_processes_cores": warmup_others, "retries_left": args.retries if slow else 0,
                "steps_per_round": 1 if min(warmups) > 2.0 else args.steps,
                "rounds": 1 if slow else args.rounds,
                "note": (f"warm-up step over --slow_step {args.slow_step:g} s: a single timed step (round 0 only), "
                         f"repeated (up to --retries {args.retries}) when other processes used >= "
                         f"{args.quiet_threshold} cores during it" if slow else None),
                "step_seconds": [], "cpu_seconds": [], "other_processes_cores": [], "waited_seconds": [],
                "seconds_per_step": [],
            }
        order = list(active)
        for round_index in range(args.rounds):
            shift = round_index % max(1, len(order))
            for name in order[shift:] + order[:shift]:
                run = active[name]
                if round_index >= run["rounds"]:
                    continue
                while True:
                    run["waited_seconds"].append(machine.wait_for_quiet(f"L={length} round {round_index} {name}"))
                    steps = [train_step(models[name], input_ids, args.device, machine)
                             for _ in range(run["steps_per_round"])]
                    run["step_seconds"].append([wall for wall, _, _ in steps])
                    run["cpu_seconds"].append([cpu for _, cpu, _ in steps])
                    run["other_processes_cores"].append([other for _, _, other in steps])
                    run["seconds_per_step"].append(statistics.median(wall for wall, _, _ in steps))
                    log(f"L={length} round {round_index} {name}: {run['seconds_per_step'][-1]:.3f} s/step "
                        f"({TOKENS_PER_STEP / run['seconds_per_step'][-1]:,.0f} tok/s)")
                    gc.collect()
                    if run["retries_left"] <= 0 or all(clean_rounds(run["other_processes_cores"][-1:], args.quiet_threshold)):
                        break
                    run["retries_left"] -= 1
                    log(f"L={length} {name}: other processes were busy during the step; measuring it again")
        for name, run in active.items():
            del run["retries_left"]
            if run["note"] is None:
                del run["note"]
            results[name][str(length)] = run
    return results


def clean_rounds(loads: list, threshold: float) -> list[bool]:
    """Per round: True when other processes used under `threshold` cores during all of its timed steps (a load of
    None, i.e. not measurable, counts as clean)."""
    return [all(o is None or o < threshold for o in (r if isinstance(r, list) else [r])) for r in loads]


def pick(values: list, keep: list[bool], minimum: int) -> tuple[list, bool]:
    """The values of the clean rounds when there are at least `minimum` of them, else all values; and whether the
    clean subset was used."""
    chosen = [v for v, k in zip(values, keep) if k]
    return (chosen, True) if len(chosen) >= minimum else (list(values), False)


def summarize_training(run: dict, threshold: float) -> None:
    """Adds tokens/s per round, the headline summary (median / IQR over the clean rounds when at least
    `min(3, planned rounds)` are clean, else over all rounds, flagged contended), the all-rounds summary, CPU / wall
    and the other-process load."""
    run["tokens_per_second"] = [TOKENS_PER_STEP / s for s in run["seconds_per_step"]]
    keep = clean_rounds(run["other_processes_cores"], threshold)
    values, used_clean = pick(run["tokens_per_second"], keep, min(3, run["rounds"]))
    run["clean_rounds"] = keep
    run["summary"] = {**quartiles(values), "rounds": len(values), "clean_only": used_clean}
    run["summary_all_rounds"] = quartiles(run["tokens_per_second"])
    walls = [w for r in run["step_seconds"] for w in r]
    cpus = [c for r in run["cpu_seconds"] for c in r]
    run["cpu_over_wall"] = statistics.median(c / w for c, w in zip(cpus, walls))
    others = [o for r in run["other_processes_cores"] for o in r if o is not None]
    run["other_processes_cores_median"] = statistics.median(others) if others else None
    run["other_processes_cores_max"] = max(others) if others else None


def summarize_decode(run: dict, threshold: float) -> None:
    """prefill ms = median t(1 token); decode ms/token = (median t(64) - median t(1)) / 63, over the clean rounds
    when at least `min(3, rounds)` are clean, else over all rounds."""
    full_key = f"generate_{NEW_TOKENS}_seconds"
    keep = clean_rounds(run["other_processes_cores"], threshold)
    ones, used_clean = pick(run["generate_1_seconds"], keep, min(3, len(keep)))
    fulls, _ = pick(run[full_key], keep, min(3, len(keep)))
    one, full = statistics.median(ones), statistics.median(fulls)
    per_round = [(f - o) / (NEW_TOKENS - 1) * 1000 for o, f in zip(ones, fulls)]
    run.update({
        "clean_rounds": keep,
        "rounds_used": len(ones),
        "clean_only": used_clean,
        "prefill_ms": one * 1000,
        "decode_ms_per_token": (full - one) / (NEW_TOKENS - 1) * 1000,
        "decode_ms_per_token_per_round": per_round,
        "decode_ms_per_token_summary": quartiles(per_round),
        "prefill_ms_summary": quartiles([t * 1000 for t in ones]),
    })


def decoding(impls: list[str], args, log, machine: Machine) -> dict[str, dict]:
    """Greedy decode at batch 1 with each model's cache: prefill ms and cached decode ms/token, interleaved rounds."""
    import torch

    prompt = random_tokens((1, PROMPT_TOKENS), args.seed + 1, args.device)
    models = {name: build_model(name, args.seed, args.device).eval() for name in impls}

    def timed_generate(model, new_tokens: int) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=SPECIAL_TOKENS["pad_token_id"],
            )
        synchronize(args.device)
        elapsed = time.perf_counter() - start
        if output.shape[1] != PROMPT_TOKENS + new_tokens:
            raise RuntimeError(f"generate returned {output.shape[1] - PROMPT_TOKENS} new tokens, expected {new_tokens}")
        return elapsed

    for model in models.values():  # warm-up
        timed_generate(model, 1)
        timed_generate(model, NEW_TOKENS)
    times = {name: {"generate_1_seconds": [], f"generate_{NEW_TOKENS}_seconds": [], "other_processes_cores": []}
             for name in impls}
    order = list(impls)
    for round_index in range(args.decode_rounds):
        shift = round_index % len(order)
        machine.wait_for_quiet(f"decode round {round_index}")
        for name in order[shift:] + order[:shift]:
            start = machine.mark()
            times[name]["generate_1_seconds"].append(timed_generate(models[name], 1))
            times[name][f"generate_{NEW_TOKENS}_seconds"].append(timed_generate(models[name], NEW_TOKENS))
            times[name]["other_processes_cores"].append(machine.foreign_cores(start))
        log(f"decode round {round_index}: " + ", ".join(
            f"{name} {times[name][f'generate_{NEW_TOKENS}_seconds'][-1] * 1000:.0f} ms" for name in impls))
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git(*command: str) -> str | None:
    try:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: str) -> dict:
    import torch
    import transformers

    mamba_dir = ROOT / "hf_ext" / "models" / "mamba_ssm"
    modeling = mamba_dir / "modeling_mamba_ssm.py"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mambapy": (importlib.metadata.version("mambapy") if mambapy_installed() else None),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "git_commit": git("rev-parse", "HEAD"),
        # The model code may differ from the commit (uncommitted edits): identify the exact file measured.
        "mamba_ssm_uncommitted_changes": bool(git("status", "--porcelain", "--", str(mamba_dir))),
        "modeling_mamba_ssm_sha256": hashlib.sha256(modeling.read_bytes()).hexdigest() if modeling.exists() else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def train_median(train: dict, name: str, length: int) -> float | None:
    run = train.get(name, {}).get(str(length))
    return None if run is None or "summary" not in run else run["summary"]["median"]


def paired_ratio(train: dict, a: str, b: str, length: int) -> float | None:
    """Median over the rounds where both `a` and `b` were clean of the per-round ratio of their tokens/s: the two ran
    seconds apart in each round, so this cancels slower drifts of the machine that the ratio of medians keeps."""
    run_a, run_b = train.get(a, {}).get(str(length)), train.get(b, {}).get(str(length))
    if not run_a or not run_b or "summary" not in run_a or "summary" not in run_b or run_a["rounds"] != run_b["rounds"]:
        return None
    pairs = [x / y for x, y, ka, kb in zip(run_a["tokens_per_second"], run_b["tokens_per_second"],
                                          run_a["clean_rounds"], run_b["clean_rounds"]) if ka and kb]
    return statistics.median(pairs) if pairs else None


def ratios_and_goals(train: dict, lengths: list[int]) -> tuple[dict, dict]:
    ours_first, ours_last = train_median(train, "ours_causal", lengths[0]), train_median(train, "ours_causal", lengths[-1])
    length_ratio = ratio(ours_first, ours_last) if len(lengths) > 1 else None  # (s/token at L_last) / (at L_first)
    mamba2 = {str(L): ratio(train_median(train, "ours_causal", L), train_median(train, "mamba2", L)) for L in lengths}
    bidirectional_vs_causal = {str(L): ratio(train_median(train, "ours_bidirectional", L),
                                             train_median(train, "ours_causal", L)) for L in lengths}
    loop = ratio(train_median(train, "ours_causal", LOOP_GOAL_LENGTH), train_median(train, "mamba1_loop", LOOP_GOAL_LENGTH))
    mambapy = {str(L): ratio(train_median(train, "ours_causal", L), train_median(train, "mamba1_mambapy", L))
               for L in lengths}
    ratios = {
        f"ours_per_token_cost_L{lengths[-1]}_over_L{lengths[0]}": length_ratio,
        "ours_over_mamba2_tokens_per_second": mamba2,
        "ours_over_mamba2_paired_median_of_round_ratios": {
            str(L): paired_ratio(train, "ours_causal", "mamba2", L) for L in lengths},
        f"ours_over_mamba1_loop_tokens_per_second_L{LOOP_GOAL_LENGTH}": loop,
        "ours_over_mamba1_mambapy_tokens_per_second": mambapy,
        "bidirectional_over_causal_tokens_per_second": bidirectional_vs_causal,
    }
    measured_mamba2 = [r for r in mamba2.values() if r is not None]
    goals = {
        "length_cost_ratio_at_most": LENGTH_GOAL,
        "length_cost_met": None if length_ratio is None or lengths[-1] != 2048 or lengths[0] != 128
        else length_ratio <= LENGTH_GOAL,
        "ours_over_mamba2_at_least": MAMBA2_GOAL,
        "ours_over_mamba2_met": None if not measured_mamba2 else all(r >= MAMBA2_GOAL for r in measured_mamba2),
        "ours_over_mamba1_loop_at_least": LOOP_GOAL,
        "ours_over_mamba1_loop_met": None if loop is None else loop >= LOOP_GOAL,
    }
    return ratios, goals


def cell(run: dict | None) -> str:
    """`median (IQR x%)` of the clean rounds; `, contended` when too few rounds were clean and all are used."""
    if run is None:
        return "-"
    if "skipped" in run:
        return "skipped"
    summary = run["summary"]
    text = f"{summary['median']:,.0f}"
    notes = [f"IQR {summary['iqr_over_median'] * 100:.0f}%" if summary["iqr_over_median"] is not None else "1 step"]
    if not summary["clean_only"]:
        notes.append("contended")
    elif summary["rounds"] < len(run["tokens_per_second"]):
        notes.append(f"{summary['rounds']}/{len(run['tokens_per_second'])} clean")
    return text + f" ({', '.join(notes)})"


def yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("**met**" if value else "**missed**")


def markdown(result: dict) -> str:
    lengths = result["config"]["lengths"]
    train, decode = result["training"], result["decode"]
    lines = ["| implementation | " + " | ".join(f"train tok/s, {TOKENS_PER_STEP // L}x{L}" for L in lengths)
             + f" | decode ms/token (B=1) | prefill ms ({PROMPT_TOKENS} tokens) |",
             "|---" * (len(lengths) + 3) + "|"]
    for name in IMPLS:
        if name not in result["implementations"]:
            continue
        row = [cell(train.get(name, {}).get(str(L))) for L in lengths]
        if name in decode:
            d = decode[name]
            iqr = d["decode_ms_per_token_summary"]["iqr_over_median"]
            notes = [f"IQR {iqr * 100:.0f}%"] if iqr is not None else []
            if not d["clean_only"]:
                notes.append("contended")
            elif d["rounds_used"] < len(d["clean_rounds"]):
                notes.append(f"{d['rounds_used']}/{len(d['clean_rounds'])} clean")
            row += [f"{d['decode_ms_per_token']:.2f}" + (f" ({', '.join(notes)})" if notes else ""),
                    f"{d['prefill_ms']:.1f}"]
        else:
            row += ["-", "-"]
        lines.append(f"| {IMPLS[name]} | " + " | ".join(row) + " |")
    for name, reason in result["not_run"].items():
        lines.append(f"| {IMPLS[name]} | {reason} |" + " |" * (len(lengths) + 1))
    ratios, goals = result["ratios"], result["goals"]
    lines.append("")
    lines.append("| ratio | value | goal |\n|---|---|---|")
    key = f"ours_per_token_cost_L{lengths[-1]}_over_L{lengths[0]}"
    if ratios.get(key) is not None:
        lines.append(f"| ours causal: per-token cost L={lengths[-1]} / L={lengths[0]} | {ratios[key]:.2f}x | "
                     f"<= {LENGTH_GOAL}x: {yes_no(goals['length_cost_met'])} |")
    def per_length(values: dict, digits: int = 2) -> str:
        return ", ".join(f"{v:.{digits}f}x (L={L})" for L, v in values.items() if v is not None)

    shown = per_length(ratios["ours_over_mamba2_tokens_per_second"])
    if shown:
        lines.append(f"| ours causal / Mamba2 torch path, training tok/s | {shown} | "
                     f">= {MAMBA2_GOAL}x at every L: {yes_no(goals['ours_over_mamba2_met'])} |")
    paired = per_length(ratios["ours_over_mamba2_paired_median_of_round_ratios"])
    if paired:
        lines.append(f"| ours causal / Mamba2, median of the per-round ratios | {paired} | - |")
    loop = ratios[f"ours_over_mamba1_loop_tokens_per_second_L{LOOP_GOAL_LENGTH}"]
    if loop is not None:
        lines.append(f"| ours causal / Mamba-1 loop, training tok/s at L={LOOP_GOAL_LENGTH} | {loop:.0f}x | "
                     f">= {LOOP_GOAL:.0f}x: {yes_no(goals['ours_over_mamba1_loop_met'])} |")
    mambapy = per_length(ratios["ours_over_mamba1_mambapy_tokens_per_second"], digits=1)
    if mambapy:
        lines.append(f"| ours causal / Mamba-1 mambapy, training tok/s | {mambapy} | - |")
    bidir = per_length(ratios["bidirectional_over_causal_tokens_per_second"])
    if bidir:
        lines.append(f"| ours bidirectional / ours causal, training tok/s | {bidir} | - |")
    d = result["decode"]
    if "ours_causal" in d and "mamba2" in d:
        lines.append(f"| Mamba2 / ours decode ms/token (> 1: ours faster) | "
                     f"{d['mamba2']['decode_ms_per_token'] / d['ours_causal']['decode_ms_per_token']:.2f}x | - |")
    return "\n".join(lines)


def finish(result: dict) -> None:
    """(Re)computes every summary, ratio, goal and the Markdown table from the per-run values in `result`."""
    threshold = result["config"]["quiet_gate"]["threshold_cores"]
    for runs in result["training"].values():
        for run in runs.values():
            if "skipped" not in run:
                summarize_training(run, threshold)
    for run in result["decode"].values():
        summarize_decode(run, threshold)
    result["ratios"], result["goals"] = ratios_and_goals(result["training"], result["config"]["lengths"])
    result["markdown"] = markdown(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: L=128 only, 2 rounds, 2 decode rounds")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths (default 128,512,2048)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved training rounds per length")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per round (median taken)")
    parser.add_argument("--decode_rounds", type=int, default=10)
    parser.add_argument("--retries", type=int, default=1, help="repeats of a single-step (slow) implementation's timed "
                        "step when other processes were busy during it")
    parser.add_argument("--budget", type=float, default=150.0, help="per-step budget in seconds (skip over it)")
    parser.add_argument("--slow_step", type=float, default=20.0,
                        help="implementations whose warm-up step takes longer get one timed step in total")
    parser.add_argument("--quiet_threshold", type=float, default=0.25,
                        help="before each measurement wait until other processes use fewer cores than this")
    parser.add_argument("--quiet_wait", type=float, default=300.0,
                        help="longest wait (s) for a quiet machine before each measurement (0: never wait)")
    parser.add_argument("--quiet_wait_total", type=float, default=2400.0,
                        help="longest total wait (s) for a quiet machine over the whole benchmark")
    parser.add_argument("--impls", type=str, default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--no_decode", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; on CUDA the kernels on/off "
                        "comparison is future work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--resummarize", type=Path, default=None,
                        help="recompute the summaries, ratios and table of an existing results JSON (no measuring)")
    args = parser.parse_args()
    if args.resummarize:
        result = json.loads(args.resummarize.read_text())
        finish(result)
        result["resummarized_by"] = f"python benchmarks/mamba.py {' '.join(sys.argv[1:])}"
        args.output.write_text(json.dumps(result, indent=2))
        print(result["markdown"])
        return
    if args.quick:
        args.lengths = args.lengths or "128"
        args.rounds, args.decode_rounds = 2, 2
    args.lengths = [int(L) for L in (args.lengths.split(",") if args.lengths else LENGTHS)]
    if any(TOKENS_PER_STEP % L for L in args.lengths):
        parser.error(f"every length must divide {TOKENS_PER_STEP}")
    requested = [name.strip() for name in args.impls.split(",") if name.strip()]
    if unknown := set(requested) - set(IMPLS):
        parser.error(f"unknown implementations: {sorted(unknown)}")

    import torch
    from transformers.utils import logging

    torch.set_num_threads(THREADS)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")

    not_run = {}
    if "mamba1_mambapy" in requested and not mambapy_installed():
        not_run["mamba1_mambapy"] = "skipped: mambapy not installed (`pip install mambapy==1.2.0`)"
    impls = [name for name in requested if name not in not_run]

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    env = environment(args.device)
    load_before = os.getloadavg()
    log(f"load average before: {load_before}")
    machine = Machine(args.quiet_threshold, args.quiet_wait, args.quiet_wait_total, log)
    train = training(impls, args, log, machine)
    decode = {} if args.no_decode else decoding([n for n in DECODERS if n in impls], args, log, machine)
    env["waited_for_quiet_seconds_total"] = sum(machine.waited)
    load_after = os.getloadavg()
    env["load_average_1_5_15_min_before"] = list(load_before)
    env["load_average_1_5_15_min_after"] = list(load_after)
    env["wall_seconds"] = time.perf_counter() - started
    parameters = {name: build_model(name, args.seed, "cpu").num_parameters() for name in impls}
    result = {
        "benchmark": "mamba",
        "command": f"python benchmarks/mamba.py {' '.join(sys.argv[1:])}".strip(),
        "environment": env,
        "config": {
            "shape": SHAPE, "ssd": SSD, "special_tokens": SPECIAL_TOKENS, "dtype": "float32", "threads": THREADS,
            "mamba1_extra": {"time_step_rank": "auto (ceil(256 / 16) = 16)"},
            "tokens_per_step": TOKENS_PER_STEP, "lengths": args.lengths,
            "batch_sizes": {str(L): TOKENS_PER_STEP // L for L in args.lengths},
            "training_step": "forward + model cross-entropy (labels = input_ids) + backward, no optimizer, "
                             "model.train(), dropout 0, use_cache=False",
            "rounds": args.rounds, "steps_per_round": args.steps, "budget_seconds": args.budget,
            "retries_single_step": args.retries,
            "slow_step_seconds": args.slow_step, "decode_rounds": args.decode_rounds,
            "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "seed": args.seed, "quick": args.quick,
            "decode_timing": (f"greedy generate, batch 1, {PROMPT_TOKENS}-token prompt; prefill = t(1 new token); "
                              f"decode ms/token = (t({NEW_TOKENS}) - t(1)) / {NEW_TOKENS - 1}, medians over rounds"),
            "iqr": "statistics.quantiles(method='inclusive'); iqr_over_median = (q3 - q1) / median",
            "cpu_over_wall": "process CPU seconds / wall seconds per timed step (median); ~2.0 = 2 uncontended threads",
            "other_processes_cores": ("CPU used by other processes during each timed step, in cores (/proc/stat "
                                      "busy time minus this process's CPU time, over wall time); 0 = uncontended"),
            "quiet_gate": {"threshold_cores": args.quiet_threshold, "max_wait_seconds": args.quiet_wait,
                           "max_total_wait_seconds": args.quiet_wait_total},
        },
        "implementations": {name: IMPLS[name] for name in impls},
        "not_run": not_run,
        "parameters": parameters,
        "training": train,
        "decode": decode,
    }
    finish(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.output}")
    print(result["markdown"])


if __name__ == "__main__":
    main()
