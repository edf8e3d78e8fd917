"""Preference pairs: (prompt, chosen, rejected) rows, validated, and hard negatives for verifiable tasks.

Hard negatives are rejected responses that a verifier proves wrong while staying close to the right one:
- `wrong_answer`: the task's own near miss (a sum off by one digit, two numbers swapped, two letters swapped);
- `truncation`: the right answer cut short;
- `off_topic`: the right answer to a different prompt of the same task.
"""

from __future__ import annotations

import random

from datasets import Dataset

from hf_ext.data.tasks import Task

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
