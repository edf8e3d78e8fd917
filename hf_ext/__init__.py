"""hf_ext: research architectures and training stages that plug into transformers, TRL and PEFT.

`import hf_ext` registers hf_ext's architectures with transformers' Auto classes (`hf_ext.models`).
"""

__version__ = "0.1.0"

from hf_ext import models  # noqa: E402,F401  (registration side effect)
