"""Health numbers of an mHC model's hyper-connections on real inputs (specs/mhc.md: what to log during training).

- stream spread, per decoder layer: RMS distance of the `n` streams from their mean, relative to the streams' RMS.
  0 means the streams are identical (mHC degenerated to a plain residual at `n` times the memory).
- column error, per sub-layer: max over tokens of `|column sum of H_res - 1|` (the backward gain, which Sinkhorn
  only approximates; rows are exact by construction).
- composite Amax gain: for the product of every sub-layer's `H_res` (per token), the max absolute row sum (forward)
  and column sum (backward). 1 is non-expansive; unconstrained HC reaches ~3000 in the paper.
"""

from __future__ import annotations

import torch

from hf_ext.generation import eval_mode
from hf_ext.models.mhc.modeling_mhc import MHCHyperConnection


def hyper_connection_modules(model) -> list[MHCHyperConnection]:
    return [m for m in model.modules() if isinstance(m, MHCHyperConnection)]


@torch.no_grad()
def hyper_connection_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """Per-layer spread, per-sub-layer column error and the composite gains, from one forward pass."""
    modules = hyper_connection_modules(model)
    combs: list[torch.Tensor] = []

    def record(module, args, outputs):
        combs.append(outputs[1].float())  # (post, comb, collapsed); comb = H_res^T

    hooks = [module.register_forward_hook(record) for module in modules]
    try:
        with eval_mode(model):
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_streams
    finally:
        for hook in hooks:
            hook.remove()

    keep = attention_mask.bool() if attention_mask is not None else torch.ones(input_ids.shape, dtype=torch.bool)
    keep = keep.to(input_ids.device)
    spreads = []
    for streams in hidden[1:]:
        streams = streams[keep].float()  # [tokens, n, C]
        deviation = streams - streams.mean(-2, keepdim=True)
        spreads.append((deviation.square().mean().sqrt() / streams.square().mean().sqrt().clamp_min(1e-30)).item())

    h_res = [comb[keep].transpose(-1, -2) for comb in combs]  # paper frame, [tokens, n, n]
    column_error = [(matrix.sum(-2) - 1).abs().max().item() for matrix in h_res]
    composite = torch.eye(h_res[0].shape[-1], device=h_res[0].device).expand_as(h_res[0])
    for matrix in h_res:
        composite = matrix @ composite
    return {
        "stream_spread": spreads,
        "column_error": column_error,
        "amax_gain_forward": composite.abs().sum(-1).max().item(),
        "amax_gain_backward": composite.abs().sum(-2).max().item(),
    }


def summarize(stats: dict) -> dict[str, float]:
    """The four numbers logged at every evaluation (`eval_hc_*`): the worst layer of each health measure."""
    return {
        "hc_min_stream_spread": min(stats["stream_spread"]),
        "hc_max_column_error": max(stats["column_error"]),
        "hc_amax_gain_forward": stats["amax_gain_forward"],
        "hc_amax_gain_backward": stats["amax_gain_backward"],
    }
