"""What every hf_ext stage config and trainer adds to its TRL parent."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class StageConfigMixin:
    """A recipe runs unchanged on a laptop and on a pod, so hardware-dependent settings follow the hardware:

    - precision: bf16 on a GPU that has it, fp32 on a CPU (TRL defaults to bf16 everywhere, which fails on a CPU);
    - several processes on a machine without CUDA: `use_cpu`, without which accelerate does not set up DDP over gloo
      and every process would train alone as rank 0.
    """

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_supported()
        if not self.use_cpu and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True
        super().__post_init__()


class StageTrainerMixin:
    """Checkpoints hold no pickle: the training arguments are saved as JSON instead of `training_args.bin`.

    (Weights are safetensors; optimizer, scheduler and RNG states are tensors that transformers reads back with
    `torch.load(weights_only=True)`, which cannot execute code.)

    Parameters matching the model's `_no_weight_decay_patterns` (e.g. mHC's mapping biases and gates) take no
    weight decay, on top of transformers' biases and norms.
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        patterns = [re.compile(p) for p in getattr(model, "_no_weight_decay_patterns", None) or []]
        return [name for name in names if not any(p.search(name) for p in patterns)]

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # transformers calls _save on every rank; only the saving one writes
            return
        output_dir = output_dir or self.args.output_dir
        pickled = Path(output_dir, "training_args.bin")
        if pickled.exists():
            os.remove(pickled)
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())
