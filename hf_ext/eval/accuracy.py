"""Exact-match accuracy of a model on a verifiable task, with batched greedy generation."""

from __future__ import annotations

from hf_ext.data.formats import DataFormat
from hf_ext.data.tasks import Task
from hf_ext.generation import generate


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
