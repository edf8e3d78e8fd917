"""Batched generation from already-encoded prompts: one implementation for evaluation, data generation and
Best-of-N sampling. Prompts are grouped by length (little padding), left-padded, and returned in input order.
`eval_mode` is the one way every inference path in hf_ext switches a model to eval mode and back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (dropout off) and no gradients inside the block; the model's training mode is restored after it,
    also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` for prompts of different lengths, padded on the left."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "Generating",
) -> list[list[str]]:
    """`num_samples` decoded continuations (special tokens skipped) per prompt; greedy when `temperature` is 0.

    Sampling is seeded per batch, so the same call gives the same samples."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs: list[list[str]] = [[] for _ in prompt_ids]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with eval_mode(model):
        for batch_number, start in enumerate(tqdm(range(0, len(order), batch_size), desc=desc, unit="batch")):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch], pad_id)
            width = input_ids.shape[1]
            torch.manual_seed(seed * 1_000_003 + batch_number)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for row, i in enumerate(batch):
                outputs[i] = texts[row * num_samples : (row + 1) * num_samples]
    return outputs
