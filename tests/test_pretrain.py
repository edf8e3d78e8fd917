"""The pretrain stage: recipes/pretrain_mhc.yaml and pretrain_llama.yaml at a tiny size, end to end.

One real run (`hf-ext train` on the mHC recipe, tokenizer trained on the real corpus) is shared by the tests that
read its artifacts; tests/test_matrix.py runs every fine-tuning recipe on the checkpoint it wrote.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.conftest import REPO, TINY_LLAMA, TINY_MHC, run_cli, run_train, tiny_overrides


def test_run_writes_a_loadable_mhc_model_with_validation_perplexity(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_ext  # noqa: F401  (registers mhc_lm; without it both loads need trust_remote_code=True)

    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["tokens_seen"] == 4 * 4 * 64
    assert metrics["loss_curve"]["eval_step"] == [2, 4]  # the final model is evaluated once, at step 4
    validation = metrics["validation"]
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]))
    assert validation["loss"] < math.log(512) + 0.1  # about uniform over the vocabulary after 4 tiny steps
    assert 0 < validation["hc_min_stream_spread"] and validation["hc_max_column_error"] < 5e-3
    assert validation["hc_amax_gain_forward"] == pytest.approx(1.0, abs=1e-2)
    per_layer = metrics["hyper_connections"]
    assert len(per_layer["stream_spread"]) == 2 and len(per_layer["column_error"]) == 4  # layers, sub-layers
    assert metrics["model_summary"]["model_type"] == "mhc_lm" and metrics["model_summary"]["parameters"] > 0
    assert (pretrained / "loss_curve.png").stat().st_size > 0
    card = (pretrained / "README.md").read_text()
    assert "mHC language model" in card and f"{validation['perplexity']:.2f}" in card and "mhc_lm" in card
    assert {"configuration_mhc.py", "modeling_mhc.py", "model.safetensors", "tokenizer.json"} <= {p.name for p in pretrained.iterdir()}
    assert not list(pretrained.rglob("*.bin"))
    assert json.loads((pretrained / "config.json").read_text())["use_cache"] is True

    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    model = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    assert type(model).__name__ == "MHCForCausalLM" and len(tokenizer) == model.config.vocab_size == 512
    prompt = tokenizer("def read(path):\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8


def test_resume_continues_the_same_run(pretrained, cache_dir, tmp_path):
    run = shutil.copytree(pretrained, tmp_path / "mhc")  # the session's run stays as other modules expect it
    result = run_train("recipes/pretrain_mhc.yaml", *tiny_overrides(run), "--max_steps", "6",
                       "--resume_from_checkpoint", "true", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_checkpoint"] and metrics["global_step"] == 6
    assert metrics["loss_curve"]["step"] == [1, 2, 3, 4, 5, 6]  # steps 1-4 logged before, restored from the checkpoint


def test_checkpoint_cards_come_from_the_same_templates_as_the_final_card(pretrained, tmp_path):
    """TRL writes its own card at every checkpoint; hf_ext's trainers write the run's card there instead."""
    from types import MethodType, SimpleNamespace

    from transformers import AutoModelForCausalLM

    import hf_ext  # noqa: F401
    from hf_ext.recipe import parse_recipe
    from hf_ext.trainers import get_stage
    from hf_ext.trainers.base import StageTrainerMixin

    recipe, stage = parse_recipe(pretrained / "recipe.yaml"), get_stage("pretrain")
    trainer = SimpleNamespace(  # the attributes of a trainer that create_model_card reads, at step 2
        render_card=lambda progress, model: stage.render_card(recipe, progress, model),
        is_world_process_zero=lambda: True,
        state=SimpleNamespace(global_step=2, log_history=[{"step": 1, "loss": 6.2}]),
        accelerator=SimpleNamespace(unwrap_model=lambda model: model),
        model=AutoModelForCausalLM.from_pretrained(pretrained),
        args=SimpleNamespace(output_dir=str(tmp_path)),
    )
    trainer.progress_card = MethodType(StageTrainerMixin.progress_card, trainer)
    StageTrainerMixin.create_model_card(trainer)
    checkpoint_card, final_card = (tmp_path / "README.md").read_text(), (pretrained / "README.md").read_text()
    checkpoints = sorted(pretrained.glob("checkpoint-*"))
    assert checkpoints and all(  # the run's own checkpoints hold the run's card too, not PEFT's or TRL's
        f"Checkpoint of a run in progress (step {c.name.split('-')[1]})" in (c / "README.md").read_text() for c in checkpoints
    )

    def headings(card: str) -> list[str]:
        prose = card.split("```")[::2]  # outside the code blocks (their comments start with "#" too)
        return [line for part in prose for line in part.splitlines() if line.startswith("#")]

    assert "Checkpoint of a run in progress (step 2)" in checkpoint_card and "in progress" not in final_card
    assert headings(checkpoint_card) == headings(final_card) == [
        "# mhc", "## Architecture", "## Training", "## Evaluation", "## Use"]
    assert "mHC language model" in checkpoint_card and "import hf_ext" in checkpoint_card


def test_a_run_too_short_to_log_a_step_still_plots_its_loss(tmp_path, cache_dir):
    output_dir = tmp_path / "short"
    result = run_train("recipes/pretrain_mhc.yaml", *tiny_overrides(output_dir), "--max_steps", "2",
                       "--logging_steps", "10", "--eval_steps", "10", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["loss_curve"]["step"] == [] and metrics["loss_curve"]["eval_step"] == [2]  # the final evaluation
    assert (output_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "loss_curve.png" in (output_dir / "README.md").read_text()


def trainer_for(recipe: str, tmp_path, cache_dir, monkeypatch, config=TINY_MHC):
    from hf_ext.recipe import parse_recipe
    from hf_ext.trainers import pretrain

    stage = pretrain.PretrainStage()

    monkeypatch.setenv("HF_EXT_CACHE", str(cache_dir))
    parsed = parse_recipe(str(REPO / recipe), tiny_overrides(tmp_path, config))
    tokenizer = stage.load_tokenizer(parsed)
    datasets = stage.build_datasets(parsed.script_args, parsed.training_args, tokenizer)
    model = stage.load_model(parsed, tokenizer)
    trainer = pretrain.HfExtPretrainTrainer(model=model, args=parsed.training_args, train_dataset=datasets["train"],
                               eval_dataset=datasets["test"], processing_class=tokenizer)
    return trainer, datasets, tokenizer


def test_documents_are_packed_into_full_blocks_with_eos_between_them(tmp_path, cache_dir, monkeypatch):
    trainer, datasets, tokenizer = trainer_for("recipes/pretrain_mhc.yaml", tmp_path, cache_dir, monkeypatch)
    blocks = trainer.train_dataset["input_ids"]
    assert all(len(block) == 64 for block in blocks[:-1]) and 0 < len(blocks[-1]) <= 64
    stream = [token for block in blocks for token in block]
    assert stream.count(tokenizer.eos_token_id) == len(datasets["train"])  # one EOS closes every document
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert torch.equal(batch["labels"], batch["input_ids"])  # the loss covers every token


def test_llama_baseline_has_the_same_shape_without_hyper_connections(tmp_path, cache_dir, monkeypatch):
    llama, _, _ = trainer_for("recipes/pretrain_llama.yaml", tmp_path / "llama", cache_dir, monkeypatch, TINY_LLAMA)
    mhc, _, _ = trainer_for("recipes/pretrain_mhc.yaml", tmp_path / "mhc", cache_dir, monkeypatch)
    assert type(llama.model).__name__ == "LlamaForCausalLM"
    llama_shapes = {name: p.shape for name, p in llama.model.named_parameters()}
    mhc_shapes = {name: p.shape for name, p in mhc.model.named_parameters() if "_hc." not in name and "hc_head" not in name}
    assert llama_shapes == mhc_shapes


def test_mapping_biases_and_gates_take_no_weight_decay(tmp_path, cache_dir, monkeypatch):
    trainer, _, _ = trainer_for("recipes/pretrain_mhc.yaml", tmp_path, cache_dir, monkeypatch)
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    assert "model.layers.0.attn_hc.fn" in decayed and "model.layers.0.mlp.up_proj.weight" in decayed
    assert not {"model.layers.0.attn_hc.base", "model.layers.0.ffn_hc.scale", "model.hc_head.hc_base",
                "model.hc_head.hc_scale"} & decayed


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--corpus", "lorem"], "python_docs"),
        (["--config_overrides", json.dumps({**TINY_MHC, "hc_mult": 0})], "hc_mult must be >= 1"),
        (["--config_overrides", json.dumps({**TINY_MHC, "hc_mlt": 2})], "did you mean 'hc_mult'"),
        (["--model_name_or_path", "recipes"], "either model_type"),
        (["--dataset_name", "org/data"], "not dataset_name and corpus"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, overrides, message):
    result = run_cli("hf-ext", "train", "recipes/pretrain_mhc.yaml", "--output_dir", str(tmp_path / "out"), *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_command_writes_an_autotokenizer_folder(tmp_path):
    from transformers import AutoTokenizer

    result = run_cli("hf-ext", "data", "train-tokenizer", "--vocab_size", "400", "--output", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Return the absolute value of a number.\n    The argument may be an integer."
    assert tokenizer.is_fast and len(tokenizer) == 400 and tokenizer.decode(tokenizer(text)["input_ids"]) == text
