"""Exact-match accuracy of a model on a verifiable task, with batched greedy generation."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hf_ext.data.formats import DataFormat
from hf_ext.data.tasks import Task


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    data_format: DataFormat,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    desc: str = "Generating",
) -> list[str]:
    """Greedy responses to `prompts`, in order. Prompts are encoded exactly as in training (`data_format`),
    grouped by length to waste little padding, and left-padded."""
    encoded = [data_format.prompt_ids(prompt, tokenizer) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            attention_mask[row, width - len(encoded[i]) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            responses[i] = data_format.extract_response(text)
    model.train(was_training)
    return responses


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
        "samples": [
            {"prompt": p, "response": r, "answer": a, "correct": c}
            for p, r, a, c in list(zip(prompts, responses, answers, correct))[:5]
        ],
    }
