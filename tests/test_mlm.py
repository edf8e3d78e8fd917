"""The mlm stage (recipes/mamba_mlm.yaml) and the causal Mamba recipe (recipes/pretrain_mamba.yaml), tiny, end to end.

One real MLM run on the real antibody corpus is shared by the tests that read its artifacts; one tiny causal Mamba
pretraining run is shared with tests/test_matrix.py, which runs every fine-tuning recipe on its checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.conftest import REPO, TINY_BIDIRECTIONAL, TINY_MLM_RUN, run_cli, run_train


def test_mlm_run_writes_a_loadable_masked_lm_with_held_out_perplexity(masked_lm):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import hf_ext  # noqa: F401
    from hf_ext.data.protein import load_antibody_corpus

    metrics = json.loads((masked_lm / "metrics.json").read_text())
    validation = metrics["validation"]
    assert metrics["global_step"] == 4 and metrics["stage"] == "mlm"
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]))
    assert validation["loss"] < math.log(32) + 0.2  # about uniform over the vocabulary after 4 tiny steps
    corpus = load_antibody_corpus(validation_fraction=0.1, seed=42)  # the recipe's split
    residues = sum(len(s) for s in corpus["validation"]["sequence"])
    assert validation["sequences"] == len(corpus["validation"]) and metrics["train_sequences"] == len(corpus["train"])
    assert 0.13 < validation["masked_tokens"] / residues < 0.17  # 15% of the residues
    assert (masked_lm / "loss_curve.png").stat().st_size > 0
    card = (masked_lm / "README.md").read_text()
    assert "masked language modelling" in card and "AutoModelForMaskedLM" in card and "conv1d_rev" in card
    assert f"{validation['perplexity']:.2f}" in card and "antibody_design" in card
    assert not list(masked_lm.rglob("*.bin"))

    model = AutoModelForMaskedLM.from_pretrained(masked_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(masked_lm)
    assert type(model).__name__ == "MambaSSMForMaskedLM" and model.config.bidirectional
    assert model.config.vocab_size == 32 and model.config.pad_token_id == tokenizer.pad_token_id == 0
    batch = tokenizer(["EVQLVESGGGLVQPGGSLRLSCAAS", "DIQMTQ"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 27, 32)


def test_mlm_resume_continues_the_same_run(masked_lm, cache_dir, tmp_path):
    run = shutil.copytree(masked_lm, tmp_path / "mamba")  # the session's run stays as other modules expect it
    result = run_train("recipes/mamba_mlm.yaml", "--output_dir", str(run), "--config_overrides",
                       json.dumps(TINY_BIDIRECTIONAL), *TINY_MLM_RUN, "--max_steps", "6",
                       "--resume_from_checkpoint", "true", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_checkpoint"] and metrics["global_step"] == 6


def mlm_parts(tmp_path, *overrides):
    from hf_ext.recipe import parse_recipe
    from hf_ext.trainers import mlm

    recipe = parse_recipe(str(REPO / "recipes/mamba_mlm.yaml"), ["--output_dir", str(tmp_path), "--config_overrides",
                                                                 json.dumps(TINY_BIDIRECTIONAL), *overrides])
    tokenizer = mlm.MLMStage().load_tokenizer(recipe)
    return recipe, tokenizer, mlm.MLMStage().build_datasets(recipe.script_args, recipe.training_args, tokenizer)


def test_validation_is_masked_once_and_training_anew_every_batch(tmp_path):
    from hf_ext.trainers.mlm import MaskedLMCollator

    recipe, tokenizer, datasets = mlm_parts(tmp_path)
    _, _, again = mlm_parts(tmp_path)
    assert datasets["test"]["labels"] == again["test"]["labels"]  # the same positions in every run and evaluation
    for ids, labels in zip(datasets["test"]["input_ids"][:50], datasets["test"]["labels"][:50]):
        assert labels[0] == -100 and labels[-1] == -100  # <cls> and <eos> are never masked
        masked = [i for i, label in enumerate(labels) if label != -100]
        assert masked and all(ids[i] == tokenizer.mask_token_id or labels[i] != -100 for i in masked)
    collator = MaskedLMCollator(tokenizer, 0.15)
    validation = [datasets["test"][i] for i in range(3)]
    padded = collator(validation)  # already masked: only padded (right, labels -100)
    for row, feature in enumerate(validation):
        n = len(feature["input_ids"])
        assert padded["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert padded["labels"][row, :n].tolist() == feature["labels"] and (padded["labels"][row, n:] == -100).all()
        assert padded["attention_mask"][row].sum() == n and (padded["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    rows = [{"input_ids": ids} for ids in datasets["train"]["input_ids"][:8]]
    first, second = collator(rows), collator(rows)
    assert not torch.equal(first["labels"], second["labels"])
    real = first["attention_mask"].bool()
    assert (first["labels"][~real] == -100).all()
    fraction = (first["labels"] != -100).sum() / real.sum()
    assert 0.05 < fraction < 0.3


def test_a_character_outside_the_alphabet_names_the_row_or_becomes_unk(tmp_path):
    data = tmp_path / "antibodies.jsonl"
    data.write_text("\n".join(json.dumps({"sequence": s}) for s in ["EVQLVESGG", "QVQBLVQSG", "DIQMTQSPS"]) + "\n")
    result = run_cli("hf-ext", "train", "recipes/mamba_mlm.yaml", "--corpus", "", "--dataset_name", str(data),
                     "--allow_unverified_data", "true", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sequence 1 has 'B' at position 3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    from hf_ext.recipe import parse_recipe
    from hf_ext.trainers import mlm

    recipe = parse_recipe(str(REPO / "recipes/mamba_mlm.yaml"), ["--corpus", "", "--dataset_name", str(data),
                                                                 "--allow_unverified_data", "true", "--on_unknown", "unk"])
    tokenizer = mlm.MLMStage().load_tokenizer(recipe)
    datasets = mlm.MLMStage().build_datasets(recipe.script_args, recipe.training_args, tokenizer)
    assert datasets["train"]["input_ids"][1][4] == tokenizer.unk_token_id


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--corpus", "python_docs"], "antibody_germlines"),
        (["--config_overrides", json.dumps({"chunk_size": 0})], "chunk_size must be >= 1"),
        (["--config_overrides", json.dumps({"state_sise": 8})], "did you mean 'state_size'"),
        (["--mlm_probability", "1.5"], "mlm_probability"),
        (["--max_length", "50"], "more than max_length 50"),
    ],
)
def test_bad_mlm_input_is_one_clear_line(tmp_path, overrides, message):
    result = run_cli("hf-ext", "train", "recipes/mamba_mlm.yaml", "--output_dir", str(tmp_path / "out"), *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_ssm_parameters_take_no_weight_decay(tmp_path):
    from hf_ext.trainers import mlm

    recipe, tokenizer, datasets = mlm_parts(tmp_path)
    trainer = mlm.HfExtMLMTrainer(model=mlm.MLMStage().load_model(recipe, tokenizer), args=recipe.training_args,
                          train_dataset=datasets["train"], eval_dataset=datasets["test"], processing_class=tokenizer)
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    assert "backbone.layers.0.mixer.in_proj.weight" in decayed and "backbone.layers.0.mixer.conv1d_rev.weight" in decayed
    for name in ("A_log", "D", "dt_bias", "A_log_rev", "D_rev", "dt_bias_rev"):
        assert f"backbone.layers.0.mixer.{name}" not in decayed


# ---------------------------------------------------------------- the causal model: pretrain recipe


def test_pretrain_recipe_writes_a_causal_mamba_that_generates(causal_mamba):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ext  # noqa: F401

    metrics = json.loads((causal_mamba / "metrics.json").read_text())
    assert metrics["model_summary"]["model_type"] == "mamba_ssm" and metrics["global_step"] == 4
    assert metrics["validation"]["perplexity"] == pytest.approx(math.exp(metrics["validation"]["loss"]))
    card = (causal_mamba / "README.md").read_text()
    assert "causal language modelling" in card and "AutoModelForCausalLM" in card and "conv1d_rev" not in card
    model = AutoModelForCausalLM.from_pretrained(causal_mamba).eval()
    tokenizer = AutoTokenizer.from_pretrained(causal_mamba)
    prompt = tokenizer("def read(path):\n", return_tensors="pt")
    with_cache = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    without = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape[1] == prompt["input_ids"].shape[1] + 8 and torch.equal(with_cache, without)
