"""Verifiable tasks: deterministic generators with exact verifiers.

A task turns a seeded random generator into examples (`prompt`, `completion`, `answer`) and judges a model's response
with `verify` (exact match after normalisation) and `reward` (a float in [0, 1] for RL-style stages). Train and eval
splits never share a prompt. The same interface feeds SFT (prompt/completion), preference pairs (reward ranks
samples), SDFT and TTT-Discover.
"""

from __future__ import annotations

import dataclasses
import random
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from hf_ext.errors import UserInputError


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    answer: str


def normalize(text: str) -> str:
    """Whitespace-collapsed, with a trailing period removed: 'answer only' responses compare on content alone."""
    return " ".join(text.split()).rstrip(".").strip()


class Task(ABC):
    """A family of prompts with one exact answer each."""

    name: str
    description: str

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """One example drawn with `rng`."""

    def verify(self, response: str, answer: str) -> bool:
        return normalize(response) == normalize(answer)

    @abstractmethod
    def near_miss(self, answer: str, rng: random.Random) -> str:
        """A wrong answer close to `answer` (a hard negative for preference pairs)."""

    def reward(self, response: str, answer: str) -> float:
        return float(self.verify(response, answer))

    def splits(self, train_size: int, eval_size: int, seed: int = 42) -> DatasetDict:
        """`train` and `test` splits with disjoint prompts, identical for the same sizes and seed."""
        rng = random.Random(f"{self.name}-{seed}")
        seen: set[str] = set()
        rows: list[Example] = []
        attempts = 0
        while len(rows) < train_size + eval_size:
            attempts += 1
            if attempts > 50 * (train_size + eval_size) + 1000:
                raise ValueError(
                    f"task {self.name}: cannot draw {train_size + eval_size} distinct prompts "
                    f"(only {len(rows)} found); ask for fewer examples"
                )
            example = self.sample(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                rows.append(example)
        as_columns = lambda part: Dataset.from_dict(  # noqa: E731
            {key: [getattr(e, key) for e in part] for key in ("prompt", "completion", "answer")}
        )
        return DatasetDict(test=as_columns(rows[:eval_size]), train=as_columns(rows[eval_size:]))


class Addition(Task):
    def __init__(self, digits: int = 2):
        self.digits = digits
        self.name = "addition" if digits == 2 else f"addition_{digits}digit"
        self.description = f"sum of two {digits}-digit numbers"

    def sample(self, rng: random.Random) -> Example:
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        a, b = rng.randint(low, high), rng.randint(low, high)
        answer = str(a + b)
        return Example(f"What is {a} + {b}? Reply with the number only.", answer, answer)

    def near_miss(self, answer, rng):
        """The sum with one digit changed (never a leading zero)."""
        digits = list(answer)
        position = rng.randrange(len(digits))
        choices = [d for d in "0123456789" if d != digits[position] and not (position == 0 and d == "0")]
        digits[position] = rng.choice(choices)
        return "".join(digits)


class Sorting(Task):
    name = "sorting"
    description = "five numbers from 0 to 99 in ascending order"

    def sample(self, rng: random.Random) -> Example:
        numbers = [rng.randint(0, 99) for _ in range(5)]
        answer = " ".join(map(str, sorted(numbers)))
        prompt = (
            f"Sort these numbers in ascending order: {' '.join(map(str, numbers))}. "
            "Reply with the sorted numbers separated by spaces only."
        )
        return Example(prompt, answer, answer)

    def near_miss(self, answer, rng):
        """Two different numbers swapped."""
        numbers = answer.split()
        pairs = [(i, j) for i in range(len(numbers)) for j in range(i + 1, len(numbers)) if numbers[i] != numbers[j]]
        if not pairs:
            return answer + " 0"
        i, j = rng.choice(pairs)
        numbers[i], numbers[j] = numbers[j], numbers[i]
        return " ".join(numbers)

    def reward(self, response: str, answer: str) -> float:
        """Fraction of positions that hold the right number (1.0 only for the exact answer)."""
        got, want = normalize(response).split(), answer.split()
        if got == want:
            return 1.0
        return 0.99 * sum(g == w for g, w in zip(got, want)) / len(want)


class Reversal(Task):
    name = "reversal"
    description = "a five-letter lowercase string reversed"

    def sample(self, rng: random.Random) -> Example:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
        return Example(f"Reverse the string '{word}'. Reply with the reversed string only.", word[::-1], word[::-1])

    def near_miss(self, answer, rng):
        """The string not reversed, or two different letters swapped."""
        if answer[::-1] != answer and rng.random() < 0.5:
            return answer[::-1]
        letters = list(answer)
        pairs = [(i, j) for i in range(len(letters)) for j in range(i + 1, len(letters)) if letters[i] != letters[j]]
        if not pairs:
            return answer[:-1] + ("a" if answer[-1] != "a" else "b")
        i, j = rng.choice(pairs)
        letters[i], letters[j] = letters[j], letters[i]
        return "".join(letters)


TASKS: dict[str, Task] = {task.name: task for task in (Addition(2), Addition(3), Sorting(), Reversal())}


@dataclass(frozen=True)
class TrainingPrompts:
    """Which prompts of a task a data tool uses: `num_prompts` of its train split after skipping `offset` (those
    another data step used), never the held-out split that `hf-ext eval` scores (`eval_size` and `split_seed` as in
    the recipes: `task_eval_size` and `seed`)."""

    task: str
    num_prompts: int = 200
    offset: int = 0
    eval_size: int = 200
    split_seed: int = 42

    def __post_init__(self):
        if self.num_prompts < 1 or self.offset < 0 or self.eval_size < 0:
            raise UserInputError(f"task {self.task}: num_prompts must be >= 1, offset and eval_size >= 0; got "
                                 f"{self.num_prompts}, {self.offset} and {self.eval_size}")

    def describe(self) -> dict:
        """Which prompts these are, as recorded in the manifest of the data made from them."""
        return dataclasses.asdict(self)

    def rows(self):
        """The chosen train-split rows (`prompt`, `answer`)."""
        if self.task not in TASKS:
            raise UserInputError(f"data: unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        rows = TASKS[self.task].splits(self.offset + self.num_prompts, self.eval_size, seed=self.split_seed)["train"]
        return rows.select(range(self.offset, len(rows)))
