"""The tested version ranges of the libraries whose internals hf_ext touches, checked once at `import hf_ext`.

The ranges are the ones in hf_ext's own package metadata (`pyproject.toml`), so they are written down once. A version
outside its range still imports, with one warning line, so that a user can try it.
"""

from __future__ import annotations

import logging
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

logger = logging.getLogger("hf_ext")

CHECKED = ("transformers", "trl", "peft", "accelerate", "bitsandbytes")


def supported_ranges() -> dict[str, str]:
    """`{"transformers": ">=5.23,<5.25", ...}` from the installed hf_ext's metadata (empty when run from a bare source
    tree)."""
    try:
        requirements = metadata.requires("hf_ext") or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None and requirement.name in CHECKED:
            # lower bound first: ">=5.23,<5.25"
            ranges[requirement.name] = ",".join(sorted(map(str, requirement.specifier), key=lambda s: s[0] != ">"))
    return ranges


def unsupported_versions(installed: dict[str, str] | None = None) -> list[str]:
    """One message per installed library outside its tested range. `installed` maps names to versions (default: what
    this environment has)."""
    messages = []
    for name, specifier in supported_ranges().items():
        if installed is not None:
            version = installed.get(name)
        else:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = None
        if version is None:
            continue
        try:
            inside = Requirement(f"{name}{specifier}").specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            messages.append(
                f"hf_ext: {name} {version} is installed, but hf_ext is tested with {name}{specifier}; it may not work "
                f"(pip install '{name}{specifier}')"
            )
    return messages


def warn_about_unsupported_versions() -> None:
    for message in unsupported_versions():
        logger.warning(message)


def check_unsloth() -> None:
    """Unsloth only runs on CUDA GPUs: say so at once instead of failing deep inside its import."""
    import importlib.util

    import torch

    from hf_ext.errors import UserInputError

    if not torch.cuda.is_available():
        raise UserInputError("backend: unsloth needs a CUDA GPU and this machine has none; use backend: transformers")
    if importlib.util.find_spec("unsloth") is None:
        raise UserInputError("backend: unsloth is not installed; pip install 'hf_ext[unsloth]' or use backend: transformers")
