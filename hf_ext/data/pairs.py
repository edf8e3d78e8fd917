"""Preference pairs: (prompt, chosen, rejected) rows, validated, and hard negatives for verifiable tasks.

The methods of `hf-ext data make-pairs`:
- `hard_negatives`: no model; chosen = the reference answer, rejected = a hard negative (below);
- `on_policy`: the model's own samples; chosen = a sample the verifier accepts (the reference answer when the model
  has none), rejected = each distinct sample it rejects, or a hard negative when every sample was right, so every
  prompt gives at least one pair, and the pairs teach against the mistakes this model actually makes;
- `best_of_n`: the best of `k` samples by the task's reward (or the judge) against each worse one;
- `judge`: two samples judged A/B in both orders, kept when the orders agree.

Hard negatives are rejected responses that a verifier proves wrong while staying close to the right one:
- `wrong_answer`: the task's own near miss (a sum off by one digit, two numbers swapped, two letters swapped);
- `truncation`: the right answer cut short;
- `off_topic`: the right answer to a different prompt of the same task.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset

from hf_ext.data.instructions import InstructionPrompts
from hf_ext.data.tasks import Task, TrainingPrompts
from hf_ext.errors import UserInputError

NEGATIVE_KINDS = ("wrong_answer", "truncation", "off_topic")
METHODS = ("hard_negatives", "on_policy", "best_of_n", "judge")


def max_pairs_per_prompt(method: str, k: int) -> int:
    """The most pairs one prompt can give: what `--min_pairs` is checked against before any model loads."""
    return {"hard_negatives": 1, "on_policy": k, "best_of_n": k - 1, "judge": 1}[method]


def hard_negative(task: Task, completion: str, answer: str, other_completions: list[str], kind: str, rng: random.Random) -> str | None:
    """A response of `kind` that the task's verifier rejects, or None when this example has none of that kind."""
    if kind == "wrong_answer":
        candidate = task.near_miss(answer, rng)
    elif kind == "truncation":
        candidate = completion[: len(completion) // 2].rstrip() if len(completion) > 1 else None
    elif kind == "off_topic":
        others = [c for c in other_completions if c.strip() != completion.strip()]
        candidate = rng.choice(others) if others else None
    else:
        raise ValueError(f"unknown negative kind {kind!r}; one of {NEGATIVE_KINDS}")
    if not candidate or task.verify(candidate, answer):
        return None
    return candidate


def task_pairs(task: Task, rows: Dataset, seed: int, kinds: tuple[str, ...] = NEGATIVE_KINDS) -> Dataset:
    """One pair per row of a task split: chosen = the reference completion, rejected = a hard negative, with the
    negative kinds taken in turn (falling back to the next kind when a row has none of the current one)."""
    rng = random.Random(f"pairs-{task.name}-{seed}")
    completions = list(rows["completion"])
    pairs = {"prompt": [], "chosen": [], "rejected": [], "negative_kind": []}
    for index, row in enumerate(rows):
        for offset in range(len(kinds)):
            kind = kinds[(index + offset) % len(kinds)]
            rejected = hard_negative(task, row["completion"], row["answer"], completions, kind, rng)
            if rejected is not None:
                break
        else:
            continue
        pairs["prompt"].append(row["prompt"])
        pairs["chosen"].append(row["completion"])
        pairs["rejected"].append(rejected)
        pairs["negative_kind"].append(kind)
    return Dataset.from_dict(pairs)


def validate_pair(row: dict) -> str | None:
    """None if the pair is usable, else what is wrong with it."""
    for field in ("prompt", "chosen", "rejected"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "nothing" if value is None else ("an empty string" if isinstance(value, str) else type(value).__name__)
            return f"field '{field}': expected a non-empty string, got {got}"
    if row["chosen"].strip() == row["rejected"].strip():
        return "fields 'chosen' and 'rejected' are identical, so the pair teaches nothing"
    return None


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p25": pick(0.25), "median": pick(0.5), "p75": pick(0.75), "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}


def on_policy_pairs(task: Task, prompts: list[str], answers: list[str], references: list[str],
                    groups: list[list[str]], seed: int) -> tuple[dict[str, list], dict]:
    """The `on_policy` pairs of each prompt's distinct samples (`groups`), and where their responses came from."""
    rng = random.Random(f"on-policy-{task.name}-{seed}")
    pairs = {"prompt": [], "chosen": [], "rejected": [], "margin": [], "chosen_source": [], "rejected_source": []}
    samples = right_samples = without_a_sample = 0
    for prompt, answer, reference, group in zip(prompts, answers, references, groups):
        without_a_sample += not group
        right = [s for s in group if task.verify(s, answer)]
        wrong = [s for s in group if not task.verify(s, answer)]
        samples += len(group)
        right_samples += len(right)
        chosen, chosen_source = (right[0], "sample") if right else (reference, "reference")
        rejected = [(s, "sample") for s in wrong]
        if not rejected:  # every sample right, or none non-empty
            negative = hard_negative(task, chosen, answer, [], "wrong_answer", rng)
            rejected = [(negative, "hard_negative")] if negative else []
        for response, source in rejected:
            for key, value in zip(pairs, (prompt, chosen, response, 1.0, chosen_source, source)):
                pairs[key].append(value)
    sources = lambda key, value: sum(s == value for s in pairs[key])  # noqa: E731
    stats = {
        "distinct_samples": samples,
        "distinct_samples_right": right_samples,
        "prompts_without_a_sample": without_a_sample,  # every sample empty: a hard negative against the reference
        "chosen_from": {"sample": sources("chosen_source", "sample"), "reference": sources("chosen_source", "reference")},
        "rejected_from": {"sample": sources("rejected_source", "sample"),
                          "hard_negative": sources("rejected_source", "hard_negative")},
    }
    return pairs, stats


def sampled_pairs(model, tokenizer, prompts: list[str], data_format, method: str, k: int = 4, task: Task | None = None,
                  answers: list[str] | None = None, references: list[str] | None = None, judge=None,
                  temperature: float = 0.8, max_new_tokens: int = 16, batch_size: int = 16,
                  seed: int = 0) -> tuple[Dataset, dict]:
    """Pairs from the model's own samples, and their quality statistics.

    - `on_policy` (needs a task and the `references`): see the module docstring.
    - `best_of_n`: `k` samples per prompt, scored by the task's reward (or, without a task, by the judge: the sum of
      a sample's margins against the others); the best is chosen against each strictly worse one (up to k-1 pairs).
    - `judge`: two samples per prompt judged A/B in both orders; a pair is kept only when both orders agree.
    """
    from hf_ext.generation import generate

    if method not in ("on_policy", "best_of_n", "judge"):
        raise ValueError(f"unknown method {method!r}")
    if method == "on_policy" and (task is None or references is None):
        raise ValueError("method on_policy needs a verifiable task and its reference answers")
    if method == "judge" or task is None:
        if judge is None:
            raise ValueError(f"method {method} without a verifiable task needs a judge model")
    k = 2 if method == "judge" else k
    encoded = [data_format.prompt_ids(p, tokenizer) for p in prompts]
    raw = generate(model, tokenizer, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens, num_samples=k,
                   temperature=temperature, seed=seed, desc=f"Sampling {k} per prompt")
    groups = [list(dict.fromkeys(r for r in (data_format.extract_response(s) for s in samples) if r)) for samples in raw]
    common = {"method": method, "samples_per_prompt": k, "prompts": len(prompts)}
    if method == "on_policy":
        pairs, sources = on_policy_pairs(task, prompts, answers, references, groups, seed)
        stats = {**common, "scored_by": f"{task.name} verifier", "prompts_with_a_pair": len(set(pairs["prompt"])),
                 "pairs": len(pairs["prompt"]), **sources}
        return Dataset.from_dict(pairs), stats

    use_judge = method == "judge" or task is None
    verdicts = {}
    if use_judge:
        triples = [(prompts[g], group[i], group[j]) for g, group in enumerate(groups)
                   for i in range(len(group)) for j in range(i + 1, len(group))]
        for (prompt, a, b), verdict in zip(triples, judge.compare(triples, desc="Judging samples")):
            verdicts[(prompt, a, b)] = verdict

    pairs = {"prompt": [], "chosen": [], "rejected": [], "margin": []}

    def add(prompt: str, chosen: str, rejected: str, margin: float) -> None:
        for key, value in zip(pairs, (prompt, chosen, rejected, margin)):
            pairs[key].append(value)

    for g, group in enumerate(groups):
        prompt = prompts[g]
        if len(group) < 2:
            continue
        if method == "judge":
            verdict = verdicts[(prompt, group[0], group[1])]
            if verdict.agree:
                chosen, rejected = (group[0], group[1]) if verdict.margin > 0 else (group[1], group[0])
                add(prompt, chosen, rejected, abs(verdict.margin))
            continue
        if use_judge:
            scores = [0.0] * len(group)
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    margin = verdicts[(prompt, group[i], group[j])].margin
                    scores[i] += margin
                    scores[j] -= margin
        else:
            scores = [task.reward(sample, answers[g]) for sample in group]
        best = max(range(len(group)), key=lambda i: scores[i])
        for i in sorted(range(len(group)), key=lambda i: scores[i]):  # at most k - 1: every sample but the best
            if scores[i] < scores[best]:
                add(prompt, group[best], group[i], scores[best] - scores[i])
    stats = {
        **common,
        "scored_by": "judge" if use_judge else f"{task.name} verifier reward",
        "prompts_with_a_pair": len(set(pairs["prompt"])),
        "pairs": len(pairs["prompt"]),
        "margin": _quantiles(pairs["margin"]),
        # every comparison the judge made; best_of_n uses the mean margin of both orders even where they disagree
        "both_orders_agree_fraction": sum(v.agree for v in verdicts.values()) / len(verdicts) if verdicts else None,
    }
    return Dataset.from_dict(pairs), stats


def check_pair_request(method: str, k: int, min_pairs: int, num_prompts: int, task: str | None) -> None:
    """What `make_pairs` can tell before any model loads (the pipeline asks before its first step): a known method
    that fits the prompts (a verifier for `hard_negatives` and `on_policy`), k >= 2 where samples are compared, and
    `num_prompts` prompts that can give `min_pairs` pairs."""
    if method not in METHODS:
        raise UserInputError(f"make-pairs: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if task is None and method in ("hard_negatives", "on_policy"):
        raise UserInputError(f"make-pairs: method {method} needs a verifiable task (--task); for open-ended "
                             "instructions use best_of_n or judge, scored by the judge")
    if k < 2 and method in ("on_policy", "best_of_n"):
        raise UserInputError(f"make-pairs: method {method} compares samples, so k must be at least 2, got {k}")
    most = num_prompts * max_pairs_per_prompt(method, k)
    if most < min_pairs:
        raise UserInputError(
            f"make-pairs: {num_prompts} prompts give at most {most} pairs with method {method} (k={k}), fewer than "
            f"min_pairs {min_pairs}; use at least {-(-min_pairs // max_pairs_per_prompt(method, k))} prompts"
        )


def make_pairs(
    model: str | None,
    prompts: TrainingPrompts | InstructionPrompts,
    output: str | Path,
    method: str = "best_of_n",
    data_format: str = "messages",
    k: int = 4,
    judge: str | None = None,
    temperature: float = 0.8,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    min_pairs: int = 1,
    load_in_4bit: bool = False,
) -> dict:
    """`hf-ext data make-pairs`: preference pairs for `prompts` (a task's training prompts, or open-ended
    instructions from `hf-ext data generate-instructions`), written with their QC manifest (which the manifest
    returned holds); fewer than `min_pairs` pairs is an error, checked against the most the prompts can give before
    any model loads. `hard_negatives` needs no model; `on_policy`, `best_of_n` and `judge` sample `model` and score
    the samples with the task's verifier or, for open-ended instructions, with `judge` (by default `model` itself)."""
    from collections import Counter

    from hf_ext.data.tasks import TASKS

    check_pair_request(method, k, min_pairs, prompts.num_prompts, prompts.task)
    rows = prompts.rows()  # an unknown task or a bad instruction file fails here, before any model loads
    check_pair_request(method, k, min_pairs, len(rows), prompts.task)  # a file may hold fewer than asked
    task = TASKS[prompts.task] if prompts.task else None
    source = {"prompts": prompts.describe()}
    if method == "hard_negatives":
        dataset = task_pairs(task, rows, seed)
        stats = {"method": "hard_negatives", "pairs": len(dataset), "negative_kinds": dict(Counter(dataset["negative_kind"]))}
        return _write_pairs(dataset, output, stats, min_pairs, source_model=None, parameters=source)

    from hf_ext.data.formats import FORMATS
    from hf_ext.eval.judge import LogprobJudge
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    def load(reference):
        return load_model(ModelArguments(model_name_or_path=reference, load_in_4bit=load_in_4bit)), load_tokenizer(reference)

    sampler, tokenizer = load(model)
    scorer = None
    if judge or method == "judge" or task is None:  # no verifier: the judge scores (by default the model itself)
        judge_model, judge_tokenizer = (sampler, tokenizer) if judge in (None, model) else load(judge)
        scorer = LogprobJudge(judge_model, judge_tokenizer, batch_size=batch_size)
    dataset, stats = sampled_pairs(
        sampler, tokenizer, list(rows["prompt"]), FORMATS[data_format], method, k=k, task=task,
        answers=list(rows["answer"]) if task else None, references=list(rows["completion"]) if task else None,
        judge=scorer, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
    )
    parameters = {**source, "judge": (judge or model) if scorer is not None else None}
    return _write_pairs(dataset, output, {**stats, "data_format": data_format}, min_pairs, source_model=model,
                        parameters=parameters)


def _write_pairs(dataset: Dataset, output: str | Path, stats: dict, min_pairs: int, source_model: str | None,
                 parameters: dict | None = None) -> dict:
    import json

    from hf_ext.data.manifest import write_data_file

    if len(dataset) < max(min_pairs, 1):
        on_policy = ", or use method on_policy" if "verifier" in str(stats.get("scored_by")) else ""
        raise UserInputError(
            f"make-pairs: {len(dataset)} pairs, fewer than min_pairs {max(min_pairs, 1)} (a prompt gives no pair when "
            f"every sample scored the same or the judge's orders disagreed); raise --num_prompts, --k or "
            f"--temperature{on_policy}. Stats: {json.dumps(stats)}"
        )
    return write_data_file(output, list(dataset), generator="hf_ext.data.pairs", qc=stats, source_model=source_model,
                           parameters=parameters)
