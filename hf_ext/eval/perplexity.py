"""Perplexity of a causal LM on held-out text (e.g. the `python_docs` validation documents): what a fine-tuning run
did to the model's general language modelling."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from hf_ext.generation import eval_mode


def text_perplexity(
    model, tokenizer, texts: list[str], block_size: int = 256, max_tokens: int = 16384, batch_size: int = 8
) -> dict:
    """`exp(mean next-token cross-entropy)` over `texts`, each followed by the EOS token, joined and cut into
    non-overlapping blocks of `block_size` tokens (each block scored without earlier context, as in
    `hf_ext.trainers.pretrain`), the first `max_tokens` tokens only. The same texts and settings give the same
    tokens for every model with this tokenizer, so the numbers compare across checkpoints."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    ids = ids[: len(ids) - len(ids) % block_size]  # whole blocks only
    if not ids:
        raise ValueError(f"text_perplexity: fewer than block_size={block_size} tokens in {len(texts)} texts")
    blocks = torch.tensor(ids).view(-1, block_size)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in tqdm(range(0, len(blocks), batch_size), desc="Perplexity", leave=False):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += batch[:, 1:].numel()
    mean_loss = total_loss / total_tokens
    return {"perplexity": math.exp(mean_loss), "mean_loss": mean_loss, "num_tokens": total_tokens,
            "block_size": block_size}
