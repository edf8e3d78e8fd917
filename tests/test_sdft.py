"""The sdft stage: the paper's defaults, the fixes of TRL 1.16's pitfalls (specs/sdft.md S1-S6) and the spec's
invariants, on tiny in-memory models (Llama, mhc_lm) with the real SmolLM2 tokenizer, and the shipped recipe on the real
SmolLM2-135M-Instruct with QLoRA. The recipe on every causal architecture: tests/test_matrix.py."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model_state_dict
from trl.experimental.sdft.loss_utils import (
    apply_importance_sampling_clipping,
    compute_divergence,
    compute_full_logit_self_distillation_loss,
    compute_topk_self_distillation_loss,
)

import hf_ext  # noqa: F401  (registers mhc_lm and mamba_ssm)
from hf_ext.errors import UserInputError
from hf_ext.trainers.sdft import (
    PAPER_TEACHER_TEMPLATE,
    TEACHER_ADAPTER,
    HfExtSDFTConfig,
    HfExtSDFTTrainer,
    TeacherContextBuilder,
    validated_rows,
)
from tests.conftest import REPO, run_cli

TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mhc_lm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, hc_mult=2),
}
LORA_TARGETS = {"llama": ["q_proj", "v_proj"]}
ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "privileged_context": str(a + b)}
    for a, b in [(12, 30), (7, 8), (40, 2), (11, 11)]
]


def tiny_model(model_type: str, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **TINY[model_type])
    return AutoModelForCausalLM.from_config(config)


def sdft_args(tmp_path, **overrides) -> HfExtSDFTConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_completion_length=6, generation_kwargs={"min_new_tokens": 6}, max_steps=2, learning_rate=1e-2,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], activation_checkpointing=False, seed=0,
    )
    return HfExtSDFTConfig(**{**settings, **overrides})


def trainer_for(model, tokenizer, args, peft: list[str] | None = None, rows=ROWS) -> HfExtSDFTTrainer:
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=peft, lora_dropout=0.0) if peft else None
    return HfExtSDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                            peft_config=peft_config)


def test_defaults_are_the_papers_and_the_recipe_parses(tmp_path):
    from hf_ext.recipe import parse_recipe

    args = HfExtSDFTConfig(output_dir=str(tmp_path))
    paper = dict(teacher_model_kind="ema", teacher_update_rate=0.01, teacher_sync_steps=1, teacher_adapter_init="student",
                 distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=2.0,
                 num_loss_tokens_to_skip=3, num_generations=1, teacher_prompt_template=PAPER_TEACHER_TEMPLATE,
                 max_prompt_length=2048, max_teacher_prompt_length=8192, max_completion_length=2048, temperature=1.0,
                 learning_rate=1e-5, warmup_steps=10, per_device_train_batch_size=1, gradient_accumulation_steps=32,
                 num_train_epochs=2.0, weight_decay=0.0, max_grad_norm=1.0)
    assert {key: getattr(args, key) for key in paper} == paper
    assert args.lr_scheduler_type == "cosine"  # a SchedulerType, a str enum
    assert HfExtSDFTConfig(output_dir=str(tmp_path), preset="paper_v1_reverse").distillation_alpha == 1.0
    recipe = parse_recipe(REPO / "recipes" / "sdft.yaml")
    assert isinstance(recipe.training_args, HfExtSDFTConfig)
    assert (recipe.training_args.teacher_model_kind, recipe.training_args.distillation_alpha) == ("ema", 0.0)
    with pytest.raises(UserInputError, match=r"teacher_prompt_template: must contain \{privileged_context\}"):
        HfExtSDFTConfig(output_dir=str(tmp_path), teacher_prompt_template="{prompt} only")


def test_divergence_conventions_topk_and_importance_clipping():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward = (t.exp() * (t - s)).sum(-1)  # KL(teacher || student)
    reverse = (s.exp() * (s - t)).sum(-1)
    torch.testing.assert_close(compute_divergence(s, t, 0.0), forward, atol=1e-6, rtol=0)
    torch.testing.assert_close(compute_divergence(s, t, 1.0), reverse, atol=1e-6, rtol=0)
    alpha = 0.3
    mixture = ((1 - alpha) * s.exp() + alpha * t.exp()).log()
    jsd = alpha * (t.exp() * (t - mixture)).sum(-1) + (1 - alpha) * (s.exp() * (s - mixture)).sum(-1)
    torch.testing.assert_close(compute_divergence(s, t, alpha), jsd, atol=1e-6, rtol=0)
    for alpha in (0.0, 0.5, 1.0):  # top-k over the whole vocabulary, no tail, is the full-vocabulary loss
        full = compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=alpha)
        topk = compute_topk_self_distillation_loss(student, teacher, distillation_topk=11, distillation_alpha=alpha,
                                                   distillation_add_tail=False)
        torch.testing.assert_close(topk, full, atol=1e-6, rtol=0)
    logps = torch.zeros(2, 4)
    clipped = apply_importance_sampling_clipping(torch.ones(2, 4), logps + 5.0, logps, 2.0)
    assert torch.equal(clipped, torch.full((2, 4), 2.0))


@pytest.mark.parametrize("mode, alpha", [("full_logits", 0.0), ("topk_logits", 0.5), ("sampled_token", 1.0)])
def test_identical_contexts_give_zero_loss_and_zero_gradient(tokenizer, tmp_path, mode, alpha):
    """Teacher = the student itself and a template that adds nothing: the loss and its gradient are exactly zero."""
    args = sdft_args(tmp_path, teacher_model_kind="live", teacher_prompt_template="{prompt}{privileged_context}",
                     distillation_mode=mode, distillation_alpha=alpha, num_loss_tokens_to_skip=0)
    trainer = trainer_for(tiny_model("llama", tokenizer), tokenizer, args)
    rows = [{**row, "privileged_context": ""} for row in ROWS[:2]]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = trainer._prepare_training_batch(rows)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() <= 1e-7 for p in trainer.model.parameters())


def test_first_completion_tokens_are_left_out_of_the_loss(tokenizer, tmp_path):
    args = sdft_args(tmp_path, teacher_model_kind="base", num_loss_tokens_to_skip=3)
    trainer = trainer_for(tiny_model("llama", tokenizer), tokenizer, args, peft=LORA_TARGETS["llama"])
    trainer.model.train()
    inputs = trainer._prepare_training_batch(ROWS[:2])
    logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, inputs)
    assert logits.loss_mask[:, :3].sum() == 0 and logits.loss_mask[:, 3:].sum() > 0
    loss = trainer._compute_self_distillation_loss(trainer.model, inputs, logits)
    logits.teacher_logits[:, :3] += 10 * torch.randn_like(logits.teacher_logits[:, :3])
    assert trainer._compute_self_distillation_loss(trainer.model, inputs, logits).item() == pytest.approx(loss.item(), abs=1e-7)


def test_completions_within_the_skipped_tokens_are_reported(tokenizer, tmp_path, caplog):
    """Completions of at most `num_loss_tokens_to_skip` tokens carry no loss: their share of each optimizer step's
    completions is logged, and a step of only such completions (zero loss, zero gradient) is warned about once."""
    import logging

    args = sdft_args(tmp_path, max_completion_length=3, generation_kwargs={"min_new_tokens": 3}, logging_steps=1)
    trainer = trainer_for(tiny_model("llama", tokenizer), tokenizer, args, peft=LORA_TARGETS["llama"])
    with caplog.at_level(logging.WARNING, logger="hf_ext"):
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "completions/unscored_ratio" in entry]
    assert [entry["completions/unscored_ratio"] for entry in logged] == [1.0, 1.0]  # 3 tokens, 3 skipped
    assert all(entry["loss"] == 0.0 for entry in logged)
    assert caplog.text.count("in optimizer step 1 every completion is at most num_loss_tokens_to_skip=3 tokens") == 1

    lengths = [2, 3, 4, 6]  # a mixed step: the first two have no scored token
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    batch = {"completion_ids": torch.where(mask.bool(), 5, tokenizer.pad_token_id), "completion_mask": mask,
             "raw_completion_lengths": torch.tensor(lengths)}
    trainer._record_completion_metrics("train", batch)
    assert trainer._metrics["train"]["completions/unscored_ratio"][-1] == 0.5


def test_teacher_prompts_keep_the_question_past_the_student_limit(tokenizer, tmp_path):
    """S4: TRL cuts teacher prompts to the student's `max_prompt_length` from the left, dropping the question."""
    args = sdft_args(tmp_path, max_prompt_length=32, max_teacher_prompt_length=512)
    trainer = trainer_for(tiny_model("llama", tokenizer), tokenizer, args)
    demonstration = " ".join(["seven"] * 100)  # > 32 tokens
    completion = torch.tensor([[tokenizer.eos_token_id]])
    built = TeacherContextBuilder(trainer).build(
        [[{"role": "user", "content": "What is the capital of Peru?"}]], [demonstration], completion, torch.ones_like(completion)
    )
    text = tokenizer.decode(built["teacher_input_ids"][0])
    assert "What is the capital of Peru?" in text and "This is an example for a response" in text and text.count("seven") == 100
    with pytest.raises(UserInputError, match=r"data \[train\] row 2: the teacher prompt is \d+ tokens, more than max_teacher"):
        validated_rows(Dataset.from_list([ROWS[0], {**ROWS[1], "privileged_context": demonstration * 6}]), args,
                       tokenizer, "data [train]")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "What is 2 + 2?", "privileged_context": ""}, "row 1: privileged_context .* is empty"),
    ({"prompt": [{"role": "assistant", "content": "4"}], "privileged_context": "4"}, "row 1: a conversation prompt must end with a user turn"),
    ({"prompt": "What is 2 + 2?"}, "no column privileged_context"),
])
def test_bad_rows_are_one_line_errors(tokenizer, tmp_path, row, message):
    with pytest.raises(UserInputError, match=message):
        validated_rows(Dataset.from_list([row]), sdft_args(tmp_path), tokenizer, "rows.jsonl [train]")


@pytest.mark.parametrize("init", ["student", "zero"])
def test_ema_teacher_adapter_starts_at_the_base_model_and_follows_the_update_rule(tokenizer, tmp_path, init):
    """S2: a fresh LoRA teacher is the base model (a copy of the fresh student adapter, whose B is zero; or all
    zeros, TRL's way); after each step teacher = (1-a) teacher + a student, on every adapter weight."""
    args = sdft_args(tmp_path, max_steps=1, teacher_update_rate=0.25, teacher_adapter_init=init)
    trainer = trainer_for(tiny_model("llama", tokenizer), tokenizer, args, peft=LORA_TARGETS["llama"])
    initial = {key: value.detach().clone() for key, value in get_peft_model_state_dict(trainer.model).items()}
    trainer.train()
    model = trainer.model
    student = get_peft_model_state_dict(model)
    teacher = get_peft_model_state_dict(model, adapter_name=TEACHER_ADAPTER)
    assert student.keys() == teacher.keys()
    for key in student:
        start = initial[key] if init == "student" else torch.zeros_like(initial[key])
        torch.testing.assert_close(teacher[key], 0.75 * start + 0.25 * student[key], atol=1e-6, rtol=0)
        if "lora_B" in key:
            assert initial[key].abs().sum() == 0  # so the teacher started as the base model either way


def test_a_continued_adapter_is_its_own_first_teacher(tokenizer, tmp_path):
    """S2: training on from a trained adapter (task B after task A), the EMA teacher starts as that adapter (the
    paper's teacher starts as the model being trained), not as the base model, which TRL's zero start would be."""
    from peft import get_peft_model

    model = get_peft_model(tiny_model("llama", tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: B is no longer zero
    trained = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
    trainer = trainer_for(model, tokenizer, sdft_args(tmp_path, max_steps=1))
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    for name, parameter in trainer.model.named_parameters():  # only the student adapter trains
        if "lora_" in name:
            assert parameter.requires_grad == (f".{TEACHER_ADAPTER}." not in name), name
    teacher = get_peft_model_state_dict(trainer.model, adapter_name=TEACHER_ADAPTER)
    for key, value in trained.items():
        torch.testing.assert_close(teacher[key], value, atol=0, rtol=0)
    batch = tokenizer(["What is 12 + 30?"], return_tensors="pt")
    with torch.no_grad():
        student_logits = trainer.model(**batch).logits
        trainer.model.set_adapter(TEACHER_ADAPTER)
        teacher_logits = trainer.model(**batch).logits
        trainer.model.set_adapter("default")
        with trainer.model.disable_adapter():
            base_logits = trainer.model(**batch).logits
    torch.testing.assert_close(teacher_logits, student_logits, atol=1e-6, rtol=0)
    assert (teacher_logits - base_logits).abs().max() > 1e-3


def test_a_resumed_run_keeps_its_teacher(tokenizer, tmp_path):
    """S6: transformers restores the student adapter only; the teacher comes back from the checkpoint, not from zero."""
    args = sdft_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, teacher_update_rate=0.25)
    trainer_for(tiny_model("llama", tokenizer), tokenizer, args, peft=LORA_TARGETS["llama"]).train()
    from safetensors.torch import load_file

    saved_teacher = load_file(tmp_path / "out" / "checkpoint-1" / TEACHER_ADAPTER / "adapter_model.safetensors")
    resumed = trainer_for(tiny_model("llama", tokenizer), tokenizer, args, peft=LORA_TARGETS["llama"])
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    student = get_peft_model_state_dict(resumed.model)
    teacher = get_peft_model_state_dict(resumed.model, adapter_name=TEACHER_ADAPTER)
    for key in student:
        expected = 0.75 * saved_teacher[key] + 0.25 * student[key]
        torch.testing.assert_close(teacher[key], expected, atol=1e-6, rtol=0)
        assert saved_teacher[key].abs().sum() > 0


def test_full_fine_tuning_of_an_in_memory_model_gets_an_ema_copy_as_teacher(tokenizer, tmp_path):
    """S1: TRL re-reads the teacher from the student's Hub id, which a model built in memory does not have."""
    model = tiny_model("mhc_lm", tokenizer)
    trainer = trainer_for(model, tokenizer, sdft_args(tmp_path, max_steps=1, teacher_update_rate=0.5))
    before = {name: p.detach().clone() for name, p in trainer.teacher_model.named_parameters()}
    trainer.train()
    for name, teacher in trainer.teacher_model.named_parameters():
        expected = 0.5 * before[name] + 0.5 * dict(trainer.model.named_parameters())[name].detach()
        torch.testing.assert_close(teacher.detach(), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_recipe_trains_smollm2_with_qlora_and_writes_every_artifact(tmp_path):
    out = tmp_path / "sdft"
    result = run_cli("hf-ext", "train", "recipes/sdft.yaml", "--max_steps", "2", "--task_train_size", "16",
                     "--task_eval_size", "8", "--per_device_train_batch_size", "4", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "sdft" and metrics["global_step"] == 2
    assert {"accuracy_before", "accuracy_after"} <= metrics.keys()
    assert (out / "adapter_model.safetensors").is_file() and (out / TEACHER_ADAPTER / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").is_file() and "- sdft" in (out / "README.md").read_text()


@pytest.mark.slow
def test_continual_recipes_chain_sft_then_sdft_with_the_task_a_adapter_as_first_teacher(tmp_path):
    """recipes/continual: task A by SFT, then task B by SDFT from that adapter (the continual-learning experiment's
    chain, through the CLI). The saved teacher is one EMA step from the task-A adapter: 0.99 A + 0.01 student."""
    from safetensors.torch import load_file

    small = ["--max_steps", "1", "--task_eval_size", "4", "--per_device_train_batch_size", "2", "--save_strategy", "no"]
    task_a, task_b = tmp_path / "task_a", tmp_path / "task_b"
    result = run_cli("hf-ext", "train", "recipes/continual/task_a_sft.yaml", *small, "--task_train_size", "8",
                     "--output_dir", str(task_a))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("hf-ext", "train", "recipes/continual/task_b_sdft.yaml", *small, "--task_train_size", "2",
                     "--warmup_steps", "0", "--model_name_or_path", str(task_a), "--output_dir", str(task_b))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((task_b / "metrics.json").read_text())
    assert (metrics["stage"], metrics["global_step"], metrics["task"]) == ("sdft", 1, "sorting")
    # TRL's SFT keeps QLoRA adapters in bf16 (the QLoRA paper's choice); the SDFT stage trains them in fp32.
    adapter_a = {key: value.float() for key, value in load_file(task_a / "adapter_model.safetensors").items()}
    student = load_file(task_b / "adapter_model.safetensors")
    teacher = load_file(task_b / TEACHER_ADAPTER / "adapter_model.safetensors")
    assert adapter_a.keys() == student.keys() == teacher.keys()
    for key in adapter_a:
        torch.testing.assert_close(teacher[key], 0.99 * adapter_a[key] + 0.01 * student[key], atol=1e-6, rtol=1e-5)
    assert any((student[key] - adapter_a[key]).abs().max() > 0 for key in student)  # stage B trained the adapter


def test_bad_data_fails_before_any_model_loads_and_writes_nothing(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 2?", "privileged_context": "4"}) + "\n"
                    + json.dumps({"prompt": "What is 3 + 3?", "privileged_context": "  "}) + "\n")
    out = tmp_path / "out"
    result = run_cli("hf-ext", "train", "recipes/sdft.yaml", "--task", "null", "--dataset_name", str(data),
                     "--allow_unverified_data", "true", "--output_dir", str(out))
    assert result.returncode == 2 and not out.exists()
    assert f"{data} [train] row 2: privileged_context (the demonstration) is empty" in result.stderr
