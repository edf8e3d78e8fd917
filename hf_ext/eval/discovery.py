"""Discovery problems for the ttt_discover stage: one problem, many attempts, the best verified construction wins.

A problem is one class (`DiscoveryProblem`): a description, its initial states, how a completion becomes a new
state (`attempt`), and an exact verifier (`verify`) that recomputes the value of a construction from scratch. A
state's value is what the search maximises; the reward of a rollout is `reward(value)` (the value itself unless a
problem says otherwise), and an attempt that yields no valid construction has no reward (`Attempt.value is None`).

Built-in problems (`PROBLEMS`):
- `golomb_ruler`: the model writes a list of integers; the marks that keep all pairwise differences distinct (in the
  order written) form a Golomb ruler; value = number of marks - length / (max_length + 1): more marks first, then a
  shorter ruler. The best known ruler with all marks in [0, 100] has 12 marks (length 85).
- `spread_points`: the model writes Python (run in `hf_ext.eval.sandbox`) that changes `points`, 8 points in the unit
  square, starting from the parent state's `points`, injected as a global; value = the smallest pairwise distance.
  The prompt shows the placement and its closest pair and asks for a change (`points[i] = (x, y)` lines are enough,
  which a 135M model can write; any program works). The start is a random placement (0.082); the best known value
  for 8 points is 0.5176 (Schaer and Meir, 1965).

A user's own problem: subclass `DiscoveryProblem` and name it in the recipe as `problem: my_module:MyProblem`.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from hf_ext.errors import UserInputError


@dataclass
class Attempt:
    """What one completion produced: a verified construction and its value, or why there is none (`error`)."""

    construction: Any = None
    value: float | None = None
    code: str | None = None  # the program that was run, for problems whose completions are code
    output: str = ""  # what the program printed (last characters)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.value is not None and math.isfinite(self.value)


@dataclass
class SandboxLimits:
    """Limits of a sandboxed run of model-written code (`hf_ext.eval.sandbox.run_python`)."""

    timeout: float = 10.0
    memory_mb: int = 1024


class DiscoveryProblem(ABC):
    """One optimisation problem with an exact verifier (see the module docstring)."""

    name: str
    description: str
    runs_code: bool = False  # completions are Python programs run in the sandbox
    # The start of every answer: the prompt ends with it (after the chat template's generation prompt), the model
    # continues it, and `attempt` receives it followed by the completion. A small model that rambles or writes
    # functions it never calls is steered into the answer's format this way.
    answer_prefix: str = ""

    @abstractmethod
    def initial_constructions(self) -> list[Any]:
        """The constructions the search starts from (JSON values)."""

    @abstractmethod
    def verify(self, construction: Any) -> float | None:
        """The exact value of `construction` (higher is better), recomputed from scratch; None when it is invalid."""

    @abstractmethod
    def attempt(self, completion: str, parent_construction: Any, parent_code: str | None, limits: SandboxLimits) -> Attempt:
        """The new construction a completion proposes from the parent's, verified."""

    @abstractmethod
    def render_prompt(self, construction: Any, value: float, parent_value: float | None, code: str | None, output: str) -> str:
        """The prompt asking for an improvement of a state (its construction, value, parent's value, code, output)."""

    def initial_code(self, construction: Any) -> str | None:
        """The program shown for an initial state of a code problem."""
        return None

    def reward(self, value: float) -> float:
        """The reward of a valid attempt of value `value`."""
        return float(value)

    def key(self, construction: Any) -> str:
        """Two attempts with the same key are the same state (deduplication in the archive)."""
        return json.dumps(construction, sort_keys=True)


class GolombRuler(DiscoveryProblem):
    name = "golomb_ruler"
    description = (
        "A Golomb ruler is a set of integer marks such that the differences between any two marks are all different. "
        "Find a Golomb ruler with as many marks as possible, all between 0 and {max_length}."
    )

    def __init__(self, max_length: int = 100):
        self.max_length = max_length

    def initial_constructions(self) -> list[Any]:
        return [[0, 1, 3]]

    def verify(self, construction: Any) -> float | None:
        if not isinstance(construction, list) or len(construction) < 2:
            return None
        if not all(isinstance(m, int) and not isinstance(m, bool) for m in construction):
            return None
        marks = sorted(construction)
        if len(set(marks)) != len(marks) or marks[0] != 0 or marks[-1] > self.max_length:
            return None
        differences = [b - a for a, b in itertools.combinations(marks, 2)]
        if len(set(differences)) != len(differences):
            return None
        return len(marks) - marks[-1] / (self.max_length + 1)

    def attempt(self, completion, parent_construction, parent_code, limits) -> Attempt:
        numbers = last_integer_list(completion)
        if numbers is None:
            return Attempt(error="no list of integers in the answer")
        marks: list[int] = []
        differences: set[int] = set()
        for mark in numbers:  # keep, in the order written, each mark that repeats no difference
            new = {abs(mark - other) for other in marks}
            if mark in marks or new & differences or len(new) < len(marks):
                continue
            marks.append(mark)
            differences |= new
        if len(marks) < 2:
            return Attempt(error="fewer than 2 marks")
        ruler = sorted(m - min(marks) for m in marks)
        if ruler[-1] > self.max_length:
            return Attempt(error=f"longer than {self.max_length}")
        return Attempt(construction=ruler, value=self.verify(ruler))

    def render_prompt(self, construction, value, parent_value, code, output) -> str:
        change = "" if parent_value is None else f" (its parent scored {parent_value:.4f})"
        return (
            self.description.format(max_length=self.max_length)
            + f"\nCurrent ruler, {len(construction)} marks, score {value:.4f}{change}: {construction}\n"
            "Write a Golomb ruler with more marks than the current one. Answer with the list of marks only, "
            "like [0, 1, 3]."
        )


class SpreadPoints(DiscoveryProblem):
    name = "spread_points"
    runs_code = True
    answer_prefix = "```python\npoints["
    description = (
        "Place {count} points in the unit square [0, 1] x [0, 1] so that the smallest distance between two of them is "
        "as large as possible."
    )

    def __init__(self, count: int = 8, seed: int = 3):
        if count < 2:
            raise UserInputError(f"problem_options: count must be >= 2 (a smallest distance needs two points), got {count}")
        self.count = count
        self.seed = seed

    def initial_constructions(self) -> list[Any]:
        # A random placement, rounded to 2 decimals: poor (for 8 points and seed 3 the smallest distance is 0.082,
        # between points 0 and 1, and the next ones are 0.130 and 0.150), so that moving one point can help.
        generator = random.Random(self.seed)
        return [[[round(generator.uniform(0.05, 0.95), 2), round(generator.uniform(0.05, 0.95), 2)]
                 for _ in range(self.count)]]

    def initial_code(self, construction) -> str:
        return "points = " + format_points(construction)

    def verify(self, construction: Any) -> float | None:
        if not isinstance(construction, list) or len(construction) != self.count:
            return None
        points = []
        for point in construction:
            if not isinstance(point, (list, tuple)) or len(point) != 2:
                return None
            # in range, which also rules out NaN, infinities and ints too large for a float (math.isfinite overflows)
            if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c <= 1.0 for c in point):
                return None
            points.append((float(point[0]), float(point[1])))
        return min(math.dist(a, b) for a, b in itertools.combinations(points, 2))

    def attempt(self, completion, parent_construction, parent_code, limits) -> Attempt:
        from hf_ext.eval.sandbox import run_python

        blocks = python_blocks(completion)  # the first: the one the answer prefix opens
        if not blocks:
            return Attempt(error="no ```python block in the answer")
        code = blocks[0]
        result = run_python(
            code, {"points": parent_construction}, result_expression="[list(p) for p in points]",
            timeout=limits.timeout, memory_mb=limits.memory_mb,
        )
        if not result.ok:
            return Attempt(code=code, output=result.output, error=result.error)
        value = self.verify(result.value)
        if value is None:
            return Attempt(code=code, output=result.output, error=f"points is not {self.count} points in the unit square")
        return Attempt(construction=result.value, value=value, code=code, output=result.output)

    def render_prompt(self, construction, value, parent_value, code, output) -> str:
        # The program of a state is the change that made it from its parent; the prompt shows the placement itself
        # (the program's starting `points`), the closest pair (what limits the value) and that change.
        first, second = min(itertools.combinations(range(len(construction)), 2),
                            key=lambda pair: math.dist(construction[pair[0]], construction[pair[1]]))
        change = "" if parent_value is None else f", its parent's {parent_value:.4f}"
        last_change = f"\nThe last change was:\n```python\n{code}\n```" if parent_value is not None and code else ""
        shown_output = f"\nIts output (last 300 characters):\n{output[-300:]}" if output.strip() else ""
        return (
            self.description.format(count=self.count)
            + f"\nCurrent points, smallest distance {value:.4f}{change}:\npoints = {format_points(construction)}"
            + f"\nThe closest pair is points[{first}] and points[{second}].{last_change}{shown_output}"
            + "\nWrite Python that changes `points` (it starts as above) so that the smallest distance grows, "
            f"for example:\n```python\npoints[{second}] = (0.9, 0.1)\n```\nAnswer with one ```python block."
        )


def format_points(points: list) -> str:
    """`[(x, y), ...]` with coordinates rounded to 4 decimals, as a prompt shows a placement."""
    return "[" + ", ".join(f"({round(x, 4):g}, {round(y, 4):g})" for x, y in points) + "]"


_INTEGER_LIST = re.compile(r"\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*,?\s*\]")
_PYTHON_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def last_integer_list(text: str) -> list[int] | None:
    """The integers of the last complete `[a, b, ...]` list of integers in `text`."""
    found = _INTEGER_LIST.findall(text)
    return [int(n) for n in re.findall(r"-?\d+", found[-1])] if found else None


def python_blocks(text: str) -> list[str]:
    """The fenced Python blocks of `text`, in order. An unclosed last block (cut by the length limit) counts too, up
    to its last line that ends a statement, so that a program cut in the middle of a line runs what it had written."""
    matches = [m for m in _PYTHON_BLOCK.finditer(text) if m.group(1).strip()]
    blocks = [m.group(1).strip("\n") for m in matches]
    if matches and not matches[-1].group(0).endswith("```"):
        blocks[-1] = longest_compiling_prefix(blocks[-1]) or blocks[-1]
    return blocks


def longest_compiling_prefix(code: str) -> str | None:
    """The longest run of whole first lines of `code` that compiles (None if no line does)."""
    import warnings

    lines = code.split("\n")
    with warnings.catch_warnings():  # e.g. SyntaxWarning for an invalid escape, once per candidate
        warnings.simplefilter("ignore")
        for end in range(len(lines), 0, -1):
            candidate = "\n".join(lines[:end])
            try:
                compile(candidate, "<answer>", "exec")
            except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
                continue
            return candidate if candidate.strip() else None
    return None


PROBLEMS: dict[str, type[DiscoveryProblem]] = {"golomb_ruler": GolombRuler, "spread_points": SpreadPoints}


def get_problem(name: str, options: dict | None = None) -> DiscoveryProblem:
    """The problem `name` (a built-in name or `module:Class`) built with `options`; a UserInputError naming the key
    `problem` otherwise."""
    if name in PROBLEMS:
        problem_class = PROBLEMS[name]
    elif ":" in name:
        module, _, class_name = name.partition(":")
        try:
            problem_class = getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError) as error:
            raise UserInputError(f"problem: cannot import {name!r} ({error})") from None
        if not (isinstance(problem_class, type) and issubclass(problem_class, DiscoveryProblem)):
            raise UserInputError(f"problem: {name!r} is not a hf_ext.eval.discovery.DiscoveryProblem subclass")
    else:
        raise UserInputError(
            f"problem: unknown problem {name!r}; built-in: {', '.join(PROBLEMS)} (or module:Class of your own)"
        )
    try:
        return problem_class(**(options or {}))
    except TypeError as error:
        raise UserInputError(f"problem_options: {error}") from None


__all__ = ["Attempt", "DiscoveryProblem", "GolombRuler", "PROBLEMS", "SandboxLimits", "SpreadPoints", "get_problem"]
