"""hf_ext: research architectures and training stages that plug into transformers, TRL and PEFT.

`import hf_ext` registers hf_ext's architectures with transformers' Auto classes (`hf_ext.models`), after a one-line
warning for any installed transformers / TRL / PEFT / accelerate / bitsandbytes outside its tested range
(`hf_ext.dependencies`).
"""

__version__ = "0.1.0"

from hf_ext.dependencies import warn_about_unsupported_versions  # noqa: E402

warn_about_unsupported_versions()

from hf_ext import models  # noqa: E402,F401  (registration side effect)
