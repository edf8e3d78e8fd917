"""Exact-match accuracy of a model on a verifiable task, with batched greedy generation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hf_ext.data.formats import DataFormat
from hf_ext.data.tasks import Task
from hf_ext.errors import UserInputError
from hf_ext.generation import generate

logger = logging.getLogger("hf_ext")


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    data_format: DataFormat,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    desc: str = "Generating",
) -> list[str]:
    """Greedy responses to `prompts`, in order, with prompts encoded exactly as in training (`data_format`)."""
    encoded = [data_format.prompt_ids(prompt, tokenizer) for prompt in prompts]
    texts = generate(model, tokenizer, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc)
    return [data_format.extract_response(samples[0]) for samples in texts]


def evaluate_task(
    model,
    tokenizer,
    task: Task,
    examples,
    data_format: DataFormat,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    desc: str = "Evaluating",
) -> dict:
    """Accuracy (exact match after normalisation) and mean reward on `examples` (rows with `prompt`, `answer`)."""
    prompts, answers = list(examples["prompt"]), list(examples["answer"])
    responses = generate_responses(model, tokenizer, prompts, data_format, batch_size, max_new_tokens, desc)
    correct = [task.verify(r, a) for r, a in zip(responses, answers)]
    return {
        "task": task.name,
        "data_format": data_format.name,
        "num_examples": len(prompts),
        "accuracy": sum(correct) / max(len(prompts), 1),
        "mean_reward": sum(task.reward(r, a) for r, a in zip(responses, answers)) / max(len(prompts), 1),
        "prompts": prompts,
        "responses": responses,
        "samples": [
            {"prompt": p, "response": r, "answer": a, "correct": c}
            for p, r, a, c in list(zip(prompts, responses, answers, correct))[:5]
        ],
    }


@dataclass(frozen=True)
class TaskEvaluation:
    """What one model is scored on: the held-out split of `task` (sizes and seed as in its training, so it is the
    split the model never saw) and how it is loaded and prompted. `hf_ext.recipe.task_evaluation` builds it from a
    trained model's saved recipe."""

    task: str
    train_size: int
    eval_size: int
    seed: int
    data_format: str
    load_in_4bit: bool
    dtype: str
    num_examples: int | None = None  # score the first N held-out examples only


def evaluate_models(
    models: list[tuple[str, TaskEvaluation]],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    judge: str | None = None,
) -> dict:
    """Accuracy of each `(model reference, settings)` in turn, one model in memory at a time; with `judge`, the
    judge's win rate of every model's responses against the first model's (`judge_vs_first`).

    Returns `{"models": [...], "peak_rss_mb": ...}` (what `hf-ext eval --output` writes)."""
    from hf_ext.data.formats import detect_format
    from hf_ext.data.tasks import TASKS
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer, release_memory

    results = []
    for reference, settings in models:
        if settings.task not in TASKS:
            raise UserInputError(f"eval: task {settings.task!r} is not one of {', '.join(TASKS)} (pass --task)")
        task = TASKS[settings.task]
        split = task.splits(settings.train_size, settings.eval_size, settings.seed)["test"]
        if settings.num_examples:
            split = split.select(range(min(settings.num_examples, len(split))))
        data_format = detect_format(split.column_names, settings.data_format, f"task {task.name}")
        model_args = ModelArguments(model_name_or_path=reference, load_in_4bit=settings.load_in_4bit, dtype=settings.dtype)
        tokenizer = load_tokenizer(reference)
        model = load_model(model_args)
        result = evaluate_task(model, tokenizer, task, split, data_format, batch_size, max_new_tokens, desc=reference)
        del model  # one model in memory at a time
        release_memory()
        results.append({"model": reference, **result, "peak_rss_mb_so_far": peak_rss_mb()})
        logger.info("%s: %s accuracy %.3f on %d examples (%s)", reference, task.name, result["accuracy"],
                    result["num_examples"], data_format.name)
    if judge and len(results) > 1:
        from hf_ext.eval.judge import judge_against_first, load_judge

        judge_against_first(results, load_judge(judge), judge)
        release_memory()
    return {"models": results, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process' peak resident memory so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
