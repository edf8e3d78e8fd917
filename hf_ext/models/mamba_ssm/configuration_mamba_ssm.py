"""Configuration of the Mamba selective-SSM models (Mamba-2 / SSD mixer, causal or bidirectional).

Field names and defaults follow transformers' `Mamba2Config`, so a `Mamba2ForCausalLM` checkpoint converts by copying
its config fields and its state dict (see `MambaSSMConfig.from_mamba2_config`). hf_ext adds the bidirectional
(Caduceus-style) mixer, dropout and the optional CUDA kernels switch.

This file is copied next to every saved checkpoint, so it imports only `transformers`.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

USE_KERNELS_CHOICES = ("auto", True, False)


@strict
class MambaSSMConfig(PreTrainedConfig):
    r"""
    vocab_size (`int`, defaults to 32):
        Vocabulary size (the default fits the protein tokenizer: 20 amino acids, X and special tokens).
    hidden_size (`int`, defaults to 256):
        Width of the residual stream.
    num_hidden_layers (`int`, defaults to 4):
        Number of Mamba blocks (`h = h + Dropout(Mixer(RMSNorm(h)))`, one norm per block).
    expand (`int`, defaults to 2):
        `intermediate_size = expand * hidden_size`, the width the SSM runs at.
    num_heads (`int`, defaults to 8) / head_dim (`int`, defaults to 64):
        SSD heads; `num_heads * head_dim` must equal `expand * hidden_size`. Each head has one scalar decay `A`.
    state_size (`int`, defaults to 16):
        State dimension `N` per head.
    n_groups (`int`, defaults to 1):
        Groups sharing `B` and `C` (like GQA's key/value groups); `num_heads` must be divisible by it.
    conv_kernel (`int`, defaults to 4):
        Width of the causal depthwise convolution before the scan.
    chunk_size (`int`, defaults to 64):
        Chunk length `Q` of the SSD scan: quadratic work inside a chunk, a recurrence over `L / Q` chunks. 64 is the
        fastest on CPU; the CUDA kernels prefer 256.
    time_step_min / time_step_max / time_step_floor (`float`):
        Range of the log-uniform initial time step `dt` (through `dt_bias`).
    time_step_limit (`tuple[float, float]`, defaults to `(0.0, inf)`):
        `dt` is clamped to this range after the softplus.
    use_bias / use_conv_bias (`bool`):
        Biases of `in_proj` / `out_proj` and of the convolution.
    residual_in_fp32 (`bool`, defaults to `True`):
        Keep the residual stream in fp32 under bf16 weights.
    layer_norm_epsilon (`float`, defaults to 1e-5):
        Epsilon of every RMSNorm (block norms, gated norm, final norm).
    bidirectional (`bool`, defaults to `False`):
        Add a reverse scan in every mixer (shared `in_proj` / `out_proj`, its own `conv1d_rev`, `dt_bias_rev`,
        `A_log_rev`, `D_rev`): the masked-LM and sequence-property model. A bidirectional model has no cache and
        cannot generate.
    hidden_dropout (`float`, defaults to 0.0):
        Dropout on every mixer output before it is added to the residual stream.
    embedding_dropout (`float`, defaults to 0.0):
        Dropout on the token embeddings.
    use_kernels (`"auto"` or `bool`, defaults to `"auto"`):
        The `mamba-ssm` / `causal-conv1d` CUDA kernels (`pip install hf_ext[kernels]`). `"auto"` uses them when
        installed and the tensors are on CUDA; `True` raises if they are missing; `False` always runs pure PyTorch.
    """

    model_type = "mamba_ssm"
    keys_to_ignore_at_inference = ["cache", "past_key_values", "cache_params"]  # the names across transformers 5.x

    vocab_size: int = 32
    hidden_size: int = 256
    num_hidden_layers: int = 4
    expand: int = 2
    num_heads: int = 8
    head_dim: int = 64
    state_size: int = 16
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    hidden_act: str = "silu"
    use_bias: bool = False
    use_conv_bias: bool = True
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    rescale_prenorm_residual: bool = False
    bidirectional: bool = False
    hidden_dropout: float = 0.0
    embedding_dropout: float = 0.0
    use_kernels: str | bool = "auto"
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "expand", "num_heads", "head_dim", "state_size",
                    "n_groups", "conv_kernel", "chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads * self.head_dim != self.expand * self.hidden_size:
            raise ValueError(
                f"num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal expand * hidden_size "
                f"({self.expand} * {self.hidden_size})"
            )
        if self.num_heads % self.n_groups != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by n_groups ({self.n_groups})")
        if self.chunk_size > 4096:
            raise ValueError(f"chunk_size must be <= 4096 (the intra-chunk work is quadratic in it), got {self.chunk_size}")
        for name in ("hidden_dropout", "embedding_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.use_kernels not in USE_KERNELS_CHOICES:
            raise ValueError(f"use_kernels must be one of {USE_KERNELS_CHOICES}, got {self.use_kernels!r}")
        if len(self.time_step_limit) != 2 or not 0.0 <= self.time_step_limit[0] < self.time_step_limit[1]:
            raise ValueError(f"time_step_limit must be (low, high) with 0 <= low < high, got {self.time_step_limit}")
        if not 0.0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"time_step_min ({self.time_step_min}) must be > 0 and <= time_step_max ({self.time_step_max})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the SSD mixer's activation), got {self.hidden_act!r}")
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        if self.bidirectional:
            self.use_cache = False  # a bidirectional model has no recurrent cache
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            # `save_pretrained` adds AutoConfig and the saved class; the bare backbone is listed so that
            # `AutoModel.from_pretrained(path, trust_remote_code=True)` also works without hf_ext.
            self.auto_map = {"AutoModel": "modeling_mamba_ssm.MambaSSMModel"}

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def layer_types(self) -> list[str]:
        return ["linear_attention"] * self.num_hidden_layers

    @classmethod
    def from_mamba2_config(cls, mamba2_config, **overrides) -> "MambaSSMConfig":
        """The same architecture as a transformers `Mamba2Config` (its weights then load into ours unchanged)."""
        fields = ("vocab_size", "hidden_size", "num_hidden_layers", "expand", "num_heads", "head_dim", "state_size",
                  "n_groups", "conv_kernel", "chunk_size", "use_bias", "use_conv_bias", "initializer_range",
                  "layer_norm_epsilon", "residual_in_fp32", "time_step_min", "time_step_max", "time_step_floor",
                  "time_step_limit", "rescale_prenorm_residual", "tie_word_embeddings", "pad_token_id",
                  "bos_token_id", "eos_token_id")
        return cls(**{name: getattr(mamba2_config, name) for name in fields}, **overrides)


__all__ = ["MambaSSMConfig"]
