"""The ARC grid model family (`model_type: arc_grid`): one small pre-norm Transformer, five variants.

Grids come in as `[B, H, W]` long tensors of colours 0-9 padded with 10 (`PAD`) outside each grid, so grids of any
shapes up to 30x30 share a batch; padded cells never enter attention or the loss's target region.

- Grid variants (`encoder_decoder`, `grid2d`, `grid2d_perminv`, `champion`): an encoder over the input cells and a
  non-autoregressive decoder with one query per output-canvas cell (self-attention over the canvas, cross-attention
  to the input cells); input and output share the canvas, so query (r, c) starts from input cell (r, c)'s state. Each cell is classified as a colour or `PAD` ("outside the grid"): the predicted grid is the
  top-left block of non-pad cells, so the output shape is predicted too.
- `decoder_only`: `[TASK/SEP] input rows (each ended by NEWLINE) [SEP] output rows [EOS]` with a causal mask; loss
  on the output tokens only; grids are decoded greedily by transformers' `generate` (KV cache, SEP and PAD suppressed).
- Colour-permutation-equivariant variants (`grid2d_perminv`, `champion`): a cell's embedding only says background
  (0), colour (1-9) or pad; attention gets a learned per-head bias between cells of the same colour; the logit of
  colour k at an output cell is a dot product with a key pooled from the cells of colour k. Relabelling colours 1-9
  in the inputs therefore permutes the output logits the same way (colours absent from the inputs share one key).
- `champion`: a context encoder encodes every demonstration grid of the task (cropped by its mask), pools it per
  grid, combines input and output per pair and averages the pairs; a concat + MLP bridge writes that into the
  decoder queries, and the context cells of each colour add to that colour's key (so colours seen only in the demo
  outputs can be predicted).

Only torch and transformers are imported: this file is saved next to every checkpoint and runs under whichever
transformers loads it, so it speaks both cache vocabularies of the supported range (see `CACHE_FIELD`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_arc_grid import (
    EOS_TOKEN_ID,
    NEWLINE_TOKEN_ID,
    NUM_COLOURS,
    PAD_TOKEN_ID,
    SEP_TOKEN_ID,
    ArcGridConfig,
)

NUM_CELL_CLASSES = NUM_COLOURS + 1  # colours 0-9 and PAD

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`. The outputs below extend
# transformers' own, so their cache field has the installed version's name; forwards take the cache under either name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as `cache=` or under the pre-5.24 name `past_key_values=` (removed from `kwargs`)."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is not None and cache is not None:
        raise ValueError("pass the cache once: `cache` or `past_key_values`, not both")
    return legacy if cache is None else cache


@dataclass
class ArcGridOutput(CausalLMOutputWithPast):
    """
    loss (`torch.FloatTensor`, *optional*):
        Mean cross-entropy over the output canvas cells (grid variants) or the output tokens (`decoder_only`).
    logits (`torch.FloatTensor`):
        `[B, H, W, 11]` cell logits (colours 0-9, PAD) for the grid variants; `[B, L, 14]` token logits for
        `decoder_only`.
    cache (`Cache`, *optional*; `past_key_values` before transformers 5.24):
        `decoder_only` with `use_cache=True`.
    last_hidden_state (`torch.FloatTensor`):
        Final decoder states: `[B, H * W, hidden]` (grid variants) or `[B, L, hidden]` (`decoder_only`).
    """

    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class ArcGridModelOutput(BaseModelOutputWithPast):
    """
    last_hidden_state (`torch.FloatTensor`):
        Final decoder states: `[B, H * W, hidden]` (grid variants) or `[B, L, hidden]` (`decoder_only`).
    cache (`Cache`, *optional*; `past_key_values` before transformers 5.24):
        `decoder_only` with `use_cache=True`.
    encoder_last_hidden_state (`torch.FloatTensor`, *optional*):
        Final states of the input cells `[B, H_in * W_in, hidden]` (grid variants).
    context_last_hidden_state (`torch.FloatTensor`, *optional*):
        Champion: final states of the demo-grid cells `[B, pairs * (h_in * w_in + h_out * w_out), hidden]`.
    """

    encoder_last_hidden_state: torch.FloatTensor | None = None
    context_last_hidden_state: torch.FloatTensor | None = None


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids `[..., dim]` of integer positions (fp32)."""
    frequencies = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def cell_positions(config: ArcGridConfig, height: int, width: int, device) -> torch.Tensor:
    """`[H * W, hidden]` encodings of the cells of an H x W canvas, row-major: 2D (row half, column half) for the
    grid variants, 1D over `row * max_grid_size + column` for `encoder_decoder`."""
    rows = torch.arange(height, device=device)[:, None].expand(height, width).reshape(-1)
    cols = torch.arange(width, device=device)[None, :].expand(height, width).reshape(-1)
    if config.grid_positions:
        half = config.hidden_size // 2
        return torch.cat([sinusoidal(rows, half), sinusoidal(cols, half)], dim=-1)
    return sinusoidal(rows * config.max_grid_size + cols, config.hidden_size)


class ArcGridAttention(nn.Module):
    """Multi-head attention (self or cross) through SDPA, with an optional KV cache (decoder_only)."""

    def __init__(self, config: ArcGridConfig, layer_idx: int | None = None, same_colour_bias: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # One learned logit bias per head between two cells of the same colour 1-9: colour-equivariant grouping.
        self.same_colour_bias = nn.Parameter(torch.zeros(self.num_heads)) if same_colour_bias else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        same_colour: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        source = hidden_states if key_value_states is None else key_value_states
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(source).view(batch, source.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).view(batch, source.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = attention_mask
        if self.same_colour_bias is not None and same_colour is not None:
            bias = same_colour[:, None].to(q.dtype) * self.same_colour_bias.to(q.dtype)[None, :, None, None]
            mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class ArcGridMLP(nn.Module):
    def __init__(self, config: ArcGridConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ArcGridLayer(GradientCheckpointingLayer):
    """Pre-norm layer: self-attention, optional cross-attention to an encoder, SwiGLU MLP."""

    def __init__(self, config: ArcGridConfig, layer_idx: int | None = None, cross_attention: bool = False,
                 same_colour_bias: bool = False):
        super().__init__()
        self.self_attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = ArcGridAttention(config, layer_idx, same_colour_bias)
        if cross_attention:
            self.cross_attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.cross_attn = ArcGridAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ArcGridMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        same_colour: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.self_attn_norm(hidden_states), attention_mask, None, same_colour, cache)
        hidden_states = hidden_states + self.dropout(attended)
        if encoder_states is not None:
            attended = self.cross_attn(self.cross_attn_norm(hidden_states), encoder_mask, encoder_states)
            hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class ArcGridPreTrainedModel(PreTrainedModel):
    config_class = ArcGridConfig
    base_model_prefix = "model"
    main_input_name = "input_grids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArcGridLayer"]
    _supports_sdpa = True
    # Task embeddings are per-task lookups: decaying the rows of tasks absent from a batch only shrinks them.
    _no_weight_decay_patterns = [r"task_embedding", r"same_colour_bias", r"absent_colour"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ArcGridAttention) and module.same_colour_bias is not None:
            init.zeros_(module.same_colour_bias)
        elif isinstance(module, ArcGridModel):
            if module.absent_colour is not None:
                init.normal_(module.absent_colour, mean=0.0, std=std)
            if module.query_embedding is not None:
                init.normal_(module.query_embedding, mean=0.0, std=std)


def cell_classes(grids: torch.Tensor, equivariant: bool) -> torch.Tensor:
    """Embedding rows of each cell: the colour itself (0-9, PAD=10), or, equivariantly, 0 background, 1 any colour
    1-9, 2 PAD."""
    if not equivariant:
        return grids
    return torch.where(grids == 0, 0, torch.where(grids == PAD_TOKEN_ID, 2, 1))


def same_colour_matrix(cells: torch.Tensor) -> torch.Tensor:
    """`[B, N, N]` bool: cells i and j hold the same colour 1-9."""
    coloured = (cells > 0) & (cells < NUM_COLOURS)
    return (cells[:, :, None] == cells[:, None, :]) & coloured[:, :, None] & coloured[:, None, :]


def context_cells(context_inputs, context_outputs, context_mask) -> torch.Tensor:
    """The demo-grid cells `[B, M]` in the order of `ArcGridModel.encode_context`'s states; PAD in masked pairs."""
    cells = []
    for grids in (context_inputs, context_outputs):
        cells.append(torch.where(context_mask[:, :, None, None], grids, PAD_TOKEN_ID).flatten(1))
    return torch.cat(cells, 1)


def colour_means(states: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean state of the cells of each colour 1-9: `[B, 9, hidden]` and the bool `[B, 9]` "colour present"."""
    one_hot = (cells[..., None] == torch.arange(1, NUM_COLOURS, device=cells.device)).to(states.dtype)  # [B, N, 9]
    counts = one_hot.sum(1)
    means = one_hot.transpose(1, 2) @ states / counts.clamp(min=1)[..., None]
    return means, counts > 0


class ArcGridModel(ArcGridPreTrainedModel):
    """The encoder(s) and decoder; returns the decoder's final states (`ArcGridForGridPrediction` adds the head)."""

    def __init__(self, config: ArcGridConfig):
        super().__init__(config)
        decoder_only = config.variant == "decoder_only"
        equivariant = config.equivariant_colours
        hidden = config.hidden_size
        vocabulary = config.vocab_size if decoder_only else (3 if equivariant else NUM_CELL_CLASSES)
        self.embed_tokens = nn.Embedding(vocabulary, hidden)
        self.task_embedding = nn.Embedding(config.num_tasks, hidden) if config.num_tasks else None
        self.encoder_layers = nn.ModuleList(
            ArcGridLayer(config, i, same_colour_bias=equivariant) for i in range(config.num_encoder_layers)
        )
        self.encoder_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.decoder_layers = nn.ModuleList(
            [] if decoder_only else (ArcGridLayer(config, i, cross_attention=True) for i in range(config.num_decoder_layers))
        )
        self.query_embedding = None if decoder_only else nn.Parameter(torch.zeros(hidden))
        self.absent_colour = nn.Parameter(torch.zeros(hidden)) if equivariant else None
        if config.variant == "champion":
            self.role_embedding = nn.Embedding(2, hidden)  # demo input / demo output
            self.context_layers = nn.ModuleList(
                ArcGridLayer(config, i, same_colour_bias=True) for i in range(config.num_context_layers)
            )
            self.context_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
            self.pair_proj = nn.Linear(2 * hidden, hidden)
            self.bridge_in_proj = nn.Linear(2 * hidden, hidden)
            self.bridge_out_proj = nn.Linear(hidden, hidden)
            self.context_colour_proj = nn.Linear(hidden, hidden, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def _task_vector(self, task_ids: torch.Tensor | None, batch: int, dtype) -> torch.Tensor | None:
        if self.task_embedding is None or task_ids is None:
            return None
        if (task_ids < 0).any() or (task_ids >= self.config.num_tasks).any():
            raise ValueError(f"task_ids must be in [0, {self.config.num_tasks}) (num_tasks), got {task_ids.tolist()}")
        return self.task_embedding(task_ids).to(dtype).view(batch, 1, -1)

    def _embed_grid(self, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, H, W]` grids -> cell states `[B, H * W, hidden]` (embedding + positions) and flat cells `[B, H * W]`."""
        batch, height, width = grids.shape
        cells = grids.reshape(batch, height * width)
        states = self.embed_tokens(cell_classes(cells, self.config.equivariant_colours))
        return states + cell_positions(self.config, height, width, grids.device).to(states.dtype), cells

    def _encode(self, states, cells, layers, norm) -> torch.Tensor:
        real = cells != PAD_TOKEN_ID
        # Padded cells attend to themselves only, so their (unused) states stay finite.
        mask = real[:, None, None, :] | torch.eye(cells.shape[1], dtype=torch.bool, device=cells.device)
        same = same_colour_matrix(cells) if self.config.equivariant_colours else None
        for layer in layers:
            states = layer(states, attention_mask=mask, same_colour=same)
        return norm(states)

    def encode_context(self, context_inputs, context_outputs, context_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Champion: the task vector `[B, hidden]` from the demo pairs and the context cells' states `[B, M, hidden]`
        (in the order of `context_cells`)."""
        batch, pairs = context_mask.shape
        pooled, all_states = [], []
        for role, grids in enumerate((context_inputs, context_outputs)):
            states, cells = self._embed_grid(grids.flatten(0, 1))
            states = states + self.role_embedding.weight[role].to(states.dtype)
            states = self._encode(states, cells, self.context_layers, self.context_norm)
            real = (cells != PAD_TOKEN_ID).to(states.dtype)[..., None]
            pooled.append(((states * real).sum(1) / real.sum(1).clamp(min=1)).view(batch, pairs, -1))
            all_states.append(states.view(batch, -1, states.shape[-1]))
        pair_vectors = self.pair_proj(torch.cat(pooled, dim=-1))
        weights = context_mask.to(pair_vectors.dtype)[..., None]
        task_vector = (pair_vectors * weights).sum(1) / weights.sum(1).clamp(min=1)
        return task_vector, torch.cat(all_states, 1)

    def colour_keys(self, encoder_states, input_grids, context_states=None, context_grids=None) -> torch.Tensor:
        """Equivariant variants: one key per colour 1-9, `[B, 9, hidden]`: the mean encoder state of the input cells
        of that colour (a shared learned vector when absent), plus the champion's context cells of that colour."""
        means, present = colour_means(encoder_states, input_grids.flatten(1))
        keys = torch.where(present[..., None], means, self.absent_colour.to(means.dtype))
        if context_states is not None:
            means, present = colour_means(context_states, context_cells(*context_grids))
            keys = keys + self.context_colour_proj(means) * present[..., None].to(means.dtype)
        return keys

    @can_return_tuple
    def forward(
        self,
        input_grids: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        task_ids: torch.Tensor | None = None,
        context_inputs: torch.Tensor | None = None,
        context_outputs: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ArcGridModelOutput:
        r"""
        input_grids (`torch.LongTensor` of shape `(batch, H, W)`):
            Input grids, colours 0-9, PAD (10) outside each grid (grid variants).
        output_size (`tuple[int, int]`):
            Height and width of the output canvas the decoder fills (grid variants); defaults to the input canvas.
        task_ids (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Rows of the task-embedding table (`num_tasks > 0`).
        context_inputs, context_outputs (`torch.LongTensor` of shape `(batch, pairs, h, w)`), context_mask (`(batch, pairs)` bool):
            Champion: the task's demonstration pairs (PAD-padded; pairs and grids may differ in shape).
        input_ids, attention_mask, position_ids, cache, use_cache:
            `decoder_only`: the token sequence (see `ArcGridForGridPrediction.serialize`); `cache` is also taken as
            `past_key_values`, its name before transformers 5.24.
        """
        if self.config.variant == "decoder_only":
            cache = take_cache(cache, kwargs)
            return self._forward_tokens(input_ids, attention_mask, position_ids, task_ids, cache, use_cache)
        if input_grids is None:
            raise ValueError(f"variant {self.config.variant} needs input_grids [batch, H, W]")
        batch = input_grids.shape[0]
        states, cells = self._embed_grid(input_grids)
        task = self._task_vector(task_ids, batch, states.dtype)
        if task is not None:
            states = states + task
        encoder_states = self._encode(states, cells, self.encoder_layers, self.encoder_norm)

        height, width = output_size or input_grids.shape[1:]
        queries = self.query_embedding.to(states.dtype) + cell_positions(self.config, height, width, states.device).to(states.dtype)
        queries = queries + self._aligned_input_states(encoder_states, cells, input_grids.shape[1:], (height, width))
        if task is not None:
            queries = queries + task
        context_states = None
        if self.config.variant == "champion":
            if context_inputs is None or context_outputs is None or context_mask is None:
                raise ValueError("the champion needs context_inputs, context_outputs and context_mask (the demo pairs)")
            context, context_states = self.encode_context(context_inputs, context_outputs, context_mask)
            bridge_input = torch.cat([queries, context[:, None].expand(-1, queries.shape[1], -1).to(queries.dtype)], -1)
            queries = queries + self.bridge_out_proj(F.gelu(self.bridge_in_proj(bridge_input)))
        encoder_mask = (cells != PAD_TOKEN_ID)[:, None, None, :]
        hidden = queries
        for layer in self.decoder_layers:
            hidden = layer(hidden, encoder_states=encoder_states, encoder_mask=encoder_mask)
        return ArcGridModelOutput(
            last_hidden_state=hidden, encoder_last_hidden_state=encoder_states, context_last_hidden_state=context_states
        )

    @staticmethod
    def _aligned_input_states(encoder_states, cells, input_size, output_size) -> torch.Tensor:
        """`[B, H' * W', hidden]`: the encoder state of input cell (r, c) for output query (r, c), zero where the input
        has no cell. Input and output share one canvas (as in VARC and TRM), so copying a cell is the easy default."""
        batch, hidden = encoder_states.shape[0], encoder_states.shape[-1]
        states = (encoder_states * (cells != PAD_TOKEN_ID)[..., None].to(encoder_states.dtype)).view(batch, *input_size, hidden)
        height, width = output_size
        aligned = states.new_zeros(batch, height, width, hidden)
        rows, cols = min(height, input_size[0]), min(width, input_size[1])
        aligned[:, :rows, :cols] = states[:, :rows, :cols]
        return aligned.view(batch, height * width, hidden)

    def _forward_tokens(self, input_ids, attention_mask, position_ids, task_ids, cache, use_cache) -> ArcGridModelOutput:
        if input_ids is None:
            raise ValueError("variant decoder_only needs input_ids (ArcGridForGridPrediction.serialize builds them)")
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        states = self.embed_tokens(input_ids)
        states = states + sinusoidal(position_ids, self.config.hidden_size).to(states.dtype)
        task = self._task_vector(task_ids, batch, states.dtype)
        if task is not None:
            states = states + task
        keys = attention_mask[:, None, None, :]  # [B, 1, 1, past + L]
        causal = torch.ones(length, past + length, dtype=torch.bool, device=input_ids.device).tril(past)
        diagonal = torch.zeros_like(causal)
        diagonal[:, past:] = torch.eye(length, dtype=torch.bool, device=input_ids.device)
        mask = (keys & causal) | diagonal  # a padded query sees itself, so its (unused) state stays finite
        for layer in self.encoder_layers:
            states = layer(states, attention_mask=mask, cache=cache)
        return ArcGridModelOutput(last_hidden_state=self.encoder_norm(states), **{CACHE_FIELD: cache if use_cache else None})


class ArcGridForGridPrediction(ArcGridPreTrainedModel, GenerationMixin):
    """The ARC model with its output head: cell logits (grid variants) or token logits (`decoder_only`), the loss,
    and `predict` (grids + confidence scores). `decoder_only` decodes with transformers' `generate`; the grid
    variants predict every cell at once and do not generate."""

    def __init__(self, config: ArcGridConfig):
        super().__init__(config)
        self.model = ArcGridModel(config)
        hidden = config.hidden_size
        if config.variant == "decoder_only":
            self.main_input_name = "input_ids"  # `generate` reads the prompt under this name
            self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        elif config.equivariant_colours:
            self.cell_head = nn.Linear(hidden, 2)  # background (0) and PAD logits
            self.colour_query = nn.Linear(hidden, hidden, bias=False)
            self.colour_key = nn.Linear(hidden, hidden, bias=False)
        else:
            self.cell_head = nn.Linear(hidden, NUM_CELL_CLASSES)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its `DynamicCache` (`generate`'s needs `num_hidden_layers` in the config)

    def generate(self, *args, **kwargs):
        if self.config.variant != "decoder_only":
            raise ValueError(
                f"arc_grid variant {self.config.variant!r} predicts every output cell at once and does not generate: "
                "use predict(input_grids, ...); only variant 'decoder_only' decodes token by token"
            )
        return super().generate(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_grids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        context_inputs: torch.Tensor | None = None,
        context_outputs: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ArcGridOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, H', W')`, *optional*):
            Target grids, PAD outside each grid (PAD is a class: it teaches the output shape); -100 cells are ignored.
            The decoder canvas is `labels`' H' x W'. `decoder_only` also takes grids here and `input_grids`, and
            builds its token sequence and token labels itself.
        Other arguments: see `ArcGridModel.forward`.
        """
        if self.config.variant == "decoder_only":
            if input_ids is None:
                if input_grids is None or labels is None:
                    raise ValueError("decoder_only needs input_ids, or input_grids and labels (grids) to serialize")
                input_ids, attention_mask, token_labels = self.serialize(input_grids, labels)
            else:
                token_labels = labels
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 task_ids=task_ids, cache=take_cache(cache, kwargs), use_cache=use_cache)
            logits = self.lm_head(outputs.last_hidden_state).float()
            loss = None
            if token_labels is not None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), token_labels[:, 1:].flatten(), ignore_index=-100)
            return ArcGridOutput(
                loss=loss,
                logits=logits,
                last_hidden_state=outputs.last_hidden_state,
                **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            )

        if labels is not None:
            output_size = tuple(labels.shape[1:])
        outputs = self.model(input_grids=input_grids, output_size=output_size, task_ids=task_ids,
                             context_inputs=context_inputs, context_outputs=context_outputs, context_mask=context_mask)
        hidden = outputs.last_hidden_state
        if self.config.equivariant_colours:
            context = (context_inputs, context_outputs, context_mask) if self.config.variant == "champion" else None
            keys = self.model.colour_keys(outputs.encoder_last_hidden_state, input_grids, outputs.context_last_hidden_state, context)
            colour_logits = self.colour_query(hidden) @ self.colour_key(keys).transpose(1, 2) / math.sqrt(hidden.shape[-1])
            background, pad = self.cell_head(hidden).split(1, dim=-1)
            logits = torch.cat([background, colour_logits, pad], dim=-1)
        else:
            logits = self.cell_head(hidden)
        height, width = output_size or input_grids.shape[1:]
        logits = logits.float().view(hidden.shape[0], height, width, NUM_CELL_CLASSES)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=-100)
        return ArcGridOutput(loss=loss, logits=logits, last_hidden_state=hidden)

    # --- decoder_only token sequences ----------------------------------------------------------------------------

    @staticmethod
    def grid_tokens(grid: torch.Tensor) -> torch.Tensor:
        """One PAD-padded grid -> its rows of colours, each followed by NEWLINE."""
        real = grid != PAD_TOKEN_ID
        height, width = int(real[:, 0].sum()), int(real[0].sum())
        rows = torch.cat([grid[:height, :width], torch.full((height, 1), NEWLINE_TOKEN_ID, device=grid.device)], 1)
        return rows.reshape(-1)

    def prompt_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        sep = torch.tensor([SEP_TOKEN_ID], device=grid.device)
        return torch.cat([sep, self.grid_tokens(grid), sep])

    def serialize(self, input_grids: torch.Tensor, output_grids: torch.Tensor):
        """`[SEP] input rows [SEP] output rows [EOS]` per example, right-padded: input_ids, attention_mask and token
        labels (-100 except on the output rows and EOS)."""
        sequences, label_rows = [], []
        for grid_in, grid_out in zip(input_grids, output_grids):
            prompt = self.prompt_tokens(grid_in)
            answer = torch.cat([self.grid_tokens(grid_out), torch.tensor([EOS_TOKEN_ID], device=grid_out.device)])
            sequences.append(torch.cat([prompt, answer]))
            label_rows.append(torch.cat([torch.full_like(prompt, -100), answer]))
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), PAD_TOKEN_ID, device=input_grids.device)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, (sequence, label) in enumerate(zip(sequences, label_rows)):
            input_ids[i, : len(sequence)], labels[i, : len(sequence)] = sequence, label
            attention_mask[i, : len(sequence)] = True
        return input_ids, attention_mask, labels

    # --- prediction ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, input_grids: torch.Tensor, output_size: tuple[int, int] | None = None, **inputs) -> list:
        """Greedy prediction per example: `[(grid [h, w] long tensor or None, mean log-probability)]`.

        Grid variants fill an `output_size` canvas (default: the input canvas) and read the grid off as the top-left
        block of non-PAD cells (height from column 0, width from row 0); `decoder_only` decodes up to
        `max_grid_size * (max_grid_size + 1) + 1` tokens with `generate`. A malformed result (empty, ragged rows)
        is `None`."""
        if self.config.variant == "decoder_only":
            return self._generate_grids(input_grids, inputs.get("task_ids"))
        logits = self(input_grids=input_grids, output_size=output_size, **inputs).logits
        log_probs = logits.log_softmax(-1)
        results = []
        for cells in log_probs:
            is_grid = cells.argmax(-1) != PAD_TOKEN_ID
            height = int(is_grid[:, 0].long().cumprod(0).sum())
            width = int(is_grid[0].long().cumprod(0).sum())
            if height == 0 or width == 0:
                results.append((None, float("-inf")))
                continue
            best = cells[:height, :width, :NUM_COLOURS].max(-1)
            results.append((best.indices, float(best.values.mean())))
        return results

    def _generate_grids(self, input_grids: torch.Tensor, task_ids: torch.Tensor | None) -> list:
        """`decoder_only`: left-padded prompts, greedy `generate` (never SEP or PAD), each row cut after its EOS and
        scored by the mean log-probability of its tokens under the unrestricted softmax."""
        prompts = [self.prompt_tokens(grid) for grid in input_grids]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), PAD_TOKEN_ID, device=input_grids.device)
        attention_mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[i, length - len(prompt):] = prompt
            attention_mask[i, length - len(prompt):] = 1
        out = self.generate(
            input_ids,
            attention_mask=attention_mask,
            task_ids=task_ids,
            max_new_tokens=self.config.max_grid_size * (self.config.max_grid_size + 1) + 1,
            do_sample=False,
            num_beams=1,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=PAD_TOKEN_ID,
            suppress_tokens=[SEP_TOKEN_ID, PAD_TOKEN_ID],
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[:, length:]
        log_probs = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new_tokens[..., None])[..., 0]
        results = []
        for tokens, token_log_probs in zip(new_tokens.tolist(), log_probs):
            count = tokens.index(EOS_TOKEN_ID) + 1 if EOS_TOKEN_ID in tokens else len(tokens)
            results.append((self.tokens_to_grid(tokens[:count]), float(token_log_probs[:count].sum()) / max(count, 1)))
        return results

    @staticmethod
    def tokens_to_grid(tokens: list[int]) -> torch.Tensor | None:
        """Generated tokens (rows ended by NEWLINE, then EOS) -> grid, or None when empty, ragged or unfinished."""
        if not tokens or tokens[-1] != EOS_TOKEN_ID:
            return None
        rows, row = [], []
        for token in tokens[:-1]:
            if token == NEWLINE_TOKEN_ID:
                rows.append(row)
                row = []
            else:
                row.append(token)
        if row or not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            return None
        return torch.tensor(rows)


__all__ = ["ArcGridForGridPrediction", "ArcGridModel", "ArcGridModelOutput", "ArcGridOutput", "ArcGridPreTrainedModel"]
