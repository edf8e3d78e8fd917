"""The architecture contract: what every hf_ext model (every architecture, every head) owes a transformers user.

In the spirit of transformers' `ModelTesterMixin` / `GenerationTesterMixin`, written for our models: one row per
architecture and head in `CASES`, with transformers' own `LlamaForCausalLM` as the control row that must pass the
same checks. A new architecture gets the whole suite by adding one `Case`.

Every check goes through the path users take (`generate`, the Auto classes, `pipeline`, PEFT + bitsandbytes) and
compares logits with tolerances, not only tokens: a tie between two tokens hides a wrong logit. The suite runs on
both ends of the supported transformers range (`make test` and `make test-lowest`), so the cache is read by name
through `cache_of`, whichever the installed version calls it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSemanticSegmentation,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPast

import hf_ext  # noqa: F401  (registers the architectures)
from hf_ext.models.arc_grid import ArcGridConfig, ArcGridForGridPrediction
from hf_ext.models.mamba_ssm import (
    MambaSSMConfig,
    MambaSSMForCausalLM,
    MambaSSMForMaskedLM,
    MambaSSMForSequenceClassification,
)
from hf_ext.models.mhc import MHCConfig, MHCForCausalLM
from tests.conftest import run_without_hf_ext

VOCAB = 96
PAD = 0
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
ATOL = 1e-4


def cache_of(output):
    """The cache of a model output, under the installed transformers' field name."""
    return getattr(output, CACHE_FIELD)


# ---------------------------------------------------------------------------------------------------- the rows


def token_inputs(batch: int = 2, length: int = 7, seed: int = 0, vocab: int = VOCAB) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, vocab, (batch, length), generator=generator)}


def grid_inputs(champion: bool, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    grids = torch.randint(0, 10, (batch, 4, 5), generator=generator)
    grids[1, 3:] = 10  # the second grid is 3 x 4 on the shared 4 x 5 canvas (PAD outside)
    grids[1, :, 4:] = 10
    inputs = {"input_grids": grids}
    if champion:
        inputs["context_inputs"] = torch.randint(0, 10, (batch, 2, 3, 3), generator=generator)
        inputs["context_outputs"] = torch.randint(0, 10, (batch, 2, 3, 3), generator=generator)
        inputs["context_mask"] = torch.tensor([[True, True], [True, False]])
    return inputs


@dataclass
class Case:
    """One architecture + head: how to build it tiny and feed it."""

    name: str
    build: Callable[[dict], torch.nn.Module]  # config overrides -> model in eval mode
    auto_class: type  # the Auto class of the head; `AutoModel` must load the backbone too
    inputs: Callable[[], dict] | None = None  # default: token_inputs over `vocab`
    train_labels: Callable[[dict], dict] = lambda inputs: {"labels": inputs["input_ids"]}
    generates: bool = False  # causal LM: the generation contract applies
    tokens: bool = True  # takes input_ids / attention_mask (padding, hidden states, embeddings resizing)
    attentions: bool = False  # returns attention weights under eager attention
    pipeline_task: str | None = None
    hidden_states: bool = True  # `output_hidden_states` gives one `[batch, seq, hidden]` tensor per layer + embeddings
    remote_code: bool = True  # hf_ext's own: saved with its modeling code
    wider: dict = None  # overrides for the QLoRA row: bitsandbytes' CPU 4-bit path wants 64-wide layers
    vocab: int = VOCAB  # token ids the inputs and prompts draw from
    # Bitwise-equal logits in another process. Not for torch.compile'd code: each process generates its own kernels
    # (shape guards, vector-loop tails), which may round the last bit differently; those rows get 1e-6.
    bitwise_across_processes: bool = True

    def __post_init__(self):
        self.wider = self.wider or {"hidden_size": 64, "intermediate_size": 128}
        self.inputs = self.inputs or (lambda: token_inputs(vocab=self.vocab))


LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
MAMBA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, n_groups=1, chunk_size=4,
             expand=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
MAMBA_WIDER = {"hidden_size": 64, "num_heads": 16}
ARC = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_encoder_layers=2, num_decoder_layers=1,
           num_context_layers=1)


def seeded(cls, config_cls, **defaults):
    def build(overrides: dict) -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(config_cls(**{**defaults, **overrides})).eval()

    return build


CASES = [
    Case("llama (control)", seeded(LlamaForCausalLM, LlamaConfig, **LLAMA), AutoModelForCausalLM, generates=True,
         attentions=True, pipeline_task="text-generation", remote_code=False),
] + [
    # every hyper-connection kernel: "auto" (the default; compiled here, writes eager while decoding) and both forced
    Case(f"mhc_lm {kernel}", seeded(MHCForCausalLM, MHCConfig, **LLAMA, hc_mult=2, hc_kernel=kernel),
         AutoModelForCausalLM, generates=True, attentions=True, pipeline_task="text-generation",
         bitwise_across_processes=kernel == "eager")
    for kernel in ("auto", "eager", "compiled")
] + [
    Case("mamba_ssm causal", seeded(MambaSSMForCausalLM, MambaSSMConfig, **MAMBA), AutoModelForCausalLM,
         generates=True, pipeline_task="text-generation", wider=MAMBA_WIDER),
    Case("mamba_ssm masked", seeded(MambaSSMForMaskedLM, MambaSSMConfig, **MAMBA, bidirectional=True),
         AutoModelForMaskedLM, pipeline_task="fill-mask", wider=MAMBA_WIDER),
    Case("mamba_ssm classification", seeded(MambaSSMForSequenceClassification, MambaSSMConfig, **MAMBA, num_labels=3),
         AutoModelForSequenceClassification, train_labels=lambda inputs: {"labels": torch.tensor([0, 2])},
         wider=MAMBA_WIDER),
    Case("arc_grid decoder_only", seeded(ArcGridForGridPrediction, ArcGridConfig, **ARC, variant="decoder_only"),
         AutoModelForSemanticSegmentation, vocab=10, generates=True, hidden_states=False),
] + [
    Case(f"arc_grid {variant}", seeded(ArcGridForGridPrediction, ArcGridConfig, **ARC, variant=variant),
         AutoModelForSemanticSegmentation, inputs=lambda champion=variant == "champion": grid_inputs(champion),
         train_labels=lambda inputs: {"labels": inputs["input_grids"]}, tokens=False, hidden_states=False)
    for variant in ("encoder_decoder", "grid2d", "grid2d_perminv", "champion")
]


def cases(**capabilities) -> list:
    return [pytest.param(case, id=case.name) for case in CASES
            if all(getattr(case, key) == value for key, value in capabilities.items())]


def accepts(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


# ---------------------------------------------------------------------------------------------------- generation


def generate(model, input_ids, attention_mask=None, new_tokens: int = 5, **kwargs):
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=PAD, output_logits=True, return_dict_in_generate=True, **kwargs,
    )


@pytest.mark.parametrize("prompt_length", [1, 6])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("case", cases(generates=True))
def test_cached_generation_logits_equal_the_full_forward(case, mode, prompt_length):
    model = case.build({})
    ids = token_inputs(2, prompt_length, seed=prompt_length, vocab=case.vocab)["input_ids"]
    torch.manual_seed(7)
    out = generate(model, ids, do_sample=mode == "sample", top_k=10 if mode == "sample" else None)
    assert out.sequences.shape == (2, prompt_length + 5)
    stepped = torch.stack(out.logits, dim=1)
    full = model(input_ids=out.sequences).logits[:, prompt_length - 1 : -1]
    torch.testing.assert_close(stepped, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", cases(generates=True))
def test_beam_search_with_the_cache_equals_without(case):
    model = case.build({})
    ids = token_inputs(2, 4, seed=3, vocab=case.vocab)["input_ids"]
    kwargs = dict(num_beams=3, do_sample=False, output_scores=True)
    cached, uncached = generate(model, ids, **kwargs), generate(model, ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", cases(generates=True))
def test_left_padded_batched_generation_equals_one_by_one(case):
    model = case.build({})
    prompts = [token_inputs(1, n, seed=n, vocab=case.vocab)["input_ids"][0] for n in (3, 7)]
    ids, mask = padded(prompts, "left")
    together = generate(model, ids, mask)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None])
        assert torch.equal(together.sequences[row, ids.shape[1]:], alone.sequences[0, len(prompt):])
        torch.testing.assert_close(torch.stack(together.logits, 1)[row], torch.stack(alone.logits, 1)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", cases(generates=True))
def test_generate_returns_a_standard_cache(case):
    from transformers.cache_utils import Cache

    model = case.build({})
    out = generate(model, token_inputs(1, 3, vocab=case.vocab)["input_ids"], output_hidden_states=True, output_scores=True)
    assert isinstance(cache_of(out), Cache)
    assert len(out.scores) == 5
    if case.hidden_states:
        assert len(out.hidden_states) == 5 and out.hidden_states[0][-1].shape[-1] == model.config.hidden_size


# ---------------------------------------------------------------------------------------------------- padding


def padded(sequences: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(length - len(sequence), length)
        ids[row, span], mask[row, span] = sequence, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", cases(tokens=True))
def test_padded_batch_logits_equal_one_by_one(case, side):
    model = case.build({})
    sequences = [token_inputs(1, n, seed=n, vocab=case.vocab)["input_ids"][0] for n in (4, 9, 6)]
    ids, mask = padded(sequences, side)
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if accepts(model, "position_ids") else {}
    together = model(input_ids=ids, attention_mask=mask, **extra).logits
    for row, sequence in enumerate(sequences):
        alone = model(input_ids=sequence[None]).logits[0]
        got = together[row][mask[row].bool()] if together.dim() == 3 else together[row]
        torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("case", cases())
def test_save_load_through_every_auto_class(case, tmp_path):
    model = case.build({})
    inputs = case.inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = case.auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    base = getattr(model, model.base_model_prefix)
    assert type(backbone) is type(base)
    assert torch.equal(backbone(**inputs).last_hidden_state, base(**inputs).last_hidden_state)


@pytest.mark.parametrize("case", cases(remote_code=True))
def test_loads_with_trust_remote_code_where_hf_ext_cannot_be_imported(case, tmp_path):
    model = case.build({})
    inputs = case.inputs()
    model.save_pretrained(tmp_path / "model")
    save_file(inputs, tmp_path / "inputs.safetensors")
    save_file({"logits": model(**inputs).logits.contiguous()}, tmp_path / "logits.safetensors")
    run_without_hf_ext(tmp_path, f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, {case.auto_class.__name__} as Head
        model = Head.from_pretrained("model", trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        inputs = load_file("inputs.safetensors")
        expected = load_file("logits.safetensors")["logits"]
        got = model(**inputs).logits
        assert torch.allclose(got, expected, atol={0 if case.bitwise_across_processes else 1e-6}, rtol=0), (got - expected).abs().max()
        backbone = AutoModel.from_pretrained("model", trust_remote_code=True)
        assert "transformers_modules" in type(backbone).__module__
        {"generated = model.generate(inputs['input_ids'], max_new_tokens=3, min_new_tokens=3, pad_token_id=0)" if case.generates else ""}
        {"assert generated.shape[1] == inputs['input_ids'].shape[1] + 3" if case.generates else ""}
        print("ok")
    """)


# ---------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("case", cases(hidden_states=True))
def test_hidden_states_follow_the_transformers_layout(case):
    model = case.build({})
    inputs = case.inputs()
    batch, length = inputs["input_ids"].shape
    out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (batch, length, model.config.hidden_size) for h in out.hidden_states)
    base = getattr(model, model.base_model_prefix)
    torch.testing.assert_close(out.hidden_states[-1], base(**inputs).last_hidden_state)
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(inputs["input_ids"]))


@pytest.mark.parametrize("case", cases(attentions=True))
def test_output_attentions_under_eager_attention(case):
    model = case.build({"attn_implementation": "eager"})
    inputs = case.inputs()
    out = model(**inputs, output_attentions=True)
    batch, length = inputs["input_ids"].shape
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (batch, model.config.num_attention_heads, length, length)
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, model.config.num_attention_heads, length))
        assert torch.all(weights.triu(1) == 0)  # causal


@pytest.mark.parametrize("case", cases())
def test_return_dict_false_gives_the_tuple(case):
    model = case.build({})
    inputs = case.inputs()
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], model(**inputs).logits)
    with_loss = model(**inputs, **case.train_labels(inputs), return_dict=False)
    assert with_loss[0].dim() == 0 and torch.equal(with_loss[1], as_tuple[0])


# ---------------------------------------------------------------------------------------------------- training


def gradients(model, inputs: dict) -> dict:
    model.zero_grad()
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", cases())
def test_gradient_checkpointing_gives_the_same_gradients(case):
    model = case.build({}).train()
    inputs = case.inputs()
    inputs.update(case.train_labels(inputs))
    plain = gradients(model, inputs)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients(model, inputs)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", cases(tokens=True))
def test_resize_token_embeddings_keeps_the_old_logits(case):
    model = case.build({})
    inputs = case.inputs()
    before = model(**inputs).logits
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 8)
    assert model.get_input_embeddings().weight.shape[0] == old + 8
    after = model(**inputs).logits
    if model.get_output_embeddings() is not None:  # an LM head grows with the vocabulary (and stays tied)
        assert after.shape[-1] == old + 8
        if model.config.tie_word_embeddings:
            assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        after = after[..., :old]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", cases())
def test_bf16_forward_is_finite_and_close_to_fp32(case):
    model = case.build({})
    inputs = case.inputs()
    reference = model(**inputs).logits
    logits = model.to(torch.bfloat16)(**inputs).logits.float()
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().mean() <= 0.05 * reference.abs().mean() + 1e-3


@pytest.mark.parametrize("case", cases())
def test_qlora_nf4_all_linear_trains(case, tmp_path):
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model

    case.build(case.wider).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = case.auto_class.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float32)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    adapted = [name for name, _ in model.named_parameters() if "lora_A" in name]
    assert adapted and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters() if "lora_" in n)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    inputs = case.inputs()
    inputs.update(case.train_labels(inputs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ---------------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("case", cases(pipeline_task="text-generation"))
def test_text_generation_pipeline(case, tokenizer):
    model = case.build({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "The quick brown fox"
    text = generator(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0]["generated_text"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert text.startswith(prompt) and len(text) > len(prompt)


@pytest.mark.parametrize("case", cases(pipeline_task="fill-mask"))
def test_fill_mask_pipeline(case):
    from hf_ext.data.protein import build_protein_tokenizer

    tokenizer = build_protein_tokenizer()
    model = case.build({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
    filler = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=3)
    sequence = f"EVQLVESGG{tokenizer.mask_token}LVQPGGSLRLSCAAS"
    predictions = filler(sequence)
    inputs = tokenizer(sequence, return_tensors="pt")
    position = int((inputs.input_ids[0] == tokenizer.mask_token_id).nonzero())
    probabilities = model(**inputs).logits[0, position].softmax(-1)
    top = probabilities.topk(3)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), abs=1e-5)
