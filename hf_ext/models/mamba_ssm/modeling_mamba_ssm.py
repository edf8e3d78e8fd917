"""Mamba selective-SSM models with the Mamba-2 (SSD) mixer, causal or bidirectional.

Mixer, per block (`h = h + Dropout(Mixer(RMSNorm(h)))`):

    in_proj(h) -> [z | xBC | dt_raw]
    xBC -> causal depthwise conv (k = conv_kernel) -> SiLU -> [x | B | C]
    dt = clamp(softplus(dt_raw + dt_bias), time_step_limit),  A = -exp(A_log)   (one scalar per head)
    y  = SSM scan of (x, dt, A, B, C) + D * x
    out_proj(RMSNorm_gated(y, z))

The scan (`ssd_scan`) is the chunked SSD algorithm (arXiv 2405.21060) in pure PyTorch and fp32: matmuls inside each
chunk of `chunk_size` tokens and a recurrence over the `L / chunk_size` chunk states, so the cost is linear in `L`.
`sequential_scan` is the token-by-token recurrence it is tested against.

Padding is exact, left or right, in every layer and direction: the pre-conv input and the post-conv activation are
zeroed at pads, and `dt = 0` at pads, which makes a pad the identity element of the scan (`exp(0 * A) = 1`, no input).

The bidirectional mixer (Caduceus-style) adds a reverse scan over the flipped sequence with its own `conv1d_rev`,
`dt_bias_rev`, `A_log_rev`, `D_rev`; both directions share `in_proj`, the gated norm and `out_proj`.

Weights use the names and shapes of transformers' `Mamba2ForCausalLM`, so its checkpoints load unchanged.

This file is copied next to every saved checkpoint and runs under whichever transformers loads it, so it imports only
torch, transformers and its own folder, and speaks both cache vocabularies of the supported range (see `CACHE_FIELD`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.mamba2.modeling_mamba2 import Mamba2RMSNorm, MambaRMSNormGated
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging

from .configuration_mamba_ssm import MambaSSMConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field (`past_key_values` / `cache_params`) to `cache`; 5.23
# and older `generate` pass the cache back under the output's field name. Outputs carry the cache under the installed
# version's field name and forwards take it under any of the three names.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(cache, kwargs: dict):
    """The cache passed as `cache=` or under a pre-5.24 name, `past_key_values=` / `cache_params=` (removed from
    `kwargs`)."""
    for name in ("past_key_values", "cache_params"):
        legacy = kwargs.pop(name, None)
        if legacy is not None:
            if cache is not None:
                raise ValueError(f"pass the cache once: `cache` or `{name}`, not both")
            cache = legacy
    return cache


# --------------------------------------------------------------------------------------------------------------------
# The scan


def scan_dtype(t: torch.Tensor) -> torch.dtype:
    """The scan runs in fp32 (fp64 when given fp64, for exactness tests), whatever the weights' dtype."""
    return torch.promote_types(t.dtype, torch.float32)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """`out[..., i, j] = a[j+1] + ... + a[i]` for `j <= i` (0 on the diagonal), `-inf` above it.

    A masked cumsum rather than a difference of cumsums: every entry is a sum of non-positive terms, so
    `exp(segsum)` never overflows and keeps full relative precision.
    """
    length = a.size(-1)
    a = a[..., None].expand(*a.shape, length)
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(a.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~lower, -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan of `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`, `y_t = h_t C_t`.

    Shapes: `x [b, L, h, p]`, `dt [b, L, h]` (already softplus-ed, clamped and masked), `A [h]` (negative),
    `B, C [b, L, g, n]` with `h % g == 0` (contiguous head -> group map), `initial_state [b, h, p, n]`.
    Returns `y [b, L, h, p]` (without the `D x` skip) and the final state `[b, h, p, n]`, in `scan_dtype(x)`.
    """
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    dtype = scan_dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))

    pad = (-length) % chunk_size  # padding with dt = 0 is the identity of the recurrence
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    # Layout [b, c, g, (heads of the group,) Q, .]: B and C are shared by the heads of a group, so C B^T and the
    # matmuls with B and C run once per group rather than once per head.
    x = x.view(batch, chunks, chunk_size, groups, per_group, head_dim).permute(0, 1, 3, 4, 2, 5)
    dt = dt.view(batch, chunks, chunk_size, groups, per_group).permute(0, 1, 3, 4, 2)
    B, C = (t.view(batch, chunks, chunk_size, groups, state_size).transpose(2, 3) for t in (B, C))
    x_dt = x * dt.unsqueeze(-1)  # [b, c, g, hg, Q, p]
    a = dt * A.view(groups, per_group, 1)  # [b, c, g, hg, Q], <= 0
    decay = torch.exp(segsum(a))  # [b, c, g, hg, Q, Q]: exp(a[s+1] + ... + a[t]) for s <= t

    # 1. within each chunk: y_t = sum_{s <= t} (C_t . B_s) exp(a[s+1..t]) dt_s x_s
    scores = torch.matmul(C, B.transpose(-1, -2)).unsqueeze(3)  # [b, c, g, 1, Q, Q]
    y = torch.matmul(scores * decay, x_dt)
    # 2. the state each chunk adds: S_c = sum_s exp(a[s+1..end]) dt_s x_s B_s^T   [b, c, g, hg, p, n]
    weighted = (x_dt * decay[..., -1, :].unsqueeze(-1)).transpose(-1, -2)  # [b, c, g, hg, p, Q]
    chunk_states = torch.matmul(weighted.reshape(batch, chunks, groups, per_group * head_dim, chunk_size), B)
    chunk_states = chunk_states.view(batch, chunks, groups, per_group, head_dim, state_size)
    # 3. a recurrence over chunks, H_{c+1} = exp(sum a over chunk c) H_c + S_c (L / Q steps)
    chunk_decay = torch.exp(a.sum(dim=-1))[..., None, None]  # [b, c, g, hg, 1, 1]
    if initial_state is None:
        state = x.new_zeros(batch, groups, per_group, head_dim, state_size)
    else:
        state = initial_state.to(dtype).view(batch, groups, per_group, head_dim, state_size)
    states_in = []
    for c in range(chunks):
        states_in.append(state)
        state = chunk_decay[:, c] * state + chunk_states[:, c]
    states_in = torch.stack(states_in, dim=1)  # [b, c, g, hg, p, n], the state entering each chunk
    # 4. the entering state seen from every position: exp(a[start..t]) C_t H_c
    states_in = states_in.permute(0, 1, 2, 5, 3, 4).reshape(batch, chunks, groups, state_size, per_group * head_dim)
    from_state = torch.matmul(C, states_in).view(batch, chunks, groups, chunk_size, per_group, head_dim)
    y = y + from_state.transpose(3, 4) * torch.exp(torch.cumsum(a, dim=-1)).unsqueeze(-1)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return y, state.reshape(batch, heads, head_dim, state_size)


def selective_state_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence: `state [b, h, p, n]`, `x [b, h, p]`, `dt [b, h]`, `A [h]`, `B, C [b, g, n]`.
    Returns `(y [b, h, p], new state)` in the state's dtype (fp32 or fp64)."""
    heads = x.shape[1]
    dtype = state.dtype
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(heads // B.shape[1], dim=1)
    C = C.repeat_interleave(heads // C.shape[1], dim=1)
    state = torch.exp(dt * A)[..., None, None] * state + (dt.unsqueeze(-1) * x).unsqueeze(-1) * B.unsqueeze(-2)
    return torch.matmul(state, C.unsqueeze(-1)).squeeze(-1), state


def sequential_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-by-token recurrence `ssd_scan` computes (same arguments, minus `chunk_size`): the test reference."""
    batch, _, heads, head_dim = x.shape
    dtype = scan_dtype(x)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        y_t, state = selective_state_step(state, x_t, dt_t, A, B_t, C_t)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), state


# --------------------------------------------------------------------------------------------------------------------
# Optional CUDA kernels


_KERNELS: dict | None = None


def load_kernels() -> dict | None:
    """`mamba-ssm` / `causal-conv1d` kernels, imported once; `None` when either is missing.

    Our own loader rather than transformers' `lazy_load_kernel`: that one fetches kernels from the Hub at run time
    when the `kernels` package is installed, and its API differs between transformers releases; this file must run
    offline under every supported version, so it only imports what is installed (the `hf_ext[kernels]` extra)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from causal_conv1d import causal_conv1d_fn
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        except ImportError:
            _KERNELS = {}
        else:
            _KERNELS = {"causal_conv1d_fn": causal_conv1d_fn, "mamba_chunk_scan_combined": mamba_chunk_scan_combined}
    return _KERNELS or None


def check_kernels(config: MambaSSMConfig) -> None:
    if config.use_kernels is True and load_kernels() is None:
        raise ImportError(
            "use_kernels=True needs the CUDA kernels: pip install 'hf_ext[kernels]' (mamba-ssm, causal-conv1d) on a "
            "CUDA machine; use_kernels='auto' falls back to the PyTorch scan"
        )


# --------------------------------------------------------------------------------------------------------------------
# Cache


class MambaSSMCache(Cache):
    """Recurrent state of a causal `MambaSSMForCausalLM`, per layer: O(1) memory in the sequence length.

    - `conv_states[i]`: `[batch, conv_dim, conv_kernel - 1]`, the masked pre-conv inputs ending at each row's last
      real token (zeros before the start of the sequence);
    - `ssm_states[i]`: `[batch, num_heads, head_dim, state_size]`, fp32.

    A `Cache` (so `generate` and its callers treat it as one) with its own per-layer storage rather than transformers'
    `LinearAttentionLayer`: that layer caches the last `conv_kernel` inputs of the segment, while an exact right-padded
    prefill needs the inputs ending at each row's last real token (`MambaSSMMixer.conv_context`; tested by
    `test_right_padded_prefill_then_one_step_equals_each_row_alone`).
    """

    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back (assisted decoding, deferred stop checks)

    def __init__(self, config: MambaSSMConfig):
        super().__init__(layers=[])
        self.num_layers = config.num_hidden_layers
        self.conv_states: list[torch.Tensor | None] = [None] * self.num_layers
        self.ssm_states: list[torch.Tensor | None] = [None] * self.num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"MambaSSMCache(num_layers={self.num_layers}, seen_tokens={self.seen_tokens})"

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether layer `layer_idx` (default: the first) already holds a state."""
        return self.ssm_states[layer_idx or 0] is not None

    @property
    def is_initialized(self) -> bool:
        return self.has_previous_state()

    @property
    def is_linear(self) -> list[bool]:
        return [True] * self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no sequence axis

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MambaSSMCache holds a recurrent state, which cannot be cropped")

    def _select(self, select) -> None:
        for states in (self.conv_states, self.ssm_states):
            for i, state in enumerate(states):
                if state is not None:
                    states[i] = select(state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the selected beams."""
        self._select(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda state: state[indices])

    def reset(self) -> None:
        self.conv_states = [None] * self.num_layers
        self.ssm_states = [None] * self.num_layers
        self.seen_tokens = 0


# --------------------------------------------------------------------------------------------------------------------
# Modules (the norms are transformers' Mamba2 ones: the block RMSNorm and the per-group gated RMSNorm)


class MambaSSMMixer(nn.Module):
    """The SSD mixer (see the module docstring), with an optional reverse direction."""

    def __init__(self, config: MambaSSMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.state_size = config.state_size
        self.n_groups = config.n_groups
        self.conv_kernel_size = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.intermediate_size = config.intermediate_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state_size

        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        # padding=0: the forward prepends the left context itself (zeros, or the cached inputs)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        if config.bidirectional:
            self.conv1d_rev = nn.Conv1d(
                self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=config.use_conv_bias
            )
            self.dt_bias_rev = nn.Parameter(torch.empty(self.num_heads))
            self.A_log_rev = nn.Parameter(torch.empty(self.num_heads))
            self.D_rev = nn.Parameter(torch.empty(self.num_heads))
        self.norm = MambaRMSNormGated(
            self.intermediate_size, self.intermediate_size // self.n_groups, eps=config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MambaSSMCache | None = None,
    ) -> torch.Tensor:
        z, xBC, dt_raw = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        mask = None if attention_mask is None else attention_mask.to(xBC.dtype).unsqueeze(-1)
        # This layer's own state decides: in the forward that fills the cache, earlier layers already hold theirs.
        if cache is not None and cache.has_previous_state(self.layer_idx) and hidden_states.shape[1] == 1:
            y = self.decode_step(xBC, dt_raw, mask, cache)
        else:
            conv_state = ssm_state = None
            if cache is not None:
                conv_state = cache.conv_states[self.layer_idx]
                ssm_state = cache.ssm_states[self.layer_idx]
            y, conv_state, ssm_state = self.scan(
                xBC, dt_raw, mask, self.conv1d, self.dt_bias, self.A_log, self.D, conv_state, ssm_state
            )
            if cache is not None:
                cache.conv_states[self.layer_idx] = conv_state
                cache.ssm_states[self.layer_idx] = ssm_state
            if self.config.bidirectional:
                # the reverse direction reads the flipped sequence; flipping moves right pads first, so the same
                # masking keeps it exact
                y_rev, _, _ = self.scan(
                    xBC.flip(1), dt_raw.flip(1), None if mask is None else mask.flip(1),
                    self.conv1d_rev, self.dt_bias_rev, self.A_log_rev, self.D_rev,
                )
                y = y + y_rev.flip(1)
        return self.out_proj(self.norm(y, z))

    def scan(
        self,
        xBC: torch.Tensor,
        dt_raw: torch.Tensor,
        mask: torch.Tensor | None,
        conv1d: nn.Conv1d,
        dt_bias: torch.Tensor,
        A_log: torch.Tensor,
        D: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One direction over a whole segment. Returns `y [b, L, intermediate]` and the conv / SSM state after each
        row's last real token (for a cache)."""
        batch, length, _ = xBC.shape
        context = self.conv_kernel_size - 1
        if mask is not None:
            xBC = xBC * mask  # 1. no pad enters the convolution
        inputs = xBC.transpose(1, 2)
        if conv_state is None:
            inputs = F.pad(inputs, (context, 0))
        else:
            inputs = torch.cat([conv_state.to(inputs.dtype), inputs], dim=-1)
        new_conv_state = self.conv_context(inputs, mask)

        kernels = self.kernels_for(xBC)
        if kernels is not None and conv_state is None:
            xBC = kernels["causal_conv1d_fn"](
                xBC.transpose(1, 2), conv1d.weight.squeeze(1), conv1d.bias, activation="silu"
            ).transpose(1, 2)
        else:
            xBC = F.silu(conv1d(inputs)).transpose(1, 2)
        if mask is not None:
            xBC = xBC * mask  # 2. nor does the conv bias leak into a pad
        x, B, C = xBC.split([self.intermediate_size, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)

        dt = self.time_step(dt_raw, dt_bias)
        if mask is not None:
            dt = dt * mask  # 3. dt = 0: a pad is the identity of the scan
        dtype = scan_dtype(x)
        A = -torch.exp(A_log.to(dtype))
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        B = B.unflatten(-1, (self.n_groups, self.state_size))
        C = C.unflatten(-1, (self.n_groups, self.state_size))
        with torch.autocast(device_type=x.device.type, enabled=False):
            if kernels is not None:
                y, new_ssm_state = kernels["mamba_chunk_scan_combined"](
                    x, dt.to(x.dtype), A, B, C, chunk_size=self.chunk_size,
                    initial_states=ssm_state, return_final_states=True,
                )
                y, new_ssm_state = y.to(dtype), new_ssm_state.to(dtype)
            else:
                y, new_ssm_state = ssd_scan(x, dt, A, B, C, self.chunk_size, initial_state=ssm_state)
            y = y + D.to(dtype)[:, None] * x.to(dtype)
        return y.flatten(-2).to(xBC.dtype), new_conv_state, new_ssm_state

    def time_step(self, dt_raw: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        dtype = scan_dtype(dt_raw)
        dt = F.softplus(dt_raw.to(dtype) + dt_bias.to(dtype))
        low, high = self.time_step_limit
        if low > 0.0 or high < math.inf:
            dt = dt.clamp(low, high)
        return dt

    def conv_context(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The `conv_kernel - 1` pre-conv input columns ending at each row's last real token, from `inputs`
        `[b, conv_dim, context + L]` (left context included)."""
        context = self.conv_kernel_size - 1
        if mask is None:
            return inputs[:, :, inputs.shape[-1] - context :]
        length = mask.shape[1]
        positions = torch.arange(length, device=mask.device)
        last_real = torch.where(mask[..., 0] > 0, positions, -1).amax(dim=1)  # -1 for a row of pads: the old context
        index = (last_real + 1)[:, None] + torch.arange(context, device=mask.device)
        return inputs.gather(2, index[:, None, :].expand(-1, inputs.shape[1], -1))

    def decode_step(
        self, xBC: torch.Tensor, dt_raw: torch.Tensor, mask: torch.Tensor | None, cache: MambaSSMCache
    ) -> torch.Tensor:
        """One new token per row: O(1) work, reading and updating the cache in place."""
        if mask is not None:
            xBC = xBC * mask
        window = torch.cat([cache.conv_states[self.layer_idx].to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
        cache.conv_states[self.layer_idx] = window[:, :, 1:]
        xBC = (window * self.conv1d.weight.squeeze(1)).sum(dim=-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC)
        if mask is not None:
            xBC = xBC * mask[:, 0]
        x, B, C = xBC.split([self.intermediate_size, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        dt = self.time_step(dt_raw[:, 0], self.dt_bias)
        if mask is not None:
            dt = dt * mask[:, 0]
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, cache.ssm_states[self.layer_idx] = selective_state_step(
                cache.ssm_states[self.layer_idx],
                x,
                dt,
                -torch.exp(self.A_log.to(scan_dtype(x))),
                B.unflatten(-1, (self.n_groups, self.state_size)),
                C.unflatten(-1, (self.n_groups, self.state_size)),
            )
            y = y + self.D.to(y.dtype)[:, None] * x.to(y.dtype)
        return y.flatten(-2).unsqueeze(1).to(xBC.dtype)

    def kernels_for(self, xBC: torch.Tensor) -> dict | None:
        """The CUDA kernels when the config allows them, they are installed and the tensors are on CUDA."""
        if self.config.use_kernels is False or not xBC.is_cuda or torch.compiler.is_compiling():
            return None
        kernels = load_kernels()
        if kernels is None:
            logger.warning_once("mamba_ssm: mamba-ssm / causal-conv1d not installed, using the PyTorch scan")
        return kernels


class MambaSSMBlock(GradientCheckpointingLayer):
    def __init__(self, config: MambaSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaSSMMixer(config, layer_idx=layer_idx)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MambaSSMCache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        hidden_states = self.mixer(hidden_states, attention_mask=attention_mask, cache=cache)
        return residual + self.dropout(hidden_states)


# --------------------------------------------------------------------------------------------------------------------
# Models


class MambaSSMPreTrainedModel(PreTrainedModel):
    config: MambaSSMConfig
    config_class = MambaSSMConfig
    base_model_prefix = "backbone"
    _input_embed_layer = "embeddings"  # transformers' embedding accessors then find them in every head
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MambaSSMBlock"]
    _is_stateful = True
    # The SSM's per-head parameters take no weight decay (as in the reference Mamba training setups).
    _no_weight_decay_patterns = [r"\.(A_log|D|dt_bias)(_rev)?$"]

    def __init__(self, config: MambaSSMConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        check_kernels(config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, MambaSSMMixer):
            directions = [("", module.conv1d)] + ([("_rev", module.conv1d_rev)] if config.bidirectional else [])
            for suffix, conv in directions:
                init.copy_(getattr(module, "A_log" + suffix), torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
                init.ones_(getattr(module, "D" + suffix))
                dt = torch.exp(
                    torch.rand(module.num_heads) * (math.log(config.time_step_max) - math.log(config.time_step_min))
                    + math.log(config.time_step_min)
                ).clamp(min=config.time_step_floor)
                init.copy_(getattr(module, "dt_bias" + suffix), dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
                init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
                if conv.bias is not None:
                    init.zeros_(conv.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            if config.rescale_prenorm_residual:
                module.out_proj.weight /= math.sqrt(config.num_hidden_layers)
        elif isinstance(module, (Mamba2RMSNorm, MambaRMSNormGated)):
            init.ones_(module.weight)


class MambaSSMModel(MambaSSMPreTrainedModel):
    def __init__(self, config: MambaSSMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([MambaSSMBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MambaSSMCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*):
            1 for real tokens, 0 for padding (left or right). With a cache, either the mask of the new tokens only or
            of the whole sequence so far (its last `seq` columns are used).
        cache (`MambaSSMCache`, *optional*):
            The state after the previous tokens (causal models only); updated in place. Also taken as
            `past_key_values` / `cache_params`, the names before transformers 5.24.
        use_cache (`bool`, *optional*):
            Return the cache (created if not given). Defaults to `config.use_cache` in eval, `False` in training.
        """
        cache = take_cache(cache, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.config.bidirectional and (use_cache or cache is not None):
            raise ValueError(
                "a bidirectional mamba_ssm model reads the whole sequence in both directions: it has no recurrent cache "
                "(pass use_cache=False, no cache)"
            )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states

        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and cache is None:
            cache = MambaSSMCache(self.config)
        length = inputs_embeds.shape[1]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -length:]
            if bool(attention_mask.all()):
                attention_mask = None  # nothing to mask: skip the masking work

        hidden_states = self.embedding_dropout(inputs_embeds)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, attention_mask=attention_mask, cache=cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states.to(self.norm_f.weight.dtype))
        if cache is not None:
            cache.seen_tokens += length
        if output_hidden_states:  # as in transformers: the last entry is the normalised `last_hidden_state`
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache})


class MambaSSMForCausalLM(MambaSSMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MambaSSMConfig):
        if config.bidirectional:
            raise ValueError(
                "MambaSSMForCausalLM needs bidirectional=False (a bidirectional mixer sees future tokens); use "
                "MambaSSMForMaskedLM for a bidirectional model"
            )
        super().__init__(config)
        self.backbone = MambaSSMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not inject a DynamicCache: the forward creates a MambaSSMCache

    def prepare_inputs_for_generation(
        self,
        input_ids,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        # the cache stays in `kwargs` under whichever name the installed `generate` uses
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None  # one new token per row; pads only ever precede it
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MambaSSMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Next-token labels, shifted inside the model (`labels = input_ids` works); -100 is ignored.
        """
        outputs = self.backbone(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=take_cache(cache, kwargs),
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )


class MambaSSMForMaskedLM(MambaSSMPreTrainedModel):
    """Bidirectional masked LM: logits at every position, loss on the labelled ones (no shift, -100 ignored)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MambaSSMConfig):
        if not config.bidirectional:
            raise ValueError(
                "MambaSSMForMaskedLM needs bidirectional=True: a causal model cannot see the right context of a mask"
            )
        super().__init__(config)
        self.backbone = MambaSSMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def generate(self, *args, **kwargs):
        raise ValueError(
            "MambaSSMForMaskedLM is bidirectional and cannot generate left to right; fill masks with its logits "
            "(hf_ext.eval.antibody_design samples edits this way) or train a causal mamba_ssm model"
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        use_cache: bool | None = None,
        cache: MambaSSMCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            The original token at masked positions, -100 elsewhere (no shift).
        """
        outputs = self.backbone(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=take_cache(cache, kwargs),
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(outputs.last_hidden_state.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class MambaSSMForSequenceClassification(MambaSSMPreTrainedModel):
    """A sequence-level head (`score`) for classification or regression (`config.num_labels`, `config.problem_type`).

    Pooling: the last real token for a causal model (the only position that has read the whole sequence), the mean over
    real tokens for a bidirectional one.
    """

    def __init__(self, config: MambaSSMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = MambaSSMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = hidden_states.new_ones(hidden_states.shape[:2])
        mask = attention_mask[:, -hidden_states.shape[1]:].to(hidden_states.dtype)
        if self.config.bidirectional:
            return (hidden_states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last_real = torch.where(mask > 0, positions, -1).amax(dim=1).clamp(min=0)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_real]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        labels (`torch.Tensor` of shape `(batch,)` or `(batch, num_labels)`, *optional*):
            Class indices, or float targets for regression (`num_labels == 1` or `problem_type="regression"`).
        """
        outputs = self.backbone(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )
        pooled = self.pool(outputs.last_hidden_state, attention_mask)
        logits = self.score(pooled).float()  # pooled has the backbone dtype; `score` may be 4-bit (uint8 weight)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "MambaSSMCache",
    "MambaSSMForCausalLM",
    "MambaSSMForMaskedLM",
    "MambaSSMForSequenceClassification",
    "MambaSSMModel",
    "MambaSSMPreTrainedModel",
    "selective_state_step",
    "sequential_scan",
    "ssd_scan",
]
