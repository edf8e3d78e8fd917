"""Files shipped with hf_ext: model card templates and recipes.

In a wheel they live inside the package (`hf_ext/model_cards`, `hf_ext/recipes`); in a source checkout they are the
top-level `model_cards/` and `recipes/` folders.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_path(*parts: str) -> Path:
    """Path of a shipped file or folder, e.g. `shipped_path("recipes", "accelerate", "ddp.yaml")`."""
    for root in (_PACKAGE_DIR, _PACKAGE_DIR.parent):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{'/'.join(parts)} is not shipped with hf_ext (looked in {_PACKAGE_DIR})")
