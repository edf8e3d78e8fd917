"""Configuration of the ARC grid model family (`model_type: arc_grid`): five variants of one small Transformer.

| variant | input | positions | colours | task context |
|---|---|---|---|---|
| `decoder_only` | `[TASK] input rows [SEP] output rows [EOS]`, causal | 1D sinusoidal | embedding table | task embedding |
| `encoder_decoder` | encoder over input cells, decoder over output cells | 1D sinusoidal (`r * 30 + c`) | table | task embedding |
| `grid2d` | same | 2D sinusoidal (row, column) | table | task embedding |
| `grid2d_perminv` | same | 2D | colour-permutation-equivariant | task embedding |
| `champion` | same | 2D | equivariant | task embedding + context encoder over the demo pairs + bridge |

This file is copied next to every saved checkpoint, so it imports only `transformers`.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

VARIANTS = ("decoder_only", "encoder_decoder", "grid2d", "grid2d_perminv", "champion")
NUM_COLOURS = 10
PAD_TOKEN_ID = 10  # outside a grid; also the "no cell here" class of the grid variants
SEP_TOKEN_ID = 11  # decoder_only: between the input and the output grid
NEWLINE_TOKEN_ID = 12  # decoder_only: end of a row
EOS_TOKEN_ID = 13  # decoder_only: end of the output grid
VOCAB_SIZE = 14
MAX_SIDE = 30


@strict
class ArcGridConfig(PreTrainedConfig):
    r"""
    variant (`str`, defaults to `"champion"`):
        One of `decoder_only`, `encoder_decoder`, `grid2d`, `grid2d_perminv`, `champion` (table above).
    hidden_size (`int`, defaults to 128):
        Width of every token / cell state.
    num_attention_heads (`int`, defaults to 4):
        Attention heads; `hidden_size` must be divisible by it.
    intermediate_size (`int`, defaults to 384):
        Hidden width of the SwiGLU MLPs.
    num_encoder_layers (`int`, defaults to 2):
        Encoder layers over the input grid (the layers of `decoder_only`).
    num_decoder_layers (`int`, defaults to 2):
        Decoder layers over the output cells (self-attention, cross-attention to the encoder, MLP); unused by
        `decoder_only`.
    num_context_layers (`int`, defaults to 1):
        `champion` only: layers of the context encoder that encodes each demonstration grid before pooling.
    num_tasks (`int`, defaults to 0):
        Rows of the per-task embedding table (0: no task embedding). Row `i` conditions every example of task `i`.
    task_names (`list[str]`, *optional*):
        The ARC task id of each row of the task-embedding table (`len == num_tasks`), so a saved model knows which
        tasks it has an embedding for.
    max_grid_size (`int`, defaults to 30):
        Largest grid side (ARC: 30).
    attention_dropout (`float`, defaults to 0.0), hidden_dropout (`float`, defaults to 0.0):
        Dropout on attention probabilities and on each residual branch.
    rms_norm_eps (`float`, defaults to 1e-6):
        Epsilon of the RMSNorms.
    initializer_range (`float`, defaults to 0.02):
        Standard deviation of the normal initialisation of linear and embedding weights.
    """

    model_type = "arc_grid"

    variant: str = "champion"
    hidden_size: int = 128
    num_attention_heads: int = 4
    intermediate_size: int = 384
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    num_context_layers: int = 1
    num_tasks: int = 0
    task_names: list[str] | None = None
    max_grid_size: int = MAX_SIDE
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    vocab_size: int = VOCAB_SIZE
    pad_token_id: int | None = PAD_TOKEN_ID
    eos_token_id: int | None = EOS_TOKEN_ID
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_size % 4 != 0:
            raise ValueError(f"hidden_size must be a multiple of 4 (2D sinusoidal positions), got {self.hidden_size}")
        for name in ("num_encoder_layers", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.variant != "decoder_only" and self.num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be >= 1 for variant {self.variant}, got {self.num_decoder_layers}")
        if self.variant == "champion" and self.num_context_layers < 1:
            raise ValueError(f"num_context_layers must be >= 1 for the champion, got {self.num_context_layers}")
        if self.num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0 (0: no task embedding), got {self.num_tasks}")
        if self.task_names is not None and len(self.task_names) != self.num_tasks:
            raise ValueError(f"task_names has {len(self.task_names)} ids but num_tasks is {self.num_tasks}")
        if not 1 <= self.max_grid_size <= MAX_SIDE:
            raise ValueError(f"max_grid_size must be in 1..{MAX_SIDE}, got {self.max_grid_size}")
        if self.vocab_size != VOCAB_SIZE:
            raise ValueError(f"vocab_size is fixed at {VOCAB_SIZE} (10 colours, pad, sep, newline, eos), got {self.vocab_size}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {"AutoModel": "modeling_arc_grid.ArcGridModel"}

    @property
    def equivariant_colours(self) -> bool:
        return self.variant in ("grid2d_perminv", "champion")

    @property
    def grid_positions(self) -> bool:
        return self.variant in ("grid2d", "grid2d_perminv", "champion")


__all__ = ["ArcGridConfig"]
