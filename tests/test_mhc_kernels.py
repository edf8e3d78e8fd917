"""The fused hyper-connection path (`hc_kernel="compiled"`, what `"auto"` picks where a compiler exists) against the
eager one: equal outputs and gradients, no recompiles while decoding, flat Sinkhorn memory, and the fall-back to
eager when no compiler can be used.

Each test starts from a reset dynamo, so that its compiled calls are really compiled (dynamo's per-function
recompile limit would otherwise silently send a long test session's later shapes to eager) and counted.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

import hf_ext  # noqa: F401  (registration)
from hf_ext.models.mhc import MHCConfig, MHCForCausalLM
from hf_ext.models.mhc import modeling_mhc
from hf_ext.models.mhc.modeling_mhc import HC_KERNELS, MHCHyperConnection, read_streams
from tests.conftest import run_without_hf_ext

VOCAB = 97
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def tiny_config(**overrides) -> MHCConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MHCConfig(**{**fields, **overrides})


def twins(**overrides) -> tuple[MHCForCausalLM, MHCForCausalLM]:
    """The same initialised weights with the eager and the compiled kernel."""
    torch.manual_seed(0)
    eager = MHCForCausalLM(tiny_config(hc_kernel="eager", **overrides))
    compiled = MHCForCausalLM(tiny_config(hc_kernel="compiled", **overrides))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows, left-padded to 9 tokens, with labels on the real tokens only."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    HC_KERNELS.available.clear(), HC_KERNELS.unavailable.clear()
    yield
    assert "cpu" not in HC_KERNELS.unavailable, HC_KERNELS.unavailable


def assert_same(eager: tuple, compiled: tuple, **tolerance) -> None:
    (eager_logits, eager_loss, eager_grads), (logits, loss, grads) = eager, compiled
    torch.testing.assert_close(logits, eager_logits, **(tolerance or TOLERANCE))
    torch.testing.assert_close(loss, eager_loss, **(tolerance or TOLERANCE))
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], **(tolerance or TOLERANCE), msg=name)


@pytest.mark.parametrize("collapse", ["learned", "sum"])
@pytest.mark.parametrize("hc_mult", [1, 2, 4])
def test_compiled_equals_eager_outputs_and_every_gradient_on_a_padded_batch(hc_mult, collapse):
    eager, compiled = twins(hc_mult=hc_mult, hc_collapse=collapse)
    batch = padded_batch()
    reference = loss_and_gradients(eager.train(), batch)
    assert compiled_graphs() == 0
    assert_same(reference, loss_and_gradients(compiled.train(), batch))
    # read, write and the learned head were compiled (once each, for both layers), not run eagerly
    assert compiled_graphs() == (3 if collapse == "learned" else 2)


def test_compiled_equals_eager_with_gradient_checkpointing():
    eager, compiled = twins(hc_mult=4)
    batch = padded_batch()
    reference = loss_and_gradients(eager.train(), batch)
    compiled.gradient_checkpointing_enable()
    assert_same(reference, loss_and_gradients(compiled.train(), batch))
    assert compiled_graphs() == 3


def test_compiled_equals_eager_under_qlora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    twins(hc_mult=2, hidden_size=64, intermediate_size=128)[0].save_pretrained(tmp_path)
    runs = []
    for kernel in ("eager", "compiled"):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float32,
                                                     hc_kernel=kernel)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        model.train()
        out = model(**padded_batch())
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n for n in grads)
        runs.append((out.logits.detach(), out.loss.detach(), grads))
    assert_same(*runs)
    assert compiled_graphs() >= 2


def test_bf16_model_keeps_the_mapping_math_in_fp32():
    eager, compiled = twins(hc_mult=4)
    streams = torch.randn(2, 5, 4, 32)
    eager_hc, compiled_hc = eager.model.layers[0].attn_hc, compiled.model.layers[0].attn_hc
    with torch.no_grad():
        reference = eager_hc(streams)
        compiled_hc.to(torch.bfloat16)
        assert compiled_hc.fn.dtype == torch.float32
        post, comb, collapsed = compiled_hc(streams.to(torch.bfloat16))
    assert post.dtype == comb.dtype == torch.float32 and collapsed.dtype == torch.bfloat16
    # the mixing matrices come from bf16-rounded streams, in fp32: well inside bf16's own 8e-3 resolution
    torch.testing.assert_close(comb, reference[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(collapsed.float(), reference[2], atol=5e-2, rtol=2e-2)


def test_bf16_autocast_keeps_the_streams_in_their_dtype_with_both_kernels():
    eager, compiled = twins(hc_mult=4)
    batch = padded_batch()
    outputs = []
    for model in (eager.train(), compiled.train()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, output_hidden_states=True)
        out.loss.backward()
        assert all(streams.dtype == torch.float32 for streams in out.hidden_streams)
        outputs.append((out.logits.float().detach(), model.model.layers[0].attn_hc.fn.grad.clone()))
    (eager_logits, eager_grad), (logits, grad) = outputs
    # attention and MLP run in bf16 under autocast in both; the hyper-connections in fp32 in both
    torch.testing.assert_close(logits, eager_logits, atol=1e-2, rtol=0)
    torch.testing.assert_close(grad, eager_grad, atol=1e-3, rtol=1e-2)


def test_generation_does_not_recompile_per_decoding_step():
    eager, compiled = twins(hc_mult=4)
    eager.eval(), compiled.eval()
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0

    def generate(model, new_tokens):
        return model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)

    generate(compiled, 3)
    after_warm_up = compiled_graphs()
    out = generate(compiled, 20)
    assert compiled_graphs() == after_warm_up, "a decoding step recompiled"
    reference = generate(eager, 20)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(reference.logits, 1), **TOLERANCE)
    # batch 1: prefill and single-token steps, each one more graph at most, then none
    generate_one = lambda n: compiled.generate(prompt[:1], max_new_tokens=n, min_new_tokens=n, pad_token_id=0)  # noqa: E731
    generate_one(3)
    after_batch_one = compiled_graphs()
    generate_one(20)
    assert compiled_graphs() == after_batch_one


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_training_memory_does_not_grow_with_the_sinkhorn_iterations(kernel):
    """The bytes autograd keeps for the backward of one hyper-connection (64 tokens) at 5, 20 and 40 iterations."""

    def saved_bytes(iterations: int) -> int:
        module = MHCHyperConnection(tiny_config(hc_mult=4, hc_sinkhorn_iters=iterations, hc_kernel=kernel), 0)
        with torch.no_grad():
            module.fn.normal_(0, 0.1), module.base.zero_(), module.scale.fill_(1.0)
        total = []

        def pack(tensor):
            total.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            post, comb, collapsed = module(torch.randn(64, 4, 32, requires_grad=True))
        (post.sum() + comb.square().sum() + collapsed.sum()).backward()
        return sum(total)

    sizes = [saved_bytes(iterations) for iterations in (5, 20, 40)]
    # Plain autograd through the iterations would keep ~2 x 64 x 16 floats more per iteration (8 KiB, 280 KiB from
    # 5 to 40); compiled, the partitioner may keep one more per-token n-vector (1 KiB) at some iteration counts.
    assert max(sizes) - min(sizes) <= 64 * 4 * 4, sizes


def test_recomputed_sinkhorn_backward_equals_autograd_through_the_iterations():
    logits = torch.randn(16, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(16, 4, 4, dtype=torch.float64)
    (direct,) = torch.autograd.grad((modeling_mhc.sinkhorn(logits, 20, 1e-6) * weights).sum(), logits)
    (recomputed,) = torch.autograd.grad((modeling_mhc.project_doubly_stochastic(logits, 20, 1e-6) * weights).sum(),
                                        logits)
    torch.testing.assert_close(recomputed, direct, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x: modeling_mhc.project_doubly_stochastic(x, 5, 1e-6), (logits[:2],))


def test_unknown_kernel_is_a_config_error_naming_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"hc_kernel must be one of \('auto', 'eager', 'compiled'\), got 'triton'"):
        tiny_config(hc_kernel="triton")


BROKEN_COMPILER = """
    import logging, warnings
    import torch
    import torch._inductor.config
    torch._inductor.config.cpp.cxx = ("/nonexistent/c++",)  # as on a machine without a C++ compiler
"""


def test_without_a_compiler_the_compiled_kernel_falls_back_to_eager_with_one_log_line(tmp_path):
    script = textwrap.dedent(BROKEN_COMPILER) + textwrap.dedent("""
        import hf_ext
        from transformers.utils import logging as hf_logging
        from hf_ext.models.mhc import MHCConfig, MHCForCausalLM
        hf_logging.set_verbosity_warning()
        fields = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, hc_mult=2)
        torch.manual_seed(0)
        eager = MHCForCausalLM(MHCConfig(**fields, hc_kernel="eager"))
        compiled = MHCForCausalLM(MHCConfig(**fields, hc_kernel="compiled"))
        compiled.load_state_dict(eager.state_dict())
        ids = torch.randint(3, 97, (2, 7))
        for _ in range(2):
            assert torch.equal(compiled(ids, labels=ids).logits, eager(ids, labels=ids).logits)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "hc_kernel" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "No working C++ compiler" in warnings[0] and "using the eager hyper-connections" in warnings[0]


def test_saved_remote_code_chooses_eager_by_itself_without_hf_ext_and_without_a_compiler(tmp_path):
    eager, _ = twins(hc_mult=2)
    config = eager.config
    config.hc_kernel = "auto"
    eager.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    save_file({"ids": ids, "logits": eager.eval()(ids).logits.contiguous()}, tmp_path / "expected.safetensors")
    run_without_hf_ext(tmp_path, textwrap.dedent(BROKEN_COMPILER) + textwrap.dedent("""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert model.config.hc_kernel == "auto"
        expected = load_file("expected.safetensors")
        got = model(expected["ids"]).logits
        torch.testing.assert_close(got, expected["logits"], atol=1e-5, rtol=1e-5)
        modeling = sys.modules[type(model).__module__]
        assert "cpu" in modeling.HC_KERNELS.unavailable and not modeling.HC_KERNELS.compiled
        print("ok")
    """))


def test_the_compiled_read_is_one_graph_for_every_token_count_above_one():
    module = MHCHyperConnection(tiny_config(hc_mult=4, hc_kernel="compiled"), 0)
    with torch.no_grad():
        module.fn.normal_(0, 0.1), module.base.zero_(), module.scale.fill_(1.0)
        for shape in [(2, 7), (3, 5), (1, 9), (4, 33)]:
            streams = torch.randn(*shape, 4, 32)
            torch.testing.assert_close(module(streams), read_streams(streams, module.fn, module.base, module.scale,
                                                                     20, 1e-6, 1e-6), **TOLERANCE)
    assert compiled_graphs() == 1


# ---------------------------------------------------------------- the CPU decoding kernels (hyper_connection_cpu.py)
@pytest.mark.parametrize("hc_mult", [1, 2, 4])
@pytest.mark.parametrize("lead", [(1, 1), (3, 5)])
def test_cpu_decoding_kernels_equal_the_eager_functions(hc_mult, lead):
    n, hidden = hc_mult, 32
    generator = torch.Generator().manual_seed(hc_mult)
    fn = torch.randn(n * n + 2 * n, n * hidden, generator=generator) * 0.3
    base, scale = torch.randn(n * n + 2 * n, generator=generator), torch.rand(3, generator=generator) + 0.5
    streams = torch.randn(*lead, n, hidden, generator=generator)
    output = torch.randn(*lead, hidden, generator=generator)
    kernels = HC_KERNELS.cpu_decode
    assert kernels.ready(), kernels.unavailable
    with torch.no_grad():
        expected = read_streams(streams, fn, base, scale, 20, 1e-6, 1e-6)
        for got, want in zip(kernels.read(streams, fn, base, scale, 20, 1e-6, 1e-6), expected, strict=True):
            torch.testing.assert_close(got, want, **TOLERANCE)
        post, comb, _ = expected
        torch.testing.assert_close(kernels.write(streams, output, post, comb),
                                   modeling_mhc.write_streams(streams, output, post, comb), **TOLERANCE)
        # a non-contiguous sub-layer output is taken as well
        wide = torch.randn(*lead, 2 * hidden, generator=generator)[..., ::2]
        torch.testing.assert_close(kernels.write(streams, wide, post, comb),
                                   modeling_mhc.write_streams(streams, wide, post, comb), **TOLERANCE)
        head_fn, head_base = fn[:n] / 3, base[:n]
        torch.testing.assert_close(kernels.collapse(streams, head_fn, head_base, scale[:1], 1e-6, 1e-6),
                                   modeling_mhc.collapse_learned(streams, head_fn, head_base, scale[:1], 1e-6, 1e-6),
                                   **TOLERANCE)


@pytest.mark.parametrize("collapse", ["learned", "sum"])
def test_auto_decodes_on_the_cpu_kernels_with_the_eager_logits(collapse, monkeypatch):
    torch.manual_seed(0)
    eager = MHCForCausalLM(tiny_config(hc_kernel="eager", hc_mult=4, hc_collapse=collapse)).eval()
    auto = MHCForCausalLM(tiny_config(hc_kernel="auto", hc_mult=4, hc_collapse=collapse)).eval()
    auto.load_state_dict(eager.state_dict())
    calls = {function.__name__: 0 for function in HC_KERNELS.cpu_decode_twins}
    for function, twin in list(HC_KERNELS.cpu_decode_twins.items()):
        def counted(*args, _twin=twin, _name=function.__name__):
            calls[_name] += 1
            return _twin(*args)
        monkeypatch.setitem(HC_KERNELS.cpu_decode_twins, function, counted)
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0

    def generate(model):
        return model.generate(prompt, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)

    out, reference = generate(auto), generate(eager)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(reference.logits, 1), **TOLERANCE)
    # prefill and 11 cached steps, 2 layers x 2 hyper-connections each, and the learned head once per forward
    assert calls == {"read_streams": 12 * 4, "write_streams": 12 * 4,
                     "collapse_learned": 12 if collapse == "learned" else 0}, calls
    assert compiled_graphs() == 0  # nothing was compiled for decoding
    # with autograd (training, or a forward outside no_grad) the compiled path is taken, not these kernels
    auto(prompt, attention_mask=mask)
    assert sum(calls.values()) == 12 * (8 + (collapse == "learned"))


def test_without_a_compiler_auto_decodes_eagerly_with_the_same_tokens(tmp_path):
    script = textwrap.dedent(BROKEN_COMPILER) + textwrap.dedent("""
        import hf_ext
        from hf_ext.models.mhc import MHCConfig, MHCForCausalLM
        from hf_ext.models.mhc.modeling_mhc import HC_KERNELS
        fields = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, hc_mult=2)
        torch.manual_seed(0)
        eager = MHCForCausalLM(MHCConfig(**fields, hc_kernel="eager")).eval()
        auto = MHCForCausalLM(MHCConfig(**fields, hc_kernel="auto")).eval()
        auto.load_state_dict(eager.state_dict())
        ids = torch.randint(3, 97, (1, 5))
        kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(auto.generate(ids, **kwargs), eager.generate(ids, **kwargs))
        assert HC_KERNELS.cpu_decode.library is None and "compiler" in HC_KERNELS.cpu_decode.unavailable
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_saved_remote_code_decodes_on_the_cpu_kernels_without_hf_ext(tmp_path):
    eager, _ = twins(hc_mult=2)
    eager.config.hc_kernel = "auto"
    eager.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "hyper_connection_cpu.py").is_file()  # copied with modeling_mhc.py, which imports it
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    save_file({"ids": ids, "tokens": eager.eval().generate(ids, **kwargs)}, tmp_path / "expected.safetensors")
    run_without_hf_ext(tmp_path, """
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        expected = load_file("expected.safetensors")
        tokens = model.generate(expected["ids"], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, expected["tokens"])
        modeling = sys.modules[type(model).__module__]
        assert modeling.HC_KERNELS.cpu_decode.library is not None, modeling.HC_KERNELS.cpu_decode.unavailable
        print("ok")
    """)


def test_cpu_decoding_kernels_refuse_what_they_cannot_take():
    """Everything the C++ calls cannot honour goes to the other paths: parameters that are not contiguous fp32 (a
    model built with `from_config(dtype=torch.bfloat16)` has bf16 ones), and any tracer or transform, which would not
    see a call into C."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import vmap
    import torch.autograd.forward_ad as forward_ad

    kernels = HC_KERNELS.cpu_decode
    streams = torch.randn(1, 4, 32)
    fn, base, scale = torch.randn(24, 128), torch.randn(24), torch.ones(3)
    assert kernels.accepts((streams,), (fn, base, scale))
    assert not kernels.accepts((streams,), (fn.bfloat16(), base, scale))
    assert not kernels.accepts((streams,), (fn.t().contiguous().t(), base, scale))
    assert not kernels.accepts((streams.double(),), (fn, base, scale))
    assert kernels.accepts((streams,), (torch.nn.Parameter(fn), base, scale))  # a model's own parameters
    seen = {}

    def probe(context):
        def function(x):
            seen.setdefault(context, set()).add(kernels.accepts((streams,), (fn, base, scale)))
            return x * 1
        return function

    with torch.no_grad():
        torch.jit.trace(probe("jit.trace"), (streams,), check_trace=False)  # (its check calls the function untraced)
        make_fx(probe("make_fx"))(streams)
        vmap(probe("vmap"))(streams)
        with forward_ad.dual_level():
            probe("forward AD")(forward_ad.make_dual(streams, torch.ones_like(streams)))
        with torch.device("cpu"):  # a torch-function mode
            probe("torch.device")(streams)
        probe("plain")(streams)
    assert seen == {"jit.trace": {False}, "make_fx": {False}, "vmap": {False}, "forward AD": {False},
                    "torch.device": {False}, "plain": {True}}, seen


def test_residual_dropout_acts_in_training_only_and_is_a_module_that_tools_can_switch_off():
    torch.manual_seed(0)
    model = MHCForCausalLM(tiny_config(hc_kernel="eager", residual_dropout=0.5))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    reference = model.eval()(ids).logits
    for module in model.modules():  # what TRL's disable_dropout_in_model does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert torch.equal(model.train()(ids).logits, reference)
