"""The mHC language model: the invariants I1-I16 of specs/mhc.md section 5 and the transformers contract.

Tiny fp32 configs on CPU. "comb frame" = the stored matrix `comb = H_res^T`, applied as `comb^T @ x`.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_ext  # noqa: F401  (registration)
from hf_ext.models.mhc import MHCConfig, MHCForCausalLM, MHCModel
from hf_ext.models.mhc.modeling_mhc import MHCDecoderLayer, MHCHyperConnection, MHCHyperHead, sinkhorn
from tests.conftest import train_steps

VOCAB = 97


def tiny_config(**overrides) -> MHCConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return MHCConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> MHCForCausalLM:
    torch.manual_seed(seed)
    return MHCForCausalLM(tiny_config(**overrides)).eval()


def hc_modules(model) -> list[MHCHyperConnection]:
    return [m for m in model.modules() if isinstance(m, MHCHyperConnection)]


def zero_phi(model) -> None:
    """Phi = 0 everywhere (the mappings become their biases)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MHCHyperConnection):
                module.fn.zero_()
            elif isinstance(module, MHCHyperHead):
                module.hc_fn.zero_()


def paper_sinkhorn(paper_logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Independent Eq. 9 (paper frame): exp, then `iterations` x (column-normalise, row-normalise); no eps."""
    matrix = torch.exp(paper_logits - paper_logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iterations):
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
    return matrix


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


# ---------------------------------------------------------------- Sinkhorn and mappings (I1-I4, I9)


def test_i1_sinkhorn_is_doubly_stochastic_in_the_documented_frame():
    logits = torch.randn(10_000, 4, 4, generator=torch.Generator().manual_seed(0))
    comb = sinkhorn(logits, iterations=20, eps=1e-6)
    assert (comb >= 0).all()
    h_res = comb.transpose(-1, -2)  # paper frame
    assert (h_res.sum(-1) - 1).abs().max() <= 1e-5  # rows of H_res (forward gain): exact
    assert (h_res.sum(-2) - 1).abs().max() <= 5e-3  # columns (backward gain): approximate at 20 iterations
    assert (sinkhorn(logits, 100, 1e-6).transpose(-1, -2).sum(-2) - 1).abs().max() <= 1e-5


def test_i2_sinkhorn_equals_independent_eq9_with_the_transpose():
    logits = torch.randn(2000, 4, 4, generator=torch.Generator().manual_seed(1))
    comb = sinkhorn(logits, 20, 1e-6)
    reference = paper_sinkhorn(logits.transpose(-1, -2), 20)
    assert (comb.transpose(-1, -2) - reference).abs().max() <= 1e-4
    # The frame matters: without the transpose the matrices differ by far more than the tolerance.
    assert (comb - reference).abs().max() > 0.1


@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_i3_sinkhorn_is_finite_for_peaked_and_degenerate_logits(scale):
    random_logits = torch.randn(500, 4, 4, generator=torch.Generator().manual_seed(2)) * scale
    equal_rows = torch.randn(1, 1, 4).expand(500, 4, 4) * scale
    for logits in (random_logits, equal_rows.contiguous()):
        logits = logits.clone().requires_grad_(True)
        comb = sinkhorn(logits, 20, 1e-6)
        (comb * torch.randn_like(comb)).sum().backward()
        assert torch.isfinite(comb).all() and torch.isfinite(logits.grad).all()


def test_i3_model_is_finite_with_saturated_gates():
    model = tiny_model()
    with torch.no_grad():
        for module in hc_modules(model):
            module.scale.fill_(100.0)
    model.train()
    out = model(tokens(), labels=tokens())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_i4_pre_and_post_ranges():
    model = tiny_model()
    module = hc_modules(model)[0]
    with torch.no_grad():
        module.scale.fill_(5.0)
    streams = torch.randn(3, 8, 4, 32) * 10
    pre, post, comb = module.mappings(streams)
    assert (pre > 0).all() and (pre < 1 + 1e-6 + 1e-7).all()
    assert (post > 0).all() and (post < 2).all()
    with torch.no_grad():
        module.fn.zero_()
        module.base.zero_()
    _, post, _ = module.mappings(streams)
    assert (post == 1).all()


def test_i9_products_of_sinkhorn_outputs_are_non_expansive():
    layers = sinkhorn(torch.randn(24, 64, 4, 4, generator=torch.Generator().manual_seed(3)), 20, 1e-6)
    product = torch.eye(4).expand(64, 4, 4)
    for layer in layers:
        product = layer.transpose(-1, -2) @ product  # paper frame, applied in order
    delta = 1e-3
    assert torch.linalg.matrix_norm(product, ord=2).max() <= 1 + delta
    assert product.sum(-1).max() <= 1 + delta and product.sum(-2).max() <= 1 + delta


# ---------------------------------------------------------------- against transformers' DeepSeek-V4 module


def test_mappings_match_transformers_deepseek_v4_hyper_connection():
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    model = tiny_model()
    ours, head = hc_modules(model)[1], model.model.hc_head
    with torch.no_grad():
        ours.scale.copy_(torch.tensor([0.7, -0.4, 1.3]))  # away from init, so every term matters
        ours.base.normal_()
        head.hc_scale.fill_(0.9)
        head.hc_base.normal_()
    v4_config = DeepseekV4Config(hidden_size=32, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)
    v4, v4_head = DeepseekV4HyperConnection(v4_config), DeepseekV4HyperHead(v4_config)
    v4.load_state_dict(ours.state_dict())
    v4_head.load_state_dict(head.state_dict())

    streams = torch.randn(2, 5, 4, 32)
    for a, b in zip(ours(streams), v4(streams)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head(streams), v4_head(streams), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- step-0 and symmetry (I5-I8, I10)


def llama_twin(model: MHCForCausalLM) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM with the same config and every shared weight."""
    fields = {k: v for k, v in model.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    llama = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all("_hc." in key or "hc_head" in key for key in unexpected)
    return llama


@pytest.mark.parametrize("collapse", ["learned", "sum", "mean"])
@pytest.mark.parametrize("pre_init,res_diag", [("uniform", 0.0), ("layer_mod_n", 3.0)])
def test_i5_step0_equals_a_prenorm_transformer(collapse, pre_init, res_diag):
    # RMSNorm cancels the scale sum_j H_pre[j] only up to its eps (mean x^2 is ~4e-4 at init), hence a tiny eps.
    model = tiny_model(hc_collapse=collapse, hc_pre_init=pre_init, hc_res_diag_init=res_diag, rms_norm_eps=1e-12)
    zero_phi(model)
    with torch.no_grad():  # any b_pre / b_res: only b_post = 0 matters
        for module in hc_modules(model):
            module.base[:4].normal_()
            module.base[8:].normal_()
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, llama_twin(model)(ids).logits, rtol=0, atol=1e-5)


def test_i5_nonzero_post_bias_breaks_the_equivalence():
    model = tiny_model()
    zero_phi(model)
    with torch.no_grad():
        for module in hc_modules(model):
            module.base[4:8] = 0.5
    ids = tokens()
    assert (model(ids).logits - llama_twin(model)(ids).logits).abs().max() > 1e-2


def test_i6_one_stream_is_the_prenorm_baseline():
    model = tiny_model(hc_mult=1, rms_norm_eps=1e-12)
    _, _, comb = hc_modules(model)[0].mappings(torch.randn(2, 3, 1, 32))
    torch.testing.assert_close(comb, torch.ones_like(comb), rtol=0, atol=1e-5)
    zero_phi(model)
    with torch.no_grad():
        for module in hc_modules(model):
            module.base.zero_()
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, llama_twin(model)(ids).logits, rtol=0, atol=1e-5)


def test_i7_residual_mixing_is_applied_in_the_documented_frame():
    config = tiny_config()
    torch.manual_seed(0)
    layer = MHCDecoderLayer(config, 0).eval()
    model = MHCModel(config)  # only for the rotary embedding
    permutation = torch.eye(4)[[2, 0, 3, 1]]
    with torch.no_grad():
        for module in (layer.attn_hc, layer.ffn_hc):
            module.fn.zero_()
            module.base.zero_()
            module.base[8:] = (12 * permutation).flatten()
            module.scale.fill_(0.01)
        layer.self_attn.o_proj.weight.zero_()  # F == 0
        layer.mlp.down_proj.weight.zero_()
    streams = torch.randn(1, 5, 4, 32)
    position_ids = torch.arange(5)[None]
    out = layer(streams, position_embeddings=model.rotary_emb(streams, position_ids), position_ids=position_ids)
    # Each sub-layer applies x' = comb^T x with comb ~= P; two sub-layers: (P^T)^2 x.
    expected = permutation.T @ (permutation.T @ streams)
    assert ((out - expected).norm() / expected.norm()) <= 1e-4


def test_i8_equal_streams_stay_equal():
    model = tiny_model()
    zero_phi(model)
    with torch.no_grad():
        for module in hc_modules(model):
            module.base[:4].normal_()
            module.base[4:8] = 0.3  # uniform across streams
            module.base[8:].normal_()
    hidden = model(tokens(), output_hidden_states=True).hidden_streams
    for layer_streams in hidden:
        assert (layer_streams - layer_streams[:, :, :1]).abs().max() <= 1e-6


def test_i10_every_parameter_gets_a_gradient_and_the_symmetric_trap_is_real():
    model = tiny_model(tie_word_embeddings=False).train()
    ids = tokens(4, 12)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name

    trapped = tiny_model().train()
    zero_phi(trapped)
    trapped(ids, labels=ids).loss.backward()
    for module in hc_modules(trapped):
        assert (module.scale.grad == 0).all()


# ---------------------------------------------------------------- transformers contract (I11-I14, I16)


def test_i12_shapes():
    model = tiny_model()
    out = model(tokens(2, 7), output_hidden_states=True)
    assert out.logits.shape == (2, 7, VOCAB)
    # transformers' layout for hidden_states; the n streams under their own name
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 7, 32) for h in out.hidden_states)
    assert len(out.hidden_streams) == 4 and all(h.shape == (2, 7, 4, 32) for h in out.hidden_streams)
    assert torch.equal(out.hidden_states[-1], model.model(tokens(2, 7)).last_hidden_state)
    assert model.model(tokens(2, 7)).last_hidden_state.shape == (2, 7, 32)


def test_i13_bf16_keeps_mappings_in_fp32(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    cast = tiny_model().to(torch.bfloat16)
    for candidate in (loaded, cast):
        assert candidate.model.embed_tokens.weight.dtype == torch.bfloat16
        for name, param in candidate.named_parameters():
            if "_hc." in name or "hc_head" in name:
                assert param.dtype == torch.float32, name
    module = hc_modules(model)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre, post, comb = module.mappings(torch.randn(2, 5, 4, 32, dtype=torch.bfloat16))
    assert comb.dtype == torch.float32 and pre.dtype == torch.float32
    assert (comb.transpose(-1, -2).sum(-1) - 1).abs().max() <= 1e-5
    ids = tokens()
    assert torch.isfinite(loaded(ids).logits).all()


def test_i14_parameter_count_formula():
    config = tiny_config(tie_word_embeddings=False)
    model = MHCForCausalLM(config)
    n, c, layers = config.hc_mult, config.hidden_size, config.num_hidden_layers
    per_sublayer = (n * n + 2 * n) * (n * c + 1) + 3
    head = n * n * c + n + 1
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}))
    assert model.num_parameters() == llama.num_parameters() + 2 * layers * per_sublayer + head
    assert (n * n + 2 * n) * (n * 1024 + 1) + 3 == 98_331  # the spec's C = 1024 figure


def test_i16_save_load_round_trip(tmp_path):
    config = tiny_config(hc_sinkhorn_iters=7, hc_eps=2e-6, hc_norm_eps=3e-6, hc_alpha_init=0.02, hc_phi_init_std=0.05,
                         hc_pre_init="layer_mod_n", hc_res_diag_init=2.0, hc_collapse="mean", residual_dropout=0.1)
    torch.manual_seed(0)
    model = MHCForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MHCForCausalLM)
    for field in ("hc_mult", "hc_sinkhorn_iters", "hc_eps", "hc_norm_eps", "hc_alpha_init", "hc_phi_init_std",
                  "hc_pre_init", "hc_res_diag_init", "hc_collapse", "residual_dropout"):
        assert getattr(loaded.config, field) == getattr(config, field), field
    ids = tokens()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == [
        "configuration_mhc.py", "hyper_connection_cpu.py", "modeling_mhc.py"]
    assert not list(tmp_path.glob("*.bin"))


def test_auto_classes_resolve_mhc():
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("mhc_lm", **fields)
    assert isinstance(config, MHCConfig)
    assert isinstance(AutoModel.from_config(config), MHCModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), MHCForCausalLM)


# ---------------------------------------------------------------- padding, attention backends, checkpointing


def test_sdpa_and_eager_attention_agree():
    ids = tokens(2, 10)
    sdpa = tiny_model(attn_implementation="sdpa")
    eager = tiny_model(attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- training behaviour (I15) and bad input


def stream_spread(streams: torch.Tensor) -> float:
    """RMS distance of the streams from their mean, relative to the streams' RMS."""
    return ((streams - streams.mean(-2, keepdim=True)).square().mean().sqrt() / streams.square().mean().sqrt()).item()


def test_i15_streams_spread_at_every_layer_after_training():
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(15):
        ids = tokens(4, 16, seed=100 + step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    hidden = model(tokens(2, 16), output_hidden_states=True).hidden_streams
    spreads = [stream_spread(h) for h in hidden[1:]]
    assert min(spreads) > 1e-4, spreads


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"hc_mult": 0}, "hc_mult"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"hc_sinkhorn_iters": 0}, "hc_sinkhorn_iters"),
        ({"hc_collapse": "max"}, "hc_collapse"),
        ({"hc_pre_init": "random"}, "hc_pre_init"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_non_finite_mixing_matrices_are_reported_with_the_layer():
    from hf_ext.trainers.base import StageTrainerMixin

    model = tiny_model().train()
    with torch.no_grad():
        model.model.layers[1].ffn_hc.scale[2] = float("nan")
    assert model(tokens(), labels=tokens()).loss.isnan()  # a NaN loss, as any transformers model gives
    # what a stage's trainer reports when it stops at such a step (tests/test_reliability.py runs one)
    diagnosis = StageTrainerMixin.first_nonfinite_output(model, {"input_ids": tokens(), "labels": tokens()})
    assert diagnosis == "first non-finite output: model.layers.1.ffn_hc"


def test_config_json_lists_every_auto_class(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_mhc.MHCConfig",
        "AutoModel": "modeling_mhc.MHCModel",
        "AutoModelForCausalLM": "modeling_mhc.MHCForCausalLM",
    }


def test_qlora_nf4_all_linear_trains(tmp_path):
    from peft import get_peft_model

    from hf_ext.loading import load_model, peft_config
    from hf_ext.recipe import ModelArguments

    tiny_model(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    args = ModelArguments(model_name_or_path=str(tmp_path), dtype="float32", load_in_4bit=True, use_peft=True)
    model = get_peft_model(load_model(args), peft_config(args))
    quantized = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert any(n.endswith("q_proj") for n in quantized) and any(n.endswith("down_proj") for n in quantized)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "_hc." in n)  # mappings never quantized

    ids = tokens(4, 16)
    losses = train_steps(model, 8, input_ids=ids, labels=ids)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses
