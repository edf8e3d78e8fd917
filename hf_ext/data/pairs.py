"""Preference pairs: (prompt, chosen, rejected) rows, validated, and hard negatives for verifiable tasks.

Hard negatives are rejected responses that a verifier proves wrong while staying close to the right one:
- `wrong_answer`: the task's own near miss (a sum off by one digit, two numbers swapped, two letters swapped);
- `truncation`: the right answer cut short;
- `off_topic`: the right answer to a different prompt of the same task.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset

from hf_ext.data.tasks import Task, TrainingPrompts
from hf_ext.errors import UserInputError

NEGATIVE_KINDS = ("wrong_answer", "truncation", "off_topic")


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


def sampled_pairs(model, tokenizer, prompts: list[str], data_format, method: str, k: int = 4, task: Task | None = None,
                  answers: list[str] | None = None, judge=None, temperature: float = 0.8, max_new_tokens: int = 16,
                  batch_size: int = 16, seed: int = 0) -> tuple[Dataset, dict]:
    """Pairs from the model's own samples, and their quality statistics.

    - `best_of_n`: `k` samples per prompt, scored by the task's reward (or, without a task, by the judge: the sum of
      a sample's margins against the others); the best is chosen against each strictly worse one (up to k-1 pairs).
    - `judge`: two samples per prompt judged A/B in both orders; a pair is kept only when both orders agree.
    """
    from hf_ext.generation import generate

    if method not in ("best_of_n", "judge"):
        raise ValueError(f"unknown method {method!r}")
    if method == "judge" or task is None:
        if judge is None:
            raise ValueError(f"method {method} without a verifiable task needs a judge model")
    k = 2 if method == "judge" else k
    encoded = [data_format.prompt_ids(p, tokenizer) for p in prompts]
    raw = generate(model, tokenizer, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens, num_samples=k,
                   temperature=temperature, seed=seed, desc=f"Sampling {k} per prompt")
    groups = [list(dict.fromkeys(r for r in (data_format.extract_response(s) for s in samples) if r)) for samples in raw]

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

    agreements: list[bool] = []
    for g, group in enumerate(groups):
        prompt = prompts[g]
        if len(group) < 2:
            continue
        if method == "judge":
            verdict = verdicts[(prompt, group[0], group[1])]
            agreements.append(verdict.agree)
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
        "method": method,
        "scored_by": "judge" if use_judge else f"{task.name} verifier reward",
        "samples_per_prompt": k,
        "prompts": len(prompts),
        "prompts_with_a_pair": len(set(pairs["prompt"])),
        "pairs": len(pairs["prompt"]),
        "margin": _quantiles(pairs["margin"]),
        "both_orders_agree_fraction": sum(agreements) / len(agreements) if agreements else None,
    }
    return Dataset.from_dict(pairs), stats


def make_task_pairs(
    model: str | None,
    prompts: TrainingPrompts,
    output: str | Path,
    method: str = "best_of_n",
    data_format: str = "messages",
    k: int = 4,
    judge: str | None = None,
    temperature: float = 0.8,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    load_in_4bit: bool = False,
) -> dict:
    """`hf-ext data make-pairs`: preference pairs for the task's training `prompts`, written with their QC manifest
    (which the manifest returned holds). `hard_negatives` needs no model; `best_of_n` and `judge` sample `model`
    (and judge with `judge`, by default `model` itself)."""
    from collections import Counter

    from hf_ext.data.tasks import TASKS

    rows = prompts.rows()  # an unknown task fails here, before any model loads
    task = TASKS[prompts.task]
    if method == "hard_negatives":
        dataset = task_pairs(task, rows, seed)
        stats = {"method": "hard_negatives", "pairs": len(dataset), "negative_kinds": dict(Counter(dataset["negative_kind"]))}
        return _write_pairs(dataset, output, stats, source_model=None)

    from hf_ext.data.formats import FORMATS
    from hf_ext.eval.judge import LogprobJudge
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    def load(reference):
        return load_model(ModelArguments(model_name_or_path=reference, load_in_4bit=load_in_4bit)), load_tokenizer(reference)

    sampler, tokenizer = load(model)
    scorer = None
    if judge or method == "judge":
        judge_model, judge_tokenizer = (sampler, tokenizer) if judge in (None, model) else load(judge)
        scorer = LogprobJudge(judge_model, judge_tokenizer, batch_size=batch_size)
    dataset, stats = sampled_pairs(
        sampler, tokenizer, list(rows["prompt"]), FORMATS[data_format], method, k=k, task=task,
        answers=list(rows["answer"]), judge=scorer, temperature=temperature, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed,
    )
    return _write_pairs(dataset, output, {**stats, "data_format": data_format}, source_model=model)


def _write_pairs(dataset: Dataset, output: str | Path, stats: dict, source_model: str | None) -> dict:
    import json

    from hf_ext.data.manifest import write_data_file

    if len(dataset) == 0:
        raise UserInputError(
            f"make-pairs: no prompt yielded a pair (every sample scored the same, or the judge's orders disagreed); "
            f"raise --num_prompts, --k or --temperature. Stats: {json.dumps(stats)}"
        )
    return write_data_file(output, list(dataset), generator="hf_ext.data.pairs", qc=stats, source_model=source_model)
