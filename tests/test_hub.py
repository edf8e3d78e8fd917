"""Hub round trips: `hf-ext push` / `push_to_hub: true`, then `from_pretrained(repo)` with and without hf_ext.

No Hub is reachable from this machine, so the real `huggingface_hub` client talks over HTTP on 127.0.0.1 to a stand-in
for the Hub's API (`tests/hub_stand_in.py`: in-memory repositories, regular blobs only, no server-side rules). Every
push and pull runs in a fresh process, as a user's would, with `HF_ENDPOINT` pointing at the stand-in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from tests.conftest import REPO, TOKEN, cli_env, hub_env, push
from tests.hub_stand_in import HubStandIn

USER = HubStandIn.user


def pull_and_compare(hub, tmp_path, cases: list[dict], with_hf_ext: bool) -> None:
    """In a fresh process (hf_ext importable or not), load every case's repo with its Auto class and compare its
    outputs with the reference saved from the pushed folder; the tokenizer loads without trust_remote_code."""
    script = textwrap.dedent(
        """
        import json, sys
        if sys.argv[2] == "without":
            sys.modules["hf_ext"] = None  # any `import hf_ext` fails, as for a user who never installed it
        else:
            import hf_ext
        import torch, transformers
        from safetensors.torch import load_file
        for case in json.loads(sys.argv[1]):
            remote = {} if sys.argv[2] == "with" else {"trust_remote_code": True}
            if case["auto_class"] == "AutoPeftModelForCausalLM":
                from peft import AutoPeftModelForCausalLM as auto_class
            else:
                auto_class = getattr(transformers, case["auto_class"])
            model = auto_class.from_pretrained(case["repo"], **remote).eval()
            reference = load_file(case["reference"])
            expected = reference.pop("logits")
            with torch.no_grad():
                logits = model(**reference).logits
            assert torch.allclose(logits, expected, atol=1e-5), (case["repo"], (logits - expected).abs().max())
            if case["tokenizer"]:
                tokenizer = transformers.AutoTokenizer.from_pretrained(case["repo"], trust_remote_code=False)
                assert tokenizer("def f(x):")["input_ids"], case["repo"]
        print("ok")
        """
    )
    env = hub_env(hub, tmp_path)
    if not with_hf_ext:
        env["PYTHONPATH"] = ""
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases), "with" if with_hf_ext else "without"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]


def reference_outputs(folder, auto_class: str, inputs: dict, path) -> str:
    """The outputs of the pushed folder's model on `inputs`, saved (with the inputs) for the pulling process."""
    import transformers

    import hf_ext  # noqa: F401

    model = getattr(transformers, auto_class).from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({**inputs, "logits": logits.contiguous()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, cache_dir, pretrained, hub):
    """SFT + LoRA on the tiny mHC model, pushed by the recipe itself (`push_to_hub: true`); its base is the mHC
    model as pushed to the stand-in."""
    work = tmp_path_factory.mktemp("adapter")
    base = push(hub, work, pretrained, f"{USER}/tiny-mhc")
    assert base.returncode == 0, base.stderr[-3000:]
    output_dir = work / "sft"
    result = subprocess.run(
        ["hf-ext", "train", "recipes/sft.yaml", "--model_name_or_path", str(pretrained),
         "--base_model_id", f"{USER}/tiny-mhc", "--data_format", "instruction", "--output_dir", str(output_dir),
         "--max_steps", "2", "--task_train_size", "32", "--task_eval_size", "8", "--per_device_train_batch_size", "4",
         "--eval_batch_size", "8", "--save_steps", "2", "--load_in_4bit", "false",
         "--push_to_hub", "true", "--hub_model_id", f"{USER}/tiny-mhc-sft"],
        cwd=REPO, env=dict(hub_env(hub, work), HF_EXT_CACHE=str(cache_dir)), capture_output=True, text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def token_inputs(vocab_size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, vocab_size, (2, 9), generator=generator)}


def test_every_architecture_round_trips_with_and_without_hf_ext(hub, tmp_path, pretrained, causal_mamba, masked_lm,
                                                                 arc_champion, adapter_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_architecture_contract import grid_inputs

    cases = []
    for name, folder, auto_class in [("tiny-mamba", causal_mamba, "AutoModelForCausalLM"),
                                     ("tiny-mamba-mlm", masked_lm, "AutoModelForMaskedLM"),
                                     ("tiny-arc", arc_champion, "AutoModelForSemanticSegmentation")]:
        result = push(hub, tmp_path, folder, f"{USER}/{name}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().startswith(f"{hub.url}/{USER}/{name}/commit/")
        config = json.loads((folder / "config.json").read_text())
        inputs = grid_inputs(champion=True) if name == "tiny-arc" else token_inputs(config["vocab_size"])
        cases.append({"repo": f"{USER}/{name}", "auto_class": auto_class, "tokenizer": name != "tiny-arc",
                      "reference": reference_outputs(folder, auto_class, inputs, tmp_path / f"{name}.safetensors")})
    vocab = json.loads((pretrained / "config.json").read_text())["vocab_size"]
    cases.append({"repo": f"{USER}/tiny-mhc", "auto_class": "AutoModelForCausalLM", "tokenizer": True,
                  "reference": reference_outputs(pretrained, "AutoModelForCausalLM", token_inputs(vocab),
                                                 tmp_path / "mhc.safetensors")})
    adapter, _ = adapter_run
    base = AutoModelForCausalLM.from_pretrained(pretrained)
    model = PeftModel.from_pretrained(base, adapter).eval()
    inputs = token_inputs(vocab, seed=1)
    with torch.no_grad():
        save_file({**inputs, "logits": model(**inputs).logits.contiguous()}, str(tmp_path / "adapter.safetensors"))
    cases.append({"repo": f"{USER}/tiny-mhc-sft", "auto_class": "AutoPeftModelForCausalLM", "tokenizer": True,
                  "reference": str(tmp_path / "adapter.safetensors")})

    pull_and_compare(hub, tmp_path, cases, with_hf_ext=True)
    (tmp_path / "fresh").mkdir()  # new caches: the second process downloads everything again
    pull_and_compare(hub, tmp_path / "fresh", cases, with_hf_ext=False)


def test_the_pushed_card_is_complete_and_names_the_repo(hub, tmp_path, pretrained, adapter_run):
    adapter, _ = adapter_run
    files = hub.files(f"{USER}/tiny-mhc-sft")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml", "metrics.json",
            "loss_curve.png", "README.md"} <= set(files)
    assert not [p for p in files if p.startswith("checkpoint-") or p.endswith((".bin", ".pt", ".pth"))]
    card = ModelCard(files["README.md"].decode())
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == f"{USER}/tiny-mhc" and data["license"] == "apache-2.0"
    assert {"hf_ext", "sft", "trl", "mhc_lm"} <= set(data["tags"])
    assert data["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    assert f'"{USER}/tiny-mhc-sft"' in card.text and "in progress" not in card.text.lower()
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == f"{USER}/tiny-mhc"

    base = ModelCard(hub.files(f"{USER}/tiny-mhc")["README.md"].decode())
    assert base.data.library_name == "transformers" and base.data.pipeline_tag == "text-generation"
    assert {"hf_ext", "pretrain", "mhc_lm"} <= set(base.data.tags) and base.data.base_model is None
    assert f'from_pretrained("{USER}/tiny-mhc")' in base.text and "trust_remote_code=True" in base.text

    copy = tmp_path / "mhc"  # a copy: the shared run keeps its own card
    shutil.copytree(pretrained, copy)
    rendered = subprocess.run(["hf-ext", "card", str(copy), "--repo-id", f"{USER}/tiny-mhc"], cwd=tmp_path,
                              env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert (copy / "README.md").read_text() == base.content  # what `hf-ext card` renders is what is pushed


def test_push_to_hub_in_a_recipe_pushes_once_at_the_end_and_never_writes_the_token(hub, adapter_run):
    adapter, result = adapter_run
    commits = hub.repos[("model", f"{USER}/tiny-mhc-sft")].branches["main"]
    assert len(commits) == 2  # the repository's creation, then one push with everything
    saved = (adapter / "recipe.yaml").read_text()
    assert "push_to_hub: true" in saved and "hub_token" not in saved
    for text in (result.stdout, result.stderr, saved, (adapter / "metrics.json").read_text(),
                 *(data.decode(errors="replace") for data in hub.files(f"{USER}/tiny-mhc-sft").values())):
        assert TOKEN not in text
    assert all(header == f"Bearer {TOKEN}" for header in hub.authorizations)


def test_private_repo_on_a_branch_with_a_message(hub, tmp_path, causal_mamba):
    result = push(hub, tmp_path, causal_mamba, f"{USER}/private-mamba", "--private", "--revision", "v1",
                  "--commit-message", "first cut")
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos[("model", f"{USER}/private-mamba")]
    assert repo.private and repo.branches["v1"][-1].message == "first cut"
    assert "model.safetensors" in hub.files(f"{USER}/private-mamba", "v1")
    assert hub.files(f"{USER}/private-mamba", "main") == {}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no token", "no Hugging Face token"),
        ("bad repo id", "--repo-id 'not a/valid repo!'"),
        ("no model", "no model or adapter to push"),
    ],
)
def test_bad_push_is_one_line_before_any_upload(hub, tmp_path, pretrained, case, message):
    requests = len(hub.requests)
    folder, repo_id, token = pretrained, f"{USER}/never", TOKEN
    if case == "no token":
        token = None
    elif case == "bad repo id":
        repo_id = "not a/valid repo!"
    else:
        folder = tmp_path / "empty"
        folder.mkdir()
    result = push(hub, tmp_path, folder, repo_id, token=token)
    errors = [line for line in result.stderr.splitlines() if line.startswith("hf-ext: error: ")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(hub.requests) == requests


def test_a_push_that_fails_leaves_nothing_half_written(hub, tmp_path, causal_mamba):
    hub.fail_next_commit = True
    result = push(hub, tmp_path, causal_mamba, f"{USER}/failing")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert hub.files(f"{USER}/failing") == {}  # the repository exists, without a single file of the run
    again = push(hub, tmp_path, causal_mamba, f"{USER}/failing")
    assert again.returncode == 0 and "model.safetensors" in hub.files(f"{USER}/failing")


def test_a_new_push_replaces_what_an_earlier_one_left(hub, tmp_path, causal_mamba, adapter_run):
    adapter, _ = adapter_run
    assert push(hub, tmp_path, causal_mamba, f"{USER}/reused").returncode == 0
    result = push(hub, tmp_path, adapter, f"{USER}/reused")
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.files(f"{USER}/reused")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files and "modeling_mamba_ssm.py" not in files
    public = push(hub, tmp_path, adapter, f"{USER}/reused", "--private")
    assert public.returncode == 2 and "already exists and is public" in public.stderr


def test_secrets_stay_out_of_saved_recipes_and_printed_commands(tmp_path):
    from hf_ext.cli import redacted
    from hf_ext.recipe import parse_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text((REPO / "recipes/sft.yaml").read_text() + "\nenv:\n  WANDB_API_KEY: abc\n  HF_TOKEN: hf_x\n"
                           "  TOKENIZERS_PARALLELISM: 'false'\n")
    recipe = parse_recipe(recipe_file, ["--hub_token", "hf_secret", "--output_dir", str(tmp_path / "out")])
    saved = recipe.to_yaml(saved_as=tmp_path / "out" / "recipe.yaml")
    assert "hf_secret" not in saved and "hf_x" not in saved and "abc" not in saved and "TOKENIZERS_PARALLELISM" in saved
    shown = redacted(["-m", "hf_ext.train", "r.yaml", "--hub_token", "hf_secret", "--hub_token=hf_secret", "--seed", "1"])
    assert "hf_secret" not in " ".join(shown) and shown[-2:] == ["--seed", "1"]


def test_saved_configs_hold_no_machine_local_settings(pretrained, causal_mamba, masked_lm, adapter_run):
    adapter, _ = adapter_run
    names = ("config.json", "tokenizer_config.json", "adapter_config.json", "generation_config.json",
             "special_tokens_map.json", "preprocessor_config.json")
    for folder in (pretrained, causal_mamba, masked_lm, adapter):
        for path in (folder / name for name in names):
            if path.is_file():
                text = path.read_text()
                assert "local_files_only" not in text and str(REPO) not in text and "/tmp/" not in text, path
