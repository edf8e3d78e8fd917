import json
import math
import random
import subprocess
import sys

import pytest

from hf_ext.data.formats import FORMATS
from hf_ext.data.manifest import manifest_path, verify_manifest, write_manifest
from hf_ext.data.pairs import NEGATIVE_KINDS, hard_negative, make_pairs, on_policy_pairs, task_pairs, validate_pair
from hf_ext.data.tasks import TrainingPrompts
from hf_ext.data.tasks import TASKS
from hf_ext.errors import UserInputError
from hf_ext.recipe import parse_recipe
from tests.conftest import REPO, SMOLLM2, cli_env, run_cli


@pytest.mark.parametrize("name", list(TASKS))
def test_hard_negatives_are_rejected_by_the_verifier(name):
    task = TASKS[name]
    rows = task.splits(200, 0, seed=3)["train"]
    pairs = task_pairs(task, rows, seed=3)
    assert len(pairs) >= 0.9 * len(rows)
    assert set(pairs["negative_kind"]) <= set(NEGATIVE_KINDS)
    for pair, answer in zip(pairs, [r["answer"] for r in rows if r["prompt"] in set(pairs["prompt"])]):
        assert task.verify(pair["chosen"], answer) and not task.verify(pair["rejected"], answer)
        assert validate_pair(pair) is None


def test_near_miss_of_addition_changes_one_digit():
    rng = random.Random(0)
    for _ in range(200):
        answer = str(rng.randint(20, 198))
        miss = TASKS["addition"].near_miss(answer, rng)
        assert miss != answer and len(miss) == len(answer) and not miss.startswith("0")
        assert sum(a != b for a, b in zip(miss, answer)) == 1


def test_truncation_and_off_topic():
    task, rng = TASKS["sorting"], random.Random(1)
    assert hard_negative(task, "1 2 3 4 5", "1 2 3 4 5", [], "truncation", rng) == "1 2"
    assert hard_negative(task, "1 2 3 4 5", "1 2 3 4 5", ["1 2 3 4 5", "6 7 8 9 10"], "off_topic", rng) == "6 7 8 9 10"
    assert hard_negative(TASKS["addition"], "5", "5", [], "truncation", rng) is None


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a", "rejected": " a "}, "identical"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': expected a non-empty string, got an empty string"),
        ({"chosen": "a", "rejected": "b"}, "field 'prompt': expected a non-empty string, got nothing"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "field 'rejected'"),
    ],
)
def test_bad_pairs(row, message):
    assert message in validate_pair(row)


def test_on_policy_pairs_teach_against_the_models_own_mistakes():
    task = TASKS["addition"]
    prompts = ["What is 10 + 11?", "What is 20 + 22?", "What is 30 + 33?"]
    answers = references = ["21", "42", "63"]
    groups = [["21", "12", "20"], ["42"], ["40", "41"]]  # right and wrong; all right; all wrong
    pairs, sources = on_policy_pairs(task, prompts, answers, references, groups, seed=0)
    rows = [dict(zip(pairs, values)) for values in zip(*pairs.values())]
    assert [(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == prompts[0]] == [("21", "12"), ("21", "20")]
    all_right = [r for r in rows if r["prompt"] == prompts[1]]
    assert len(all_right) == 1 and all_right[0]["rejected_source"] == "hard_negative"
    assert not task.verify(all_right[0]["rejected"], "42")
    assert [(r["chosen"], r["chosen_source"]) for r in rows if r["prompt"] == prompts[2]] == [("63", "reference")] * 2
    assert all(task.verify(r["chosen"], a) and not task.verify(r["rejected"], a) and r["margin"] == 1.0
               for r in rows for p, a in zip(prompts, answers) if r["prompt"] == p)
    assert sources["chosen_from"] == {"sample": 3, "reference": 2}
    assert sources["rejected_from"] == {"sample": 4, "hard_negative": 1}
    assert sources["distinct_samples"] == 6 and sources["distinct_samples_right"] == 2


@pytest.mark.parametrize("method, k, most", [("on_policy", 4, 40), ("best_of_n", 4, 30), ("judge", 4, 10),
                                             ("hard_negatives", 4, 10)])
def test_too_few_prompts_for_the_requested_pairs_fail_before_any_model_loads(tmp_path, method, k, most):
    message = rf"10 prompts give at most {most} pairs with method {method} \(k={k}\), fewer than min_pairs 200"
    with pytest.raises(UserInputError, match=message):
        make_pairs("no/such/model", TrainingPrompts("addition", num_prompts=10), tmp_path / "p.jsonl", method, k=k,
                        min_pairs=200)
    assert not (tmp_path / "p.jsonl").exists()


def test_fewer_pairs_than_min_pairs_is_an_error_naming_the_stats(tmp_path):
    from datasets import Dataset

    from hf_ext.data.pairs import _write_pairs

    one = Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]})
    with pytest.raises(UserInputError, match=r'1 pairs, fewer than min_pairs 2 .* Stats: \{"method": "best_of_n"\}'):
        _write_pairs(one, tmp_path / "p.jsonl", {"method": "best_of_n"}, min_pairs=2, source_model=None)
    assert not (tmp_path / "p.jsonl").exists()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_manifest_gate(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserInputError, match=r"no QC manifest \(pairs.jsonl.manifest.json\).*hf-ext data manifest"):
        verify_manifest(data)
    manifest = write_manifest(data, generator="test", qc={"rows": 1}, source_model="m")
    assert verify_manifest(data) == manifest and manifest["rows"] == 1 and manifest["created_at"]
    assert set(manifest) >= {"sha256", "generator", "hf_ext_version", "git_commit", "source_model", "qc", "parameters"}
    with open(data, "a") as handle:
        handle.write(json.dumps({"prompt": "q", "chosen": "c", "rejected": "d"}) + "\n")
    with pytest.raises(UserInputError, match="changed since its manifest was written"):
        verify_manifest(data)
    manifest_path(data).write_text("{broken")
    with pytest.raises(UserInputError, match="not valid JSON"):
        verify_manifest(data)


def _dpo_recipe(tmp_path, dataset, extra=()):
    return parse_recipe(REPO / "recipes" / "dpo.yaml", ["--task", "", "--dataset_name", str(dataset), "--output_dir", str(tmp_path / "o"), *extra])


def test_dpo_refuses_a_file_without_manifest_unless_opted_out(tmp_path, tokenizer):
    from hf_ext.trainers.dpo import DPOStage

    build_datasets = DPOStage().build_datasets

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}])
    recipe = _dpo_recipe(tmp_path, data)
    with pytest.raises(UserInputError, match="no QC manifest"):
        build_datasets(recipe.script_args, recipe.training_args, tokenizer)
    recipe = _dpo_recipe(tmp_path, data, ["--allow_unverified_data", "true"])
    row = build_datasets(recipe.script_args, recipe.training_args, tokenizer)["train"][0]
    eos = tokenizer.eos_token
    assert tokenizer.decode(row["chosen_ids"]) == "4" + eos and tokenizer.decode(row["rejected_ids"]) == "5" + eos
    assert row["prompt_ids"] == FORMATS["messages"].prompt_ids("What is 2 + 2?", tokenizer)


def test_dpo_rejects_bad_pairs_with_row_numbers(tmp_path, tokenizer):
    from hf_ext.trainers.dpo import DPOStage

    build_datasets = DPOStage().build_datasets

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "same", "rejected": "same"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_manifest(data, generator="test", qc={})
    recipe = _dpo_recipe(tmp_path, data)
    with pytest.raises(UserInputError, match=r"pairs.jsonl \[train\]: row 2: fields 'chosen' and 'rejected' are identical"):
        build_datasets(recipe.script_args, recipe.training_args, tokenizer)


def test_dpo_refuses_a_pair_file_whose_pairs_are_all_ties(tmp_path, tokenizer):
    from hf_ext.trainers.dpo import DPOStage

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 0.0}] * 3
    data = write_jsonl(tmp_path / "ties.jsonl", rows)
    write_manifest(data, generator="test", qc={})
    recipe = _dpo_recipe(tmp_path, data)
    with pytest.raises(UserInputError, match=r"ties.jsonl \[train\]: every one of its 3 pairs is a tie \(margin 0"):
        DPOStage().build_datasets(recipe.script_args, recipe.training_args, tokenizer)


def test_task_seed_fixes_the_held_out_split_while_seed_varies():
    from hf_ext.data.sources import load_splits

    def held_out(*argv):
        recipe = parse_recipe(REPO / "recipes" / "dpo.yaml", list(argv))
        return load_splits(recipe.script_args, recipe.training_args.seed)["test"]["prompt"]

    assert held_out("--seed", "43", "--task_seed", "42") == held_out("--seed", "42") != held_out("--seed", "43")


def test_unsloth_backend_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="backend: unsloth needs a CUDA GPU and this machine has none"):
        parse_recipe(REPO / "recipes" / "dpo.yaml", ["--backend", "unsloth"])


@pytest.mark.slow
def test_dpo_recipe_trains_with_its_nll_term_and_reports_accuracy_before_and_after(tmp_path):
    out = tmp_path / "dpo"
    result = run_cli(
        "hf-ext", "train", "recipes/dpo.yaml", "--max_steps", "3", "--task_train_size", "24", "--task_eval_size", "8",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["stage"] == "dpo"
    # policy == reference at step 1 (fresh zero-initialised LoRA): the sigmoid term is exactly log 2 (the matrix test
    # checks it alone), and the recipe's NLL term on the chosen answers adds to it
    assert (out / "recipe.yaml").read_text().count("- sft") == 1
    assert metrics["loss_curve"]["loss"][0] > math.log(2) + 0.01
    card = (out / "README.md").read_text()
    assert "- dpo" in card and "trl.DPOTrainer" in card and (out / "adapter_model.safetensors").is_file()
    # as the SFT recipe does: exact match on the held-out prompts before and after, printed and in the card
    before, after = metrics["accuracy_before"], metrics["accuracy_after"]
    assert before["num_examples"] == after["num_examples"] == 8
    assert f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}" in result.stderr
    assert f"| base model | {100 * before['accuracy']:.1f}% |" in card
    assert f"| this model | {100 * after['accuracy']:.1f}% |" in card


@pytest.mark.parametrize("command", [["hf-ext", "train"], [sys.executable, "-m", "hf_ext.train"]])
def test_unsloth_is_imported_before_transformers_trl_and_peft(tmp_path, command):
    """Unsloth patches transformers, TRL and PEFT when it is imported and asks to be imported first. No GPU here: a
    stand-in `unsloth` records which of them were imported before it (then ends the run), and a sitecustomize makes
    torch report a CUDA device."""
    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text(
        "import json, os, sys\n"
        "json.dump([m for m in ('transformers', 'trl', 'peft') if m in sys.modules], open(os.environ['RECORD'], 'w'))\n"
        "raise SystemExit(0)\n"
    )
    (site / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    record = tmp_path / "imported_before_unsloth.json"
    env = dict(cli_env(), PYTHONPATH=str(site), RECORD=str(record))
    result = subprocess.run([*command, "recipes/dpo.yaml", "--backend", "unsloth"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(record.read_text()) == []


def test_unsloth_backend_loads_through_fast_language_model(monkeypatch):
    """No GPU here, so Unsloth is replaced by a stand-in that records what hf_ext asks of it."""
    import sys
    import types

    from hf_ext.loading import UNSLOTH_LORA_TARGETS, load_unsloth_model
    from hf_ext.recipe import ModelArguments

    calls = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs):
            calls["from_pretrained"] = kwargs
            return "model", "tokenizer"

        @staticmethod
        def get_peft_model(model, **kwargs):
            calls["get_peft_model"] = kwargs
            return f"peft({model})"

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    args = ModelArguments(model_name_or_path=SMOLLM2, load_in_4bit=True, use_peft=True, dtype="bfloat16")
    assert load_unsloth_model(args, max_seq_length=512) == "peft(model)"
    import torch

    loaded = calls["from_pretrained"]
    assert loaded["load_in_4bit"] and loaded["max_seq_length"] == 512 and loaded["dtype"] is torch.bfloat16
    assert "gguf/SmolLM2-135M-Instruct.Q4_1-" in loaded["model_name"], "the converted GGUF folder"
    lora = calls["get_peft_model"]
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (16, 32, 0.1)
    assert lora["target_modules"] == UNSLOTH_LORA_TARGETS


def test_hub_dataset_needs_an_explicit_opt_out(tmp_path, tokenizer):
    from hf_ext.trainers.dpo import DPOStage

    build_datasets = DPOStage().build_datasets

    recipe = parse_recipe(REPO / "recipes" / "dpo.yaml", ["--task", "", "--dataset_name", "someone/pairs", "--output_dir", str(tmp_path)])
    with pytest.raises(UserInputError, match="a Hub dataset has no QC manifest; set allow_unverified_data: true"):
        build_datasets(recipe.script_args, recipe.training_args, tokenizer)
