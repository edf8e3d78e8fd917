"""hf_ext: research architectures and training stages that plug into transformers, TRL and PEFT.

`import hf_ext` registers hf_ext's architectures with transformers' Auto classes (`hf_ext.models`), after a one-line
warning for any installed transformers / TRL / PEFT / accelerate / bitsandbytes outside its tested range
(`hf_ext.dependencies`).

The one exception is a process started as the `hf-ext` command (or `python -m hf_ext.train`, what accelerate
launches): its entry point registers the architectures itself, after applying the recipe's `env` (transformers and
huggingface_hub read their environment when they are imported), and `hf-ext --help` prints without importing
torch at all (3-4 s).
"""

import sys
from pathlib import Path

__version__ = "0.1.0"


def _started_as_hf_ext_command() -> bool:
    if Path(sys.argv[0]).name == "hf-ext":  # the console script
        return True
    # `python [options] -m hf_ext.train ...`: while the package imports, argv[0] is still "-m"
    interpreter_argv = getattr(sys, "orig_argv", [])
    module = interpreter_argv[interpreter_argv.index("-m") + 1] if "-m" in interpreter_argv[:-1] else None
    return sys.argv[0] == "-m" and module in ("hf_ext.train", "hf_ext.cli")


from hf_ext.dependencies import warn_about_unsupported_versions  # noqa: E402

warn_about_unsupported_versions()

if not _started_as_hf_ext_command():
    from hf_ext import models  # noqa: F401  (registration side effect)
