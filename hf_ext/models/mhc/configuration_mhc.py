"""Configuration of the mHC language model (manifold-constrained hyper-connections, arXiv 2512.24880).

A Llama-shaped decoder (GQA, RoPE, RMSNorm, SwiGLU, tied embeddings) whose residual stream is widened to
`hc_mult` streams mixed by per-token doubly-stochastic matrices. Every Llama field keeps its meaning; the `hc_*`
fields configure the hyper-connections.

This file is copied next to every saved checkpoint, so it imports only `transformers`.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

HC_COLLAPSE_MODES = ("learned", "sum", "mean")
HC_PRE_INITS = ("uniform", "layer_mod_n")
HC_KERNEL_CHOICES = ("auto", "eager", "compiled")


@strict
class MHCConfig(LlamaConfig):
    r"""
    hc_mult (`int`, defaults to 4):
        Number of residual streams `n`. `1` gives a pre-norm Transformer with scalar gates.
    hc_sinkhorn_iters (`int`, defaults to 20):
        Sinkhorn-Knopp iterations that project the residual mixing matrix onto doubly-stochastic matrices.
    hc_eps (`float`, defaults to 1e-6):
        Added to every Sinkhorn divisor, to the softmax output and to `H_pre` (as in DeepSeek-V4).
    hc_norm_eps (`float`, defaults to 1e-6):
        Epsilon of the unweighted RMS over the flattened `n * hidden_size` streams that feeds the mappings.
    hc_alpha_init (`float`, defaults to 0.01):
        Initial value of the three gates `alpha_pre`, `alpha_post`, `alpha_res` (and of the head's gate).
    hc_phi_init_std (`float`, *optional*):
        Standard deviation of the mapping projection `Phi` at init; `None` means `1 / sqrt(n * hidden_size)`.
        Must be non-zero: `Phi = 0` with uniform biases keeps all streams identical forever.
    hc_pre_init (`str`, defaults to `"uniform"`):
        `"uniform"` (`b_pre = 0`) or `"layer_mod_n"` (`+2` on stream `s mod n` and `-2` elsewhere, where `s` counts
        sub-layers: attention of layer `l` is `2l`, its MLP `2l + 1`).
    hc_res_diag_init (`float`, defaults to 0.0):
        Diagonal of `b_res` at init: 0 starts from uniform mixing, 2-4 from near-identity mixing.
    hc_collapse (`str`, defaults to `"learned"`):
        How the `n` streams become one hidden state before the final norm: `"learned"` (sigmoid weights from a
        projection, DeepSeek-V4), `"sum"` (HC) or `"mean"` (Megatron-LM).
    residual_dropout (`float`, defaults to 0.0):
        Dropout on each attention / MLP output before it is written into the streams.
    hc_kernel (`str`, defaults to `"auto"`):
        How the hyper-connection math (mappings, Sinkhorn, weighted read, mixing write, learned collapse) runs:
        `"eager"` (plain PyTorch ops), `"compiled"` (fused by `torch.compile`: C++ kernels on a CPU, Triton on a
        GPU) or `"auto"` (compiled where the device has a compiler backend, else eager; on a CPU, decoding steps
        with fp32 streams, without autograd and up to 64 tokens, call small C++ kernels instead, see
        `hyper_connection_cpu.py`). A fused path that cannot be built logs one line and falls back to eager. Results
        agree to rounding (1e-5 in fp32, tested).
    """

    model_type = "mhc_lm"

    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    hc_norm_eps: float = 1e-6
    hc_alpha_init: float = 0.01
    hc_phi_init_std: float | None = None
    hc_pre_init: str = "uniform"
    hc_res_diag_init: float = 0.0
    hc_collapse: str = "learned"
    residual_dropout: float = 0.0
    hc_kernel: str = "auto"

    def __post_init__(self, **kwargs):
        # Checked before Llama's own validators so every bad field is a plain `ValueError` naming it.
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1 (the number of residual streams), got {self.hc_mult}")
        if self.hc_sinkhorn_iters < 1:
            raise ValueError(f"hc_sinkhorn_iters must be >= 1, got {self.hc_sinkhorn_iters}")
        if self.hc_collapse not in HC_COLLAPSE_MODES:
            raise ValueError(f"hc_collapse must be one of {HC_COLLAPSE_MODES}, got {self.hc_collapse!r}")
        if self.hc_kernel not in HC_KERNEL_CHOICES:
            raise ValueError(f"hc_kernel must be one of {HC_KERNEL_CHOICES}, got {self.hc_kernel!r}")
        if self.hc_pre_init not in HC_PRE_INITS:
            raise ValueError(f"hc_pre_init must be one of {HC_PRE_INITS}, got {self.hc_pre_init!r}")
        if self.hc_eps <= 0 or self.hc_norm_eps <= 0:
            raise ValueError(f"hc_eps and hc_norm_eps must be > 0, got {self.hc_eps} and {self.hc_norm_eps}")
        if self.hc_phi_init_std is not None and self.hc_phi_init_std <= 0:
            raise ValueError(f"hc_phi_init_std must be > 0 (Phi = 0 keeps the streams identical), got {self.hc_phi_init_std}")
        if not 0.0 <= self.residual_dropout < 1.0:
            raise ValueError(f"residual_dropout must be in [0, 1), got {self.residual_dropout}")
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # `save_pretrained` adds AutoConfig and the saved class; the bare backbone is listed here so that
            # `AutoModel.from_pretrained(path, trust_remote_code=True)` also works without hf_ext.
            self.auto_map = {"AutoModel": "modeling_mhc.MHCModel"}


__all__ = ["MHCConfig"]
