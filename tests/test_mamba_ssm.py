"""The Mamba selective-SSM models: the invariants of specs/mamba.md §11, plus the transformers contract."""

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    Mamba2Config,
    Mamba2ForCausalLM,
)

import hf_ext  # noqa: F401  (registers the Auto classes)
from hf_ext.models.mamba_ssm import (
    MambaSSMCache,
    MambaSSMConfig,
    MambaSSMForCausalLM,
    MambaSSMForMaskedLM,
    MambaSSMForSequenceClassification,
    MambaSSMModel,
)
from hf_ext.models.mamba_ssm import modeling_mamba_ssm
from hf_ext.models.mamba_ssm.modeling_mamba_ssm import CACHE_FIELD, selective_state_step, sequential_scan, ssd_scan
from tests.conftest import train_steps

VOCAB = 40
EXACT = 1e-10  # fp64 tolerance for "exactly equal up to rounding"


def tiny_config(**overrides) -> MambaSSMConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                  n_groups=2, chunk_size=8, pad_token_id=0)
    return MambaSSMConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, cls=MambaSSMForCausalLM, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():  # non-trivial values everywhere (the init has zero conv biases and D = 1)
        for name, param in model.named_parameters():
            if name.endswith(("conv1d.bias", "conv1d_rev.bias", ".D", ".D_rev")):
                param.normal_(0, 0.5)
    return model


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def scan_inputs(batch=2, length=77, heads=4, head_dim=3, groups=2, state=5, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)
    x = randn(batch, length, heads, head_dim)
    dt = torch.rand(batch, length, heads, generator=generator, dtype=dtype)
    A = -4 * torch.rand(heads, generator=generator, dtype=dtype)
    B, C = randn(batch, length, groups, state), randn(batch, length, groups, state)
    initial = randn(batch, heads, head_dim, state)
    return x, dt, A, B, C, initial


def padded_batch(sequences: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(length - len(sequence), length)
        ids[row, span], mask[row, span] = sequence, 1
    return ids, mask


# ---------------------------------------------------------------- 1-2. the scan


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64, 128])
def test_chunked_scan_equals_sequential_recurrence(chunk_size):
    x, dt, A, B, C, initial = scan_inputs()
    expected_y, expected_state = sequential_scan(x, dt, A, B, C, initial_state=initial)
    y, state = ssd_scan(x, dt, A, B, C, chunk_size, initial_state=initial)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=EXACT)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=EXACT)


def test_chunked_scan_is_accurate_in_fp32_over_long_sequences_with_strong_decay():
    # sum(dt * |A|) reaches ~10^4 over the sequence: exp(-cumsum) formulations overflow fp32 long before that
    x, dt, A, B, C, initial = scan_inputs(batch=1, length=2048, heads=4, head_dim=4, groups=1, state=4, seed=3)
    dt, A = dt * 3, -16 * torch.rand(4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected_y, expected_state = sequential_scan(x, dt, A, B, C, initial_state=initial)
    y, state = ssd_scan(*(t.float() for t in (x, dt, A, B, C)), 64, initial_state=initial.float())
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert ((y.double() - expected_y).norm() / expected_y.norm()).item() <= 1e-5
    assert ((state.double() - expected_state).norm() / expected_state.norm()).item() <= 1e-5


def test_chunked_scan_gradients_equal_the_sequential_recurrence():
    inputs = [t.requires_grad_() for t in scan_inputs(length=37)]
    weights = torch.randn(2, 37, 4, 3, dtype=torch.float64)

    def grads(scan):
        y, state = scan(*inputs)
        ((y * weights).sum() + state.square().sum()).backward()
        result = [t.grad.clone() for t in inputs]
        for t in inputs:
            t.grad = None
        return result

    chunked = grads(lambda x, dt, A, B, C, s: ssd_scan(x, dt, A, B, C, 8, initial_state=s))
    sequential = grads(lambda x, dt, A, B, C, s: sequential_scan(x, dt, A, B, C, initial_state=s))
    for got, expected in zip(chunked, sequential):
        torch.testing.assert_close(got, expected, rtol=0, atol=EXACT)


def test_scan_passes_gradcheck():
    inputs = tuple(t.requires_grad_() for t in scan_inputs(batch=1, length=7, heads=2, head_dim=2, groups=1, state=2))
    assert torch.autograd.gradcheck(lambda *a: ssd_scan(*a[:5], 4, initial_state=a[5]), inputs)


def test_the_number_of_recurrence_steps_is_the_number_of_chunks(monkeypatch):
    """Linear time: the only sequential loop runs ceil(L / Q) times (the rest are batched matmuls)."""
    calls = []
    original = torch.stack

    def counting_stack(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return original(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", counting_stack)
    x, dt, A, B, C, _ = scan_inputs(length=200)
    ssd_scan(x, dt, A, B, C, 64)
    assert calls == [4]  # ceil(200 / 64) chunk states


# ---------------------------------------------------------------- 3-4. padding and causality


@pytest.mark.parametrize(("side", "cls"), [("left", MambaSSMForCausalLM), ("right", MambaSSMForMaskedLM),
                                           ("left", MambaSSMForMaskedLM)])
def test_without_the_mask_padding_changes_real_positions(side, cls):
    """The negative control: the padding test above would fail if the mask were ignored."""
    model = tiny_model(cls=cls, bidirectional=cls is MambaSSMForMaskedLM)
    sequences = [tokens(1, n, seed=n)[0] for n in (5, 13)]
    ids, mask = padded_batch(sequences, side)
    logits = model(ids).logits
    alone = model(sequences[0][None]).logits[0]
    assert (logits[0][mask[0].bool()] - alone).abs().max() > 1e-2


def test_causal_model_never_looks_ahead_and_bidirectional_does():
    ids = tokens(1, 20)
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % VOCAB
    causal = tiny_model()
    difference = (causal(ids).logits - causal(changed).logits).abs().amax(-1)[0]
    assert difference[:12].max() == 0 and difference[12] > 0
    bidirectional = tiny_model(cls=MambaSSMForMaskedLM, bidirectional=True)
    difference = (bidirectional(ids).logits - bidirectional(changed).logits).abs().amax(-1)[0]
    assert difference[0] > 0 and difference[19] > 0


def test_reverse_direction_with_forward_weights_is_the_mirror_image():
    model = tiny_model(cls=MambaSSMForMaskedLM, bidirectional=True)
    with torch.no_grad():
        for block in model.backbone.layers:
            mixer = block.mixer
            mixer.conv1d_rev.load_state_dict(mixer.conv1d.state_dict())
            for name in ("dt_bias", "A_log", "D"):
                getattr(mixer, name + "_rev").copy_(getattr(mixer, name))
    ids = tokens(2, 17)
    torch.testing.assert_close(model(ids.flip(1)).logits, model(ids).logits.flip(1), rtol=0, atol=EXACT)


# ---------------------------------------------------------------- 5-6. cache and generation


def test_prefill_then_decode_steps_equal_the_full_forward():
    model = tiny_model()
    ids = tokens(2, 21)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :9], use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, MambaSSMCache)
    steps = [out.logits]
    for t in range(9, 21):
        steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=EXACT)
    assert cache.get_seq_length() == 21
    assert cache.ssm_states[0].shape == (2, 4, 16, 8) and cache.conv_states[0].shape == (2, 64 + 2 * 2 * 8, 3)


def test_split_prefill_equals_the_full_forward():
    model = tiny_model()
    ids = tokens(2, 21)
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :10], use_cache=True)
    second = model(ids[:, 10:], cache=getattr(first, CACHE_FIELD), use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, rtol=0, atol=EXACT)


def test_right_padded_prefill_then_one_step_equals_each_row_alone():
    model = tiny_model()
    sequences = [tokens(1, n, seed=n)[0] for n in (6, 11, 3)]
    next_tokens = tokens(3, 1, seed=99)
    ids, mask = padded_batch(sequences, "right")
    cache = getattr(model(ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
    stepped = model(next_tokens, cache=cache, use_cache=True).logits
    for row, sequence in enumerate(sequences):
        alone = model(torch.cat([sequence, next_tokens[row]])[None], use_cache=False).logits[0, -1]
        torch.testing.assert_close(stepped[row, 0], alone, rtol=0, atol=EXACT)


def test_decode_step_is_one_recurrence_step():
    x, dt, A, B, C, initial = scan_inputs(length=1)
    y, state = selective_state_step(initial, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    expected_y, expected_state = ssd_scan(x, dt, A, B, C, 64, initial_state=initial)
    torch.testing.assert_close(y, expected_y[:, 0], rtol=0, atol=EXACT)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=EXACT)


def test_bidirectional_model_refuses_a_cache_and_generate():
    model = tiny_model(cls=MambaSSMForMaskedLM, bidirectional=True)
    with pytest.raises(ValueError, match="no recurrent cache"):
        model(tokens(), use_cache=True)
    with pytest.raises(ValueError, match="cannot generate"):
        model.generate(tokens())
    with pytest.raises(ValueError, match="bidirectional=False"):
        MambaSSMForCausalLM(tiny_config(bidirectional=True))
    with pytest.raises(ValueError, match="bidirectional=True"):
        MambaSSMForMaskedLM(tiny_config())
    assert tiny_config(bidirectional=True).use_cache is False


# ---------------------------------------------------------------- 8. structure, dropout, tying


def test_every_block_has_its_own_norm_and_the_head_is_tied():
    model = tiny_model(num_hidden_layers=3)
    norms = {id(block.norm) for block in model.backbone.layers}
    assert len(norms) == 3 and id(model.backbone.norm_f) not in norms
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.get_input_embeddings() is model.backbone.embeddings and model.get_output_embeddings() is model.lm_head
    names = {name for name, _ in model.named_parameters()}
    assert "lm_head.weight" not in names  # one tensor, saved once


def test_dropout_is_active_in_training_only():
    model = tiny_model(hidden_dropout=0.3, embedding_dropout=0.1)
    ids = tokens()
    eval_logits = model(ids).logits
    assert torch.equal(eval_logits, model(ids).logits)
    model.train()
    first, second = model(ids).logits, model(ids).logits
    assert not torch.equal(first, second) and not torch.equal(first, eval_logits)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules()) == 2


def test_training_forward_does_not_build_a_cache():
    model = tiny_model().train()
    assert getattr(model(tokens()), CACHE_FIELD) is None
    assert getattr(model.eval()(tokens()), CACHE_FIELD) is not None


def test_every_parameter_gets_a_gradient():
    model = tiny_model(cls=MambaSSMForMaskedLM, bidirectional=True).train()
    ids = tokens(2, 12)
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


# ---------------------------------------------------------------- heads


def test_masked_lm_loss_ignores_unlabelled_positions_and_does_not_shift():
    model = tiny_model(cls=MambaSSMForMaskedLM, bidirectional=True)
    ids = tokens(2, 10)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = ids[0, 3], ids[1, 7]
    output = model(ids, labels=labels)
    log_probs = output.logits.log_softmax(-1)
    expected = -(log_probs[0, 3, ids[0, 3]] + log_probs[1, 7, ids[1, 7]]) / 2
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=EXACT)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sequence_regression_pools_real_tokens_only(bidirectional):
    model = tiny_model(cls=MambaSSMForSequenceClassification, bidirectional=bidirectional, num_labels=1)
    sequences = [tokens(1, n, seed=n)[0] for n in (4, 9)]
    ids, mask = padded_batch(sequences, "right")
    targets = torch.tensor([0.5, -1.0], dtype=torch.float64)
    output = model(ids, attention_mask=mask, labels=targets)
    alone = torch.cat([model(s[None]).logits for s in sequences])
    torch.testing.assert_close(output.logits, alone, rtol=0, atol=EXACT)
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(alone.squeeze(-1), targets), rtol=0, atol=EXACT)
    assert model.config.problem_type == "regression"


def test_sequence_classification_trains():
    model = tiny_model(cls=MambaSSMForSequenceClassification, dtype=torch.float32, num_labels=3)
    losses = train_steps(model, 15, input_ids=tokens(6, 12), labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- 10. save / load / Auto classes


@pytest.mark.parametrize("cls", [MambaSSMForCausalLM, MambaSSMForMaskedLM, MambaSSMForSequenceClassification])
def test_save_load_round_trip_through_the_auto_classes(tmp_path, cls):
    auto = {MambaSSMForCausalLM: AutoModelForCausalLM, MambaSSMForMaskedLM: AutoModelForMaskedLM,
            MambaSSMForSequenceClassification: AutoModelForSequenceClassification}[cls]
    model = tiny_model(cls=cls, dtype=torch.float32, bidirectional=cls is MambaSSMForMaskedLM, hidden_dropout=0.1)
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls and loaded.config.hidden_dropout == 0.1
    ids = tokens()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    if cls is not MambaSSMForSequenceClassification:
        assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == [
        "configuration_mamba_ssm.py", "modeling_mamba_ssm.py"]
    assert not list(tmp_path.glob("*.bin"))


def test_auto_classes_resolve_mamba_ssm(tmp_path):
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("mamba_ssm", **fields)
    assert isinstance(config, MambaSSMConfig)
    assert isinstance(AutoModel.from_config(config), MambaSSMModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), MambaSSMForCausalLM)
    tiny_model().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_mamba_ssm.MambaSSMModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_mamba_ssm.MambaSSMForCausalLM"


# ---------------------------------------------------------------- 11. transformers Mamba2 weights


def mamba2_pair(chunk_size: int = 64):
    config = Mamba2Config(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
                          n_groups=2, chunk_size=chunk_size, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    reference = Mamba2ForCausalLM(config).eval()
    ours = MambaSSMForCausalLM(MambaSSMConfig.from_mamba2_config(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("chunk_size", [64, 256])
def test_mamba2_weights_give_equal_logits(chunk_size):
    reference, ours = mamba2_pair(chunk_size)
    ids = torch.randint(1, 50, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)
    assert set(reference.state_dict()) == set(ours.state_dict())
    reference.load_state_dict(ours.state_dict(), strict=True)  # and back


def test_mamba2_weights_give_equal_logits_on_a_left_padded_batch():
    reference, ours = mamba2_pair()
    ids, mask = padded_batch([torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 70)], "left")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- 12. kernels switch, config validation


def test_kernels_are_never_used_on_cpu_and_required_kernels_must_exist(monkeypatch):
    monkeypatch.setattr(modeling_mamba_ssm, "_KERNELS", {})  # as if mamba-ssm were not installed
    with pytest.raises(ImportError, match="hf_ext\\[kernels\\]"):
        MambaSSMForCausalLM(tiny_config(use_kernels=True))
    fake = {"causal_conv1d_fn": None, "mamba_chunk_scan_combined": None}  # would crash if called
    monkeypatch.setattr(modeling_mamba_ssm, "_KERNELS", fake)
    model = tiny_model(use_kernels=True)
    assert model(tokens()).logits.shape == (2, 9, VOCAB)  # CPU tensors: the PyTorch path


@pytest.mark.skipif(not torch.cuda.is_available() or modeling_mamba_ssm.load_kernels() is None,
                    reason="needs CUDA and mamba-ssm / causal-conv1d")
def test_cuda_kernels_match_the_pytorch_scan():
    model = tiny_model(dtype=torch.float32).cuda()
    sequences = [tokens(1, n, seed=n)[0] for n in (50, 90)]
    ids, mask = padded_batch(sequences, "left")
    with_kernels = model(ids.cuda(), attention_mask=mask.cuda()).logits
    model.config.use_kernels = False
    without = model(ids.cuda(), attention_mask=mask.cuda()).logits
    real = mask.bool().cuda()
    torch.testing.assert_close(with_kernels[real], without[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 3}, "num_heads \\* head_dim"),
        ({"n_groups": 3}, "divisible by n_groups"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"chunk_size": 8192}, "chunk_size must be <= 4096"),
        ({"state_size": 0}, "state_size must be >= 1"),
        ({"hidden_dropout": 1.0}, "hidden_dropout"),
        ({"use_kernels": "yes"}, "use_kernels"),
        ({"time_step_limit": (0.1, 0.01)}, "time_step_limit"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# ---------------------------------------------------------------- QLoRA


def test_qlora_nf4_lora_on_in_proj_and_out_proj_trains(tmp_path):
    from peft import get_peft_model

    from hf_ext.loading import load_model, peft_config
    from hf_ext.recipe import ModelArguments

    tiny_model(dtype=torch.float32, hidden_size=64, num_heads=8).save_pretrained(tmp_path)
    args = ModelArguments(model_name_or_path=str(tmp_path), dtype="float32", load_in_4bit=True, use_peft=True)
    model = get_peft_model(load_model(args), peft_config(args))
    quantized = {n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantized == {"in_proj", "out_proj"}
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"in_proj", "out_proj"}

    ids = tokens(4, 16)
    losses = train_steps(model, 8, input_ids=ids, labels=ids)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses
