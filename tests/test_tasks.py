import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ext.data.tasks import TASKS, normalize


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_deterministic_and_sized(name):
    task = TASKS[name]
    splits = task.splits(300, 50, seed=7)
    assert len(splits["train"]) == 300 and len(splits["test"]) == 50
    assert not set(splits["train"]["prompt"]) & set(splits["test"]["prompt"])
    again = task.splits(300, 50, seed=7)
    assert again["train"]["prompt"] == splits["train"]["prompt"]
    assert task.splits(300, 50, seed=8)["test"]["prompt"] != splits["test"]["prompt"]
    assert set(splits["train"].column_names) == {"prompt", "completion", "answer"}


@pytest.mark.parametrize("name", list(TASKS))
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_reference_completion_verifies_and_earns_full_reward(name, seed):
    task = TASKS[name]
    example = task.sample(random.Random(seed))
    assert task.verify(example.completion, example.answer)
    assert task.verify(f"  {example.completion}.\n", example.answer)
    assert task.reward(example.completion, example.answer) == 1.0
    assert not task.verify(example.completion + "0", example.answer)
    assert task.reward(example.completion + " x", example.answer) < 1.0


def test_addition_answers_are_correct_sums():
    for example in (TASKS["addition"].sample(random.Random(s)) for s in range(100)):
        a, b = [int(t) for t in example.prompt.removeprefix("What is ").split("?")[0].split(" + ")]
        assert 10 <= a <= 99 and 10 <= b <= 99 and example.answer == str(a + b)


def test_sorting_partial_reward_counts_positions():
    task = TASKS["sorting"]
    assert task.reward("1 2 3 5 4", "1 2 3 4 5") == pytest.approx(0.99 * 3 / 5)
    assert task.reward("5 4 3 2 1", "1 2 3 4 5") == pytest.approx(0.99 * 1 / 5)


def test_normalize():
    assert normalize(" 12 \n") == "12" and normalize("1  2 3.") == "1 2 3"


def test_impossible_split_size_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct prompts"):
        TASKS["addition"].splits(8000, 200)
