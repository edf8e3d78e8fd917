"""The amino-acid tokenizer, the offline antibody corpus and the antibody design evaluation (`hf-ext eval --task
antibody_design`) on a tiny randomly initialised bidirectional MambaSSMForMaskedLM."""

import json
import math
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from hf_ext.cli import main
from hf_ext.data import protein
from hf_ext.data.protein import (
    PROTEIN_ALPHABET,
    PROTEIN_MODEL_VOCAB_SIZE,
    STANDARD_AMINO_ACIDS,
    build_protein_tokenizer,
    load_antibody_corpus,
    v_gene_name,
    validate_sequences,
)
from hf_ext.errors import UserInputError
from hf_ext.eval.antibody_design import (
    Liability,
    _scored_positions,
    check_regression,
    design_metrics,
    evaluate_antibody_design,
    find_liabilities,
    load_scorer,
    liability_pass,
    parse_tolerance,
    pseudo_log_likelihood,
    sample_variants,
    write_baseline,
)
from hf_ext.models.mamba_ssm import MambaSSMConfig, MambaSSMForMaskedLM
from hf_ext.recipe import saved_recipe

# IGHV1-18*01 + IGHJ4*01
HEAVY = (
    "QVQLVQSGAEVKKPGASVKVSCKASGYTFTSYGISWVRQAPGQGLEWMGWISAYNGNTNYAQKLQGRVTMTTDTSTSTAYMELRSLRSDDTAVYYCAR"
    "YFDYWGQGTLVTVSS"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs several times faster on one thread (thread start-up costs more than its matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_protein_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return load_antibody_corpus()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = MambaSSMConfig(
        bidirectional=True, vocab_size=PROTEIN_MODEL_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_heads=4,
        head_dim=16, state_size=8, chunk_size=16, pad_token_id=0,
    )
    return MambaSSMForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tiny_model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("protein_mlm")
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- tokenizer and validation ---


def test_special_and_residue_ids(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id] == [0, 1, 2, 3, 4]
    assert tokenizer.convert_tokens_to_ids(list(PROTEIN_ALPHABET)) == list(range(5, 26))
    assert len(tokenizer) == 26 <= PROTEIN_MODEL_VOCAB_SIZE
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"] and tokenizer.padding_side == "right"


def test_encode_decode_round_trip(tokenizer):
    encoded = tokenizer(["ACDY", "MKX"], padding=True)
    assert encoded["input_ids"] == [[2, 5, 6, 7, 24, 3], [2, 15, 13, 25, 3, 0]]
    assert encoded["attention_mask"] == [[1] * 6, [1] * 5 + [0]]
    assert tokenizer.decode(tokenizer(HEAVY)["input_ids"], skip_special_tokens=True) == HEAVY
    assert tokenizer(HEAVY.lower())["input_ids"] == tokenizer(HEAVY)["input_ids"]  # lowercase is upper-cased
    assert tokenizer("AB*C")["input_ids"] == [2, 5, 4, 4, 6, 3]  # outside the alphabet: <unk>
    assert tokenizer("A<mask>C")["input_ids"] == [2, 5, 1, 6, 3]


def test_save_and_load_with_auto_tokenizer_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    batch = [HEAVY, "acdefghiklmnpqrstvwyx", "AB*Z"]
    assert loaded(batch, padding=True)["input_ids"] == tokenizer(batch, padding=True)["input_ids"]
    assert loaded.mask_token_id == 1 and loaded.pad_token_id == 0 and loaded.padding_side == "right"
    assert loaded.decode(loaded(HEAVY)["input_ids"], skip_special_tokens=True) == HEAVY


def test_unknown_character_error_names_source_index_position_and_character():
    with pytest.raises(UserInputError) as error:
        validate_sequences(["ACDE", "ACDEFGB"], source="antibodies.jsonl")
    assert str(error.value) == (
        "antibodies.jsonl: sequence 1 has 'B' at position 6, outside the amino-acid alphabet ACDEFGHIKLMNPQRSTVWYX "
        "(set on_unknown: unk to map it to <unk>)"
    )
    with pytest.raises(UserInputError, match="sequence 1 is empty"):
        validate_sequences(["ACD", ""], on_unknown="unk")
    with pytest.raises(UserInputError, match="on_unknown must be one of error, unk"):
        validate_sequences(["ACD"], on_unknown="drop")


def test_unk_mode_keeps_unknown_characters_for_the_tokenizer(tokenizer):
    assert validate_sequences(["acdB", "MK"], on_unknown="unk") == ["ACDB", "MK"]
    assert tokenizer("ACDB")["input_ids"][-2] == tokenizer.unk_token_id
    assert validate_sequences(["ßA"], on_unknown="unk") == ["ßA"]  # ASCII-only upper-casing keeps positions


# --- corpus ---


def test_antibody_corpus_counts_alphabet_and_columns(corpus):
    assert (len(corpus["train"]), len(corpus["validation"])) == (2146, 303)  # abnumber 0.4.4
    for split in corpus.values():
        assert split.column_names == ["sequence", "name", "chain"]
        assert set(split["chain"]) == {"H", "K", "L"}
        assert all(set(sequence) <= set(STANDARD_AMINO_ACIDS) for sequence in split["sequence"])
        assert all(100 <= len(sequence) <= 130 for sequence in split["sequence"])
    sequences = list(corpus["train"]["sequence"]) + list(corpus["validation"]["sequence"])
    assert len(set(sequences)) == len(sequences) == 2449
    first = corpus["train"][0]
    assert first["name"] == "IGHV1-18*01+IGHJ1*01" and first["sequence"].endswith("CARAEYFQHWGQGTLVTVSS")


def test_no_v_gene_or_v_sequence_in_both_splits(corpus):
    from abnumber.germlines import HUMAN_IMGT_IG_V

    v_sequences = {
        name: gapped.replace("-", "")
        for chain in "HKL"
        for name, gapped in HUMAN_IMGT_IG_V[chain]["aligned_sequences"].items()
    }
    alleles = {split: {name.split("+")[0] for name in corpus[split]["name"]} for split in corpus}
    genes = {split: {v_gene_name(allele) for allele in alleles[split]} for split in corpus}
    assert genes["train"] and genes["validation"] and not genes["train"] & genes["validation"]
    assert not {v_sequences[a] for a in alleles["train"]} & {v_sequences[a] for a in alleles["validation"]}
    assert v_gene_name("IGHV1-69D*01") == v_gene_name("IGHV1-69*12") == "IGHV1-69"
    assert v_gene_name("IGKV1D-12*02") == "IGKV1-12"


def test_corpus_is_deterministic_and_seeded(corpus):
    protein._germline_assemblies.cache_clear()  # rebuilt from scratch
    again = load_antibody_corpus()
    assert list(again["validation"]["name"]) == list(corpus["validation"]["name"])
    assert list(again["train"]["sequence"]) == list(corpus["train"]["sequence"])
    other = load_antibody_corpus(seed=1)
    assert set(other["validation"]["name"]) != set(corpus["validation"]["name"])
    for chain in "HKL":  # each chain type holds out about validation_fraction of its sequences
        validation = list(corpus["validation"]["chain"]).count(chain)
        train = list(corpus["train"]["chain"]).count(chain)
        assert 0.1 <= validation / (train + validation) < 0.2


def test_missing_abnumber_is_a_clear_error(monkeypatch):
    protein._germline_assemblies.cache_clear()
    monkeypatch.setitem(sys.modules, "abnumber.germlines", None)
    try:
        with pytest.raises(UserInputError, match="pip install abnumber"):
            load_antibody_corpus()
    finally:
        protein._germline_assemblies.cache_clear()


# --- liabilities ---


def test_find_liabilities_exact_positions():
    # index:   0123456789012345
    sequence = "QNGTDPNPSDGCNNST"
    assert find_liabilities(sequence) == [
        Liability("n_glycosylation", 1, "NGT"),
        Liability("deamidation_high", 1, "NG"),
        Liability("fragmentation", 4, "DP"),
        Liability("isomerization", 9, "DG"),
        Liability("n_glycosylation", 12, "NNS"),
        Liability("n_glycosylation", 13, "NST"),
        Liability("deamidation_medium", 13, "NS"),
        Liability("unpaired_cysteine", None, "C"),  # one cysteine; NPS at 6 is not a sequon
    ]
    assert find_liabilities("ACCA") == []


def test_liability_pass_compares_counts_per_kind_with_the_parent():
    parent = "AANGAAC"  # NG and an unpaired cysteine
    assert not liability_pass(parent)  # without a parent: any liability fails
    assert liability_pass(parent, baseline=parent)
    assert liability_pass("NGAAAAC", baseline=parent)  # NG moved: same count
    assert liability_pass("AAAAAAA", baseline=parent)  # liabilities removed
    assert not liability_pass("ANGNGAC", baseline=parent)  # a second NG
    assert not liability_pass("AANGDGC", baseline=parent)  # a new kind (DG)
    assert not liability_pass("AANGAAC", baseline="AANGACC")  # broke a cysteine pair


# --- sampling and scoring ---


def test_sampler_is_seeded_and_edits_at_most_num_edits_standard_residues(tiny_model, tokenizer, corpus):
    parents = list(corpus["validation"]["sequence"][:3])
    variants = sample_variants(tiny_model, tokenizer, parents, num_variants=4, num_edits=3, temperature=1.0, seed=7,
                               batch_size=5)
    assert variants == sample_variants(tiny_model, tokenizer, parents, 4, 3, 1.0, seed=7, batch_size=32)
    assert variants != sample_variants(tiny_model, tokenizer, parents, 4, 3, 1.0, seed=8, batch_size=32)
    assert [len(group) for group in variants] == [4, 4, 4]
    changed = 0
    for parent, group in zip(parents, variants):
        for variant in group:
            assert len(variant) == len(parent) and set(variant) <= set(STANDARD_AMINO_ACIDS)
            differences = sum(a != b for a, b in zip(parent, variant))
            assert differences <= 3
            changed += differences
    assert changed > 0
    tiny_model.train()
    try:
        sample_variants(tiny_model, tokenizer, parents[:1], 1, 1, seed=0)
        assert tiny_model.training  # sampled in eval mode, training mode restored
    finally:
        tiny_model.eval()


class MaskedPositionModel(torch.nn.Module):
    """A stand-in masked LM: at masked positions it favours W (sampling) or A and C equally (scoring); elsewhere
    it is uniform. Checks that residue positions map to the right token positions."""

    def __init__(self, mask_token_id: int, favoured: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.mask_token_id, self.favoured = mask_token_id, favoured

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, PROTEIN_MODEL_VOCAB_SIZE)
        masked = input_ids == self.mask_token_id
        for token_id in self.favoured:
            logits[..., token_id] += 30.0 * masked
        return SimpleNamespace(logits=logits)


def test_sampler_fills_exactly_the_masked_positions(tokenizer):
    model = MaskedPositionModel(tokenizer.mask_token_id, [tokenizer.convert_tokens_to_ids("W")])
    parent = "ACDEFGHIKLMNPQRSTVY"  # no W
    variants = sample_variants(model, tokenizer, [parent], num_variants=5, num_edits=4, temperature=0.0, seed=0)
    for variant in variants[0]:
        changed = [index for index, (a, b) in enumerate(zip(parent, variant)) if a != b]
        assert len(changed) == 4 and all(variant[index] == "W" for index in changed)


def test_pseudo_log_likelihood(tokenizer, tiny_model):
    model = MaskedPositionModel(tokenizer.mask_token_id, tokenizer.convert_tokens_to_ids(["A", "C"]))
    scores = pseudo_log_likelihood(model, tokenizer, ["ACCA", "ADDA", "CAACAC"], batch_size=3)
    assert scores[0] == pytest.approx(math.log(0.5), abs=1e-6) and scores[2] == pytest.approx(math.log(0.5), abs=1e-6)
    assert scores[1] == pytest.approx((2 * math.log(0.5) - 2 * (30 + math.log(2))) / 4, abs=1e-4)
    assert _scored_positions(10, 4) == [1, 3, 6, 8] and _scored_positions(3, 8) == [0, 1, 2]
    full = pseudo_log_likelihood(tiny_model, tokenizer, [HEAVY[:40], HEAVY[40:70]], batch_size=16)
    assert pseudo_log_likelihood(tiny_model, tokenizer, [HEAVY[:40], HEAVY[40:70]], batch_size=7,
                                 max_positions=100) == pytest.approx(full, abs=1e-5)
    assert all(-math.log(PROTEIN_MODEL_VOCAB_SIZE) - 1 < score < 0 for score in full)  # near uniform when untrained


# --- metrics ---


def test_design_metrics_match_hand_computed_values():
    parents = ["ACDE", "GGGG"]
    variants = [["ACDF", "ACDF", "ACDE", "WCDE", "ACDX"], ["GGG", "GNGG", "GNGG"]]
    calls = []

    def scorer(sequences):  # W is good, N is bad
        calls.append(list(sequences))
        return [sequence.count("W") - sequence.count("N") for sequence in sequences]

    metrics = design_metrics(parents, variants, scorer)
    assert calls == [["ACDE", "GGGG", "ACDF", "WCDE", "GNGG"]]  # each distinct valid sequence once
    assert metrics["num_parents"] == 2 and metrics["num_variants"] == 8
    assert metrics["valid_fraction"] == 6 / 8  # ACDX (X) and GGG (length) are invalid
    assert metrics["unique_fraction"] == (3 + 2) / 8  # {ACDF, WCDE, ACDX} and {GGG, GNGG}, parent copies excluded
    assert metrics["mean_edits"] == pytest.approx(5 / 6)
    # pairs of ACDF ACDF ACDE WCDE: 1, 3/4, 2/4, 3/4, 2/4, 3/4; of GNGG GNGG: 1
    assert metrics["mean_pairwise_identity"] == pytest.approx(5.25 / 7)
    # ACDE has one cysteine (unpaired) and so do its variants: pass; GNGG adds NG to GGGG: fail
    assert metrics["liability_pass_fraction"] == pytest.approx(4 / 6)
    assert metrics["introduced_liabilities"]["deamidation_high"] == 2
    assert sum(metrics["introduced_liabilities"].values()) == 2
    assert metrics["mean_reward_delta"] == pytest.approx((0 + 0 + 0 + 1 - 1 - 1) / 6)
    assert "mean_reward_delta" not in design_metrics(parents, variants)
    assert design_metrics(["ACDE"], [["ACDF"]])["mean_pairwise_identity"] is None


# --- regression check ---


def test_regression_check_flags_beyond_tolerance_and_passes_within(tmp_path):
    baseline = tmp_path / "baseline.json"
    written = write_baseline(
        {"valid_fraction": 1.0, "unique_fraction": 0.9, "mean_pairwise_identity": 0.95,
         "liability_pass_fraction": 0.8, "mean_reward_delta": None, "num_variants": 10},
        baseline,
    )
    assert json.loads(baseline.read_text()) == written
    assert written["metrics"]["mean_pairwise_identity"] == {"value": 0.95, "direction": "lower_is_better"}
    assert set(written["metrics"]) == {"valid_fraction", "unique_fraction", "mean_pairwise_identity",
                                       "liability_pass_fraction"}  # None and untracked metrics left out
    current = {"valid_fraction": 1.0, "unique_fraction": 0.87, "mean_pairwise_identity": 0.97,
               "liability_pass_fraction": 0.8}
    assert check_regression(current, baseline, tolerance=0.05) == []
    regressions = check_regression(current, baseline, tolerance=0.01)
    assert regressions == [
        "unique_fraction = 0.8700 is below baseline 0.9000 - tolerance 0.01 (higher is better)",
        "mean_pairwise_identity = 0.9700 is above baseline 0.9500 + tolerance 0.01 (lower is better)",
    ]
    per_metric = {"unique_fraction": 0.05, "mean_pairwise_identity": 0.05}
    assert check_regression(current, baseline, tolerance=per_metric) == []
    assert check_regression({**current, "liability_pass_fraction": None}, baseline, 0.05) == [
        "liability_pass_fraction: missing from this run (baseline 0.8000)"
    ]
    assert parse_tolerance("0.1") == 0.1 and parse_tolerance("valid_fraction=0,unique_fraction=0.2") == {
        "valid_fraction": 0.0, "unique_fraction": 0.2}
    with pytest.raises(UserInputError, match="tolerance for typo_metric"):
        check_regression(current, baseline, tolerance={"typo_metric": 0.1})
    with pytest.raises(UserInputError, match="typo_metric is not a checked metric"):
        parse_tolerance("typo_metric=0.1")
    baseline.write_text(json.dumps({"metrics": {"valid_fraction": {"value": 1.0, "direction": "up"}}}))
    with pytest.raises(UserInputError, match="direction must be higher_is_better or lower_is_better"):
        check_regression(current, baseline)


# --- CLI ---


def run_eval(*args):
    main(["eval", "--task", "antibody_design", "--num_parents", "3", "--num_variants", "3", "--num_edits", "2",
          "--max_positions", "8", *map(str, args)])


def test_cli_writes_a_baseline_then_passes_and_fails_a_doctored_one(model_dir, tmp_path, capsys):
    baseline, output = tmp_path / "baseline.json", tmp_path / "result.json"
    run_eval("--model", model_dir, "--write_baseline", baseline, "--output", output)
    printed = capsys.readouterr().out
    assert "| liability_pass_fraction |" in printed and f"baseline written to {baseline}" in printed
    result = json.loads(output.read_text())
    metrics = result["metrics"]
    assert metrics["num_parents"] == 3 and metrics["num_variants"] == 9 and metrics["valid_fraction"] == 1.0
    assert result["settings"]["num_edits"] == 2 and len(result["designs"]) == 3
    held_out = set(load_antibody_corpus()["validation"]["sequence"])
    assert all(design["parent"] in held_out for design in result["designs"])
    stored = json.loads(baseline.read_text())
    assert stored["metrics"]["mean_reward_delta"]["value"] == metrics["mean_reward_delta"]

    run_eval("--model", model_dir, "--baseline", baseline, "--tolerance", "0")  # same seed: identical metrics
    assert "no regression against baseline" in capsys.readouterr().out

    stored["metrics"]["mean_reward_delta"]["value"] = metrics["mean_reward_delta"] + 0.5
    baseline.write_text(json.dumps(stored))
    with pytest.raises(SystemExit) as exit_info:
        run_eval("--model", model_dir, "--baseline", baseline, "--tolerance", "0.1", "--output", output)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "REGRESSION" in error and "mean_reward_delta = " in error
    assert f"is below baseline {metrics['mean_reward_delta'] + 0.5:.4f} - tolerance 0.1" in error
    assert json.loads(output.read_text())["regressions"]


def tryptophan_count(sequences: list[str]) -> list[float]:
    """A custom scorer for the CLI test (``--scorer tests.test_protein:tryptophan_count``)."""
    return [float(sequence.count("W")) for sequence in sequences]


def test_cli_custom_scorer(model_dir, tmp_path):
    output = tmp_path / "result.json"
    run_eval("--model", model_dir, "--scorer", "tests.test_protein:tryptophan_count", "--output", output)
    result = json.loads(output.read_text())
    assert result["settings"]["scorer"] == "tests.test_protein:tryptophan_count"
    deltas = [variant.count("W") - design["parent"].count("W") for design in result["designs"]
              for variant in design["variants"]]
    assert result["metrics"]["mean_reward_delta"] == pytest.approx(sum(deltas) / len(deltas))
    with pytest.raises(UserInputError, match="has no callable 'missing'"):
        load_scorer("tests.test_protein:missing")


def test_parents_come_from_the_split_in_the_models_saved_recipe(model_dir, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(model_dir, trained)
    recipe = "stage: mlm\ncorpus: antibody_germlines\ncorpus_validation_fraction: 0.2\nseed: 7\n"
    (trained / "recipe.yaml").write_text(recipe)
    saved = saved_recipe(trained)  # what `hf-ext eval --task antibody_design` passes
    split = dict(validation_fraction=saved.setting("corpus_validation_fraction"), split_seed=saved.setting("seed"))
    result = evaluate_antibody_design(str(trained), num_parents=4, num_variants=2, scorer=tryptophan_count, **split)
    assert (result["settings"]["validation_fraction"], result["settings"]["split_seed"]) == (0.2, 7)
    assert result["settings"]["scorer"] == "tryptophan_count"
    held_out = set(load_antibody_corpus(validation_fraction=0.2, seed=7)["validation"]["sequence"])
    assert all(design["parent"] in held_out for design in result["designs"])
    explicit = evaluate_antibody_design(str(trained), num_parents=1, num_variants=1, scorer=tryptophan_count,
                                        validation_fraction=0.1, split_seed=42)
    assert explicit["designs"][0]["parent"] in set(load_antibody_corpus()["validation"]["sequence"])


def test_cli_bad_model_path_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_eval("--model", tmp_path / "missing")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"hf-ext: error: model {tmp_path / 'missing'}: path does not exist"
