"""mHC language model: a Llama-shaped decoder with manifold-constrained hyper-connections (arXiv 2512.24880).

The residual stream is widened to `n = config.hc_mult` streams, `x` of shape `[batch, seq, n, hidden]`. Every
sub-layer (attention, MLP) reads a weighted sum of the streams and writes its output back through its own
`MHCHyperConnection`:

    u  = sum_j H_pre[j] x[j]                       H_pre  = sigmoid(.) + eps            in (0, 1)
    y  = F(RMSNorm(u))                             F = attention or MLP (Llama's own modules)
    x' = H_res x + H_post y                        H_post = 2 sigmoid(.)                in (0, 2)
                                                   H_res  = Sinkhorn(.)                 doubly stochastic

The mappings are computed per token from the unweighted RMS-normalised flattened streams, in fp32, with the
parameter names and the Sinkhorn definition of transformers' DeepSeek-V4 (`DeepseekV4HyperConnection`): the matrix
is stored in the "comb" frame, `comb = H_res^T`, and applied as `comb^T @ x`. In that frame the columns of `comb`
(rows of `H_res`: the forward gain) sum to 1 exactly; its rows (the backward gain) only approximately.

The embedding is copied into all `n` streams once; after the last layer the streams are collapsed once
(`config.hc_collapse`), then normalised by the final RMSNorm and projected by `lm_head`.

`output_hidden_states=True` returns, as every transformers model does, `num_hidden_layers + 1` tensors of shape
`[batch, seq, hidden]`: the embedding, then every layer's streams collapsed the way the head reads them (the last one
is `last_hidden_state`, collapsed and normalised). The streams themselves, `[batch, seq, n, hidden]`, come under their
own name, `hidden_streams`.

This file is copied next to every saved checkpoint and runs under whichever transformers loads it, so it imports only
torch, transformers and its own folder, and speaks both cache vocabularies of the supported range (see `CACHE_FIELD`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_mhc import MHCConfig
from .hyper_connection_cpu import CPUDecodeKernels


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (5.23 and older `generate`
# still pass `past_key_values=`). Outputs carry the cache under the installed version's field name, forwards take it
# under either name, and the attention layers get it under the installed name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as `cache=` or under the pre-5.24 name `past_key_values=` (removed from `kwargs`)."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is not None and cache is not None:
        raise ValueError("pass the cache once: `cache` or `past_key_values`, not both")
    return legacy if cache is None else cache


@dataclass
class MHCModelOutputWithPast(BaseModelOutputWithPast):
    """
    hidden_streams (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The `n` residual streams `[batch, seq, n, hidden]`: the expanded embedding, then every layer's output.
    """

    hidden_streams: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MHCCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    hidden_streams (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The `n` residual streams `[batch, seq, n, hidden]`: the expanded embedding, then every layer's output.
    """

    hidden_streams: tuple[torch.FloatTensor, ...] | None = None


def sinkhorn(logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's Sinkhorn-Knopp projection of `[..., n, n]` logits, in the comb frame.

    Softmax over the last axis (+eps, so no row can underflow to all zeros), then column-normalise, then
    `iterations - 1` times row- and column-normalise; every divisor is `sum + eps`. The columns of the result sum to
    1 exactly; the rows approximately (closer with more iterations and flatter logits).
    """
    if logits.shape[-1] == 1:
        # One stream: the softmax of one logit is 1, so the result is the same number for every token, computed here
        # (the steps below, in Python floats: equal to rounding), because compiled, the chain of 2 x iterations
        # pointwise steps, each reading the last one twice, is inlined into one expression of 4^iterations terms.
        value = 1.0 + eps
        value = value / (value + eps)
        for _ in range(iterations - 1):
            value = value / (value + eps)
            value = value / (value + eps)
        return logits * 0 + value  # (zero gradient, as the softmax of one logit has)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iterations - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class SinkhornWithRecompute(torch.autograd.Function):
    """`sinkhorn` whose backward recomputes the iterations from the logits (DeepSeek's recompute strategy).

    Plain autograd would keep two intermediate matrices per iteration and token for the backward, 40 x n^2 floats
    per token and sub-layer at 20 iterations (more than the n x hidden streams themselves at hidden 384); this keeps
    only the logits, so training memory does not grow with `hc_sinkhorn_iters`. (No double backward through it.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iterations, ctx.eps = iterations, eps
        return sinkhorn(logits, iterations, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_comb: torch.Tensor):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.detach().requires_grad_()
            (grad_logits,) = torch.autograd.grad(sinkhorn(logits, ctx.iterations, ctx.eps), logits, grad_comb)
        return grad_logits, None, None


def project_doubly_stochastic(logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """`sinkhorn`, recomputed in the backward when eager; under `torch.compile` the compiler's partitioner chooses
    what to keep (what it keeps does not grow with the iterations either: tests/test_mhc_kernels.py)."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and logits.requires_grad):
        return sinkhorn(logits, iterations, eps)
    return SinkhornWithRecompute.apply(logits, iterations, eps)


def weighted_sum(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """`sum_j weights[.., j] * streams[.., j, :]`.

    Eager, a batched matmul: broadcast-multiply-and-sum over the stream axis has a backward that reduces over a
    strided axis (~30x slower on CPU), and unrolling over j costs 2n passes over the streams. Under `torch.compile`,
    unrolled over the n streams: inductor fuses that into one loop over the contiguous hidden axis, forward and
    backward (a batched matmul of n x n matrices stays an opaque library call there: 76 against 66 ms for one
    hyper-connection's forward + backward at 4096 tokens, hidden 384, measured on a 2-core CPU).
    """
    if torch.compiler.is_compiling():
        return sum(weights[..., j, None] * streams[..., j, :] for j in range(streams.shape[-2]))
    return torch.matmul(weights.unsqueeze(-2), streams).squeeze(-2)


def normalized_projection(flat: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`linear(flat / rms(flat), weight)` with the unweighted RMS over the last axis, scaled after the matmul (equal,
    and one pass less over the `n * hidden` streams; fused mHC kernels do the same)."""
    inverse_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1] + eps)
    return F.linear(flat, weight) * inverse_rms


def hyper_connection_mappings(
    streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iterations: int, eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(pre [.., n], post [.., n], comb [.., n, n])` in fp32 for streams `[.., n, hidden]` (see the module docstring)."""
    n = streams.shape[-2]
    with torch.autocast(device_type=streams.device.type, enabled=False):
        mixes = normalized_projection(streams.flatten(-2).float(), fn.float(), norm_eps)
        pre_w, post_w, res_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, res_b = base.float().split([n, n, n * n])
        pre_scale, post_scale, res_scale = scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_scale + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * post_scale + post_b)
        res_logits = res_w.unflatten(-1, (n, n)) * res_scale + res_b.view(n, n)
        comb = project_doubly_stochastic(res_logits, iterations, eps)
    return pre, post, comb


def read_streams(
    streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iterations: int, eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hyper-connection's read: `(post, comb, sum_j H_pre[j] x[j])`, the first two kept for `write_streams`."""
    pre, post, comb = hyper_connection_mappings(streams, fn, base, scale, iterations, eps, norm_eps)
    with torch.autocast(device_type=streams.device.type, enabled=False):  # the streams keep their dtype, as a residual
        return post, comb, weighted_sum(pre.to(streams.dtype), streams)


def write_streams(streams: torch.Tensor, output: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`x'[k] = sum_j comb[j, k] x[j] + H_post[k] y` (eager as matmuls, compiled unrolled: see `weighted_sum`)."""
    dtype = streams.dtype
    comb, post, output = comb.to(dtype), post.to(dtype), output.to(dtype)
    with torch.autocast(device_type=streams.device.type, enabled=False):  # the streams keep their dtype, as a residual
        if torch.compiler.is_compiling():
            mixed = [weighted_sum(comb[..., k], streams) + post[..., k, None] * output for k in range(streams.shape[-2])]
            return torch.stack(mixed, dim=-2)
        return torch.matmul(comb.transpose(-1, -2), streams) + torch.matmul(post.unsqueeze(-1), output.unsqueeze(-2))


def collapse_learned(
    streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, eps: float, norm_eps: float
) -> torch.Tensor:
    """DeepSeek-V4's head collapse: `sum_j w_j x[j]`, `w = sigmoid(alpha (z Phi) + b) + eps`, weights in fp32."""
    with torch.autocast(device_type=streams.device.type, enabled=False):
        mixes = normalized_projection(streams.flatten(-2).float(), fn.float(), norm_eps)
        weights = torch.sigmoid(mixes * scale.float() + base.float()) + eps
        return weighted_sum(weights.to(streams.dtype), streams)


class HyperConnectionKernels:
    """Runs the hyper-connection functions above eagerly or fused by `torch.compile` (`config.hc_kernel`).

    Eager, every function is a dozen small kernels (the Sinkhorn loop alone ~80), each a pass over the
    `[tokens, n, hidden]` streams or a launch for a few floats: memory traffic in training, launch overhead in
    decoding. Compiled, inductor fuses each function into a few loops (C++/OpenMP on a CPU, Triton on a GPU).

    One shared instance (`HC_KERNELS`) holds the compiled functions, so that every layer and every model of the
    process reuses them. The per-token dimensions are flattened into one dimension marked dynamic, so training,
    prefill and batched decoding share one graph per grad mode and single-token decoding (1 token, specialised by
    torch) one more: nothing recompiles per decoding step. A compiled path that cannot be built (no C++ compiler,
    no Triton, an unsupported device or Python) logs one line and the eager functions are used from then on.

    `auto` on a CPU decodes (no autograd, a few tokens) with the C++ twins of the functions in
    hyper_connection_cpu.py, one call each; when those cannot be built, it writes eagerly and reads compiled.
    """

    COMPILABLE_DEVICES = ("cpu", "cuda")

    # Decoding steps (no autograd, at most this many tokens) on a CPU: `auto` calls the C++ kernels of
    # hyper_connection_cpu.py, whose 13-27 us per call (the work included) is less than a compiled call's fixed cost
    # (45-80 us) or the ~80 eager operators of a read. They are single-threaded: longer inputs take the paths that
    # use every core.
    CPU_DECODE_MAX_TOKENS = 64

    def __init__(self):
        self.compiled: dict = {}
        self.available: set[str] = set()  # device types whose compiler backend was found
        self.unavailable: dict[str, str] = {}  # device type -> why its compiled path is not used
        self.cpu_decode = CPUDecodeKernels()
        self.cpu_decode_twins = {read_streams: self.cpu_decode.read, write_streams: self.cpu_decode.write,
                                 collapse_learned: self.cpu_decode.collapse}

    def __call__(self, kernel: str, function, token_args: tuple, other_args: tuple):
        """`function(*token_args, *other_args)`; `token_args` are the per-token tensors `[*lead, ...]`, all with the
        same leading dimensions as the first (the streams), every output too."""
        streams = token_args[0]
        if kernel == "eager" or torch.compiler.is_compiling():
            return function(*token_args, *other_args)
        if (kernel == "auto" and streams.is_cpu and not torch.is_grad_enabled()
                and streams.shape[:-2].numel() <= self.CPU_DECODE_MAX_TOKENS):
            parameters = tuple(arg for arg in other_args if isinstance(arg, torch.Tensor))
            if self.cpu_decode.accepts(token_args, parameters):
                return self.cpu_decode_twins[function](*token_args, *other_args)
            if function is write_streams:  # two small matmuls cost less than a compiled call here
                return function(*token_args, *other_args)
        device = streams.device.type
        if not self.usable(kernel, device):
            return function(*token_args, *other_args)
        try:
            with backward_built_with_forward():
                return self.call_compiled(function, device, token_args, other_args)
        except Exception as error:  # noqa: BLE001  (narrowed by is_compile_failure)
            if not is_compile_failure(error):
                raise
            # An error of the inputs themselves raises here again, eagerly, and leaves the compiled path enabled.
            outputs = function(*token_args, *other_args)
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            self.available.discard(device)
            self.unavailable[device] = f"torch.compile failed ({type(error).__name__}: {message})"
            logger.warning(f"mHC hc_kernel={kernel!r}: {self.unavailable[device]}; using the eager hyper-connections")
            return outputs

    def usable(self, kernel: str, device: str) -> bool:
        if device in self.available:
            return True
        if device not in self.unavailable:
            reason = compiler_unavailable(device)
            if reason is None:
                self.available.add(device)
                return True
            self.unavailable[device] = reason
            # `auto` on a device without a compiled path is the documented choice; a `compiled` request that cannot
            # be honoured is worth a warning.
            log = logger.warning if kernel == "compiled" else logger.info
            log(f"mHC hc_kernel={kernel!r}: {reason}; using the eager hyper-connections")
        return False

    def call_compiled(self, function, device: str, token_args: tuple, other_args: tuple):
        compiled = self.compiled.get((function, device))
        if compiled is None:
            # On a CPU the generated C++ wrapper (instead of Python) halves the cost of a decoding step's call.
            options = {"cpp_wrapper": True} if device == "cpu" else None
            compiled = self.compiled[function, device] = torch.compile(function, fullgraph=True, options=options)
        lead = token_args[0].shape[:-2]
        flat_args = []
        for tensor in token_args:
            flat = tensor.reshape(-1, *tensor.shape[len(lead):])
            torch._dynamo.maybe_mark_dynamic(flat, 0)
            flat_args.append(flat)
        outputs = compiled(*flat_args, *other_args)
        if isinstance(outputs, torch.Tensor):
            return outputs.reshape(*lead, *outputs.shape[1:])
        return tuple(output.reshape(*lead, *output.shape[1:]) for output in outputs)


def compiler_unavailable(device: str) -> str | None:
    """Why `torch.compile` cannot fuse the hyper-connections on `device`, or None if it can."""
    if device not in HyperConnectionKernels.COMPILABLE_DEVICES:
        return f"no compiled path for device {device!r}"
    try:
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python"
        if device == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        else:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton is not installed"
    except Exception as error:  # noqa: BLE001  (private torch APIs: any failure means "not available")
        return f"no compiler backend ({type(error).__name__}: {error})"
    return None


def backward_built_with_forward():
    """While autograd records, makes AOTAutograd build the backward together with the forward (it is lazy by
    default), so that a backward that cannot be built fails inside the fall-back above, not in `loss.backward()`."""
    config = torch._functorch.config
    if torch.is_grad_enabled() and hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def is_compile_failure(error: Exception) -> bool:
    """A failure of dynamo / inductor to build code (not an error of the computation itself)."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or isinstance(error, (OSError, ImportError))


HC_KERNELS = HyperConnectionKernels()


class FP32ParametersMixin:
    """Keeps this module's own parameters in fp32 through `model.to(torch.bfloat16)` / `.half()`.

    `from_pretrained(dtype=...)` already does this through `_keep_in_fp32_modules_strict`; a plain cast would
    otherwise round the mapping parameters to bf16, whose Sinkhorn output drifts ~5e-3 per layer.
    """

    def _apply(self, fn, recurse=True):
        originals = {name: param.data for name, param in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        for name, param in self.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = originals[name].to(device=param.device, dtype=torch.float32)
        return self


class MHCHyperConnection(FP32ParametersMixin, nn.Module):
    """The three mappings of one sub-layer: `H_pre` (read), `H_post` (write) and `H_res` (mix), per token.

    Parameters (DeepSeek-V4 names): `fn` = Phi `[n^2 + 2n, n * hidden]`, `base` = b `[n^2 + 2n]`, `scale` =
    (alpha_pre, alpha_post, alpha_res). Layout of the `n^2 + 2n` outputs: `[pre (n) | post (n) | res (n^2, row-major)]`.
    """

    def __init__(self, config: MHCConfig, sublayer_idx: int):
        super().__init__()
        self.hc_mult = config.hc_mult
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        self.eps = config.hc_eps
        self.norm_eps = config.hc_norm_eps
        self.sublayer_idx = sublayer_idx
        self.kernel = config.hc_kernel
        n = config.hc_mult
        self.fn = nn.Parameter(torch.empty(n * n + 2 * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty(n * n + 2 * n))
        self.scale = nn.Parameter(torch.empty(3))

    def initial_base(self, pre_init: str, res_diag: float) -> torch.Tensor:
        n = self.hc_mult
        pre = torch.zeros(n)
        if pre_init == "layer_mod_n" and n > 1:
            pre = torch.full((n,), -2.0)
            pre[self.sublayer_idx % n] = 2.0
        post = torch.zeros(n)
        res = torch.eye(n) * res_diag
        return torch.cat([pre, post, res.flatten()])

    def mappings(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(pre [.., n], post [.., n], comb [.., n, n])` in fp32 for streams `[.., n, hidden]` (always eager)."""
        return hyper_connection_mappings(
            streams, self.fn, self.base, self.scale, self.sinkhorn_iters, self.eps, self.norm_eps
        )

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(post, comb, collapsed)`: the write and mix matrices and the sub-layer input `sum_j H_pre[j] x[j]`."""
        other_args = (self.fn, self.base, self.scale, self.sinkhorn_iters, self.eps, self.norm_eps)
        return HC_KERNELS(self.kernel, read_streams, (streams,), other_args)

    def combine(self, streams: torch.Tensor, output: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """`x'[k] = sum_j comb[j, k] x[j] + H_post[k] y`."""
        return HC_KERNELS(self.kernel, write_streams, (streams, output, post, comb), ())


class MHCHyperHead(FP32ParametersMixin, nn.Module):
    """The final learned collapse (DeepSeek-V4's `hc_head`): `h = sum_j w_j x[j]`, `w = sigmoid(.) + eps`."""

    def __init__(self, config: MHCConfig):
        super().__init__()
        n = config.hc_mult
        self.eps = config.hc_eps
        self.norm_eps = config.hc_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))
        self.kernel = config.hc_kernel

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        other_args = (self.hc_fn, self.hc_base, self.hc_scale, self.eps, self.norm_eps)
        return HC_KERNELS(self.kernel, collapse_learned, (streams,), other_args)


class MHCDecoderLayer(GradientCheckpointingLayer):
    """Llama's attention and MLP, each wrapped in its own hyper-connection. Input and output `[B, T, n, C]`."""

    def __init__(self, config: MHCConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_hc = MHCHyperConnection(config, 2 * layer_idx)
        self.ffn_hc = MHCHyperConnection(config, 2 * layer_idx + 1)
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def dropout(self, output: torch.Tensor) -> torch.Tensor:
        """`config.residual_dropout` on a sub-layer's output. A module, so that tools which switch dropout off by
        module (TRL's `disable_dropout_in_model`) find it; called only when it would act, because the call alone
        costs more than a decoding step's whole hyper-connection."""
        if self.training and self.residual_dropout.p > 0:
            return self.residual_dropout(output)
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """`kwargs` carry the cache under `CACHE_FIELD` (the name `GradientCheckpointingLayer` and `LlamaAttention`
        of the installed transformers read)."""
        post, comb, collapsed = self.attn_hc(hidden_states)
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(collapsed),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.attn_hc.combine(hidden_states, self.dropout(attn_output), post, comb)

        post, comb, collapsed = self.ffn_hc(hidden_states)
        mlp_output = self.mlp(self.post_attention_layernorm(collapsed))
        return self.ffn_hc.combine(hidden_states, self.dropout(mlp_output), post, comb)


class MHCPreTrainedModel(PreTrainedModel):
    config: MHCConfig
    config_class = MHCConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MHCDecoderLayer"]
    _skip_keys_device_placement = [CACHE_FIELD]
    _keep_in_fp32_modules_strict = ["attn_hc", "ffn_hc", "hc_head"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Hidden states are collected by the forward itself: transformers' layout is `[batch, seq, hidden]`, the streams
    # `[batch, seq, n, hidden]` come as `hidden_streams`.
    _can_record_outputs = {"attentions": LlamaAttention}
    # Mapping biases and gates take no weight decay (HC practice); hf_ext's trainers read this list.
    _no_weight_decay_patterns = [r"_hc\.(base|scale)$", r"hc_head\.hc_(base|scale)$"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        phi_std = config.hc_phi_init_std or (config.hc_mult * config.hidden_size) ** -0.5
        if isinstance(module, MHCHyperConnection):
            init.normal_(module.fn, mean=0.0, std=phi_std)
            init.copy_(module.base, module.initial_base(config.hc_pre_init, config.hc_res_diag_init))
            init.constant_(module.scale, config.hc_alpha_init)
        elif isinstance(module, MHCHyperHead):
            init.normal_(module.hc_fn, mean=0.0, std=phi_std)
            init.zeros_(module.hc_base)
            init.constant_(module.hc_scale, config.hc_alpha_init)


class MHCModel(MHCPreTrainedModel):
    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MHCDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.hc_head = MHCHyperHead(config) if config.hc_collapse == "learned" else None
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def expand_streams(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, T, C] -> [B, T, n, C]`, the embedding copied into every stream."""
        return inputs_embeds.unsqueeze(-2).expand(-1, -1, self.config.hc_mult, -1).contiguous()

    def collapse_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """`[B, T, n, C] -> [B, T, C]` (before the final norm)."""
        if self.hc_head is not None:
            return self.hc_head(streams)
        return streams.sum(dim=-2) if self.config.hc_collapse == "sum" else streams.mean(dim=-2)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MHCModelOutputWithPast:
        cache = take_cache(cache, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # positional: the cache argument's name differs across the supported transformers versions
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        layer_kwargs = dict(attention_mask=causal_mask, position_ids=position_ids, position_embeddings=position_embeddings)

        streams = self.expand_streams(inputs_embeds)
        all_streams = (streams,) if output_hidden_states else None
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            streams = decoder_layer(streams, use_cache=use_cache, **{CACHE_FIELD: cache}, **layer_kwargs, **kwargs)
            if output_hidden_states:
                all_streams += (streams,)

        hidden_states = self.norm(self.collapse_streams(streams))
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = (inputs_embeds,) + tuple(self.collapse_streams(s) for s in all_streams[1:-1])
            all_hidden_states += (hidden_states,)
        return MHCModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            hidden_streams=all_streams,
            **{CACHE_FIELD: cache},
        )


class MHCForCausalLM(MHCPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.model = MHCModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MHCCausalLMOutputWithPast:
        outputs: MHCModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=take_cache(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MHCCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            hidden_streams=outputs.hidden_streams,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = [
    "MHCCausalLMOutputWithPast",
    "MHCForCausalLM",
    "MHCHyperConnection",
    "MHCHyperHead",
    "MHCModel",
    "MHCModelOutputWithPast",
    "MHCPreTrainedModel",
    "sinkhorn",
]
