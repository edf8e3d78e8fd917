"""Antibody design evaluation: edit held-out antibodies with a masked LM, then measure the edits.

The loop (``hf-ext eval --task antibody_design --model PATH``):

1. parents: a seeded choice of held-out validation sequences of ``load_antibody_corpus`` (V genes the model never
   saw in training);
2. ``sample_variants``: for each parent, ``num_variants`` variants, each with ``num_edits`` positions masked at once
   and refilled by sampling the masked LM's logits restricted to the 20 standard amino acids;
3. ``design_metrics``: validity, diversity, sequence liabilities and a score (reward) delta against the parent;
4. ``check_regression``: compare the metrics with a stored baseline and fail loudly when one got worse.

Sequence liabilities (``find_liabilities``), the motifs routinely flagged in antibody developability screens:

- ``n_glycosylation`` ``N[^P][ST]``: N-linked glycosylation sequon; a glycan in the variable domain is
  heterogeneous and can block binding.
- ``deamidation_high`` ``NG``: asparagine deamidation, fast (Asn followed by Gly).
- ``deamidation_medium`` ``NS``: asparagine deamidation, slower (Asn followed by Ser).
- ``isomerization`` ``DG``: aspartate isomerisation to iso-aspartate.
- ``fragmentation`` ``DP``: acid-labile Asp-Pro peptide bond (backbone cleavage).
- ``unpaired_cysteine``: an odd number of cysteines, so at least one cannot form a disulfide bond.

Methionine/tryptophan oxidation is left out: every antibody has several Met and Trp in its frameworks, and whether
one oxidises depends on its solvent exposure, which a sequence does not tell.

Motif positions are 0-based residue indices; overlapping matches all count (``NNGS`` has ``NG`` at 1 and the sequon
``NGS`` at 1).
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_ext.data.protein import STANDARD_AMINO_ACIDS, validate_sequences
from hf_ext.errors import UserInputError
from hf_ext.generation import eval_mode
from hf_ext.run_folder import write_text_atomic

Scorer = Callable[[list[str]], list[float]]
"""Scores sequences, higher is better (a fitness/reward model, a likelihood...): one float per input sequence."""

LIABILITY_MOTIFS = {
    "n_glycosylation": "N[^P][ST]",
    "deamidation_high": "NG",
    "deamidation_medium": "NS",
    "isomerization": "DG",
    "fragmentation": "DP",
}
UNPAIRED_CYSTEINE = "unpaired_cysteine"
LIABILITY_NAMES = (*LIABILITY_MOTIFS, UNPAIRED_CYSTEINE)
# Lookahead patterns find overlapping matches.
_LIABILITY_PATTERNS = {name: re.compile(f"(?=({motif}))") for name, motif in LIABILITY_MOTIFS.items()}

HIGHER_IS_BETTER = "higher_is_better"
LOWER_IS_BETTER = "lower_is_better"
METRIC_DIRECTIONS = {
    "valid_fraction": HIGHER_IS_BETTER,
    "unique_fraction": HIGHER_IS_BETTER,
    "mean_pairwise_identity": LOWER_IS_BETTER,
    "liability_pass_fraction": HIGHER_IS_BETTER,
    "mean_reward_delta": HIGHER_IS_BETTER,
}


@dataclass(frozen=True)
class Liability:
    """One liability: its name (a key of ``LIABILITY_MOTIFS`` or ``unpaired_cysteine``), where it starts (0-based;
    None for ``unpaired_cysteine``, a property of the whole sequence) and the residues it matched (``"C"`` for
    ``unpaired_cysteine``)."""

    name: str
    position: int | None
    motif: str


def find_liabilities(sequence: str) -> list[Liability]:
    """Every liability in the (upper-case) ``sequence``: motifs in order of position, then ``unpaired_cysteine``."""
    found = [
        Liability(name, match.start(), match.group(1))
        for name, pattern in _LIABILITY_PATTERNS.items()
        for match in pattern.finditer(sequence)
    ]
    found.sort(key=lambda liability: (liability.position, LIABILITY_NAMES.index(liability.name)))
    cysteines = sequence.count("C")
    if cysteines % 2:
        found.append(Liability(UNPAIRED_CYSTEINE, None, "C"))
    return found


def liability_counts(sequence: str) -> Counter:
    """How many liabilities of each kind ``sequence`` has."""
    return Counter(liability.name for liability in find_liabilities(sequence))


def introduced_liabilities(sequence: str, parent: str | None = None) -> list[str]:
    """The liability kinds of which ``sequence`` has more than ``parent`` (than none, without a parent)."""
    counts, allowed = liability_counts(sequence), liability_counts(parent or "")
    return [name for name in LIABILITY_NAMES if counts[name] > allowed[name]]


def liability_pass(sequence: str, baseline: str | None = None) -> bool:
    """Whether ``sequence`` introduces no liability that ``baseline`` (its parent) does not already have.

    Passing means: for every liability kind, the variant has at most as many as the parent. Counts, not positions,
    are compared, so an edit that removes one ``NG`` and creates another elsewhere still passes, and one that fixes
    a parent's liability is never penalised. Without a baseline, a sequence passes only if it has no liability.
    """
    return not introduced_liabilities(sequence, baseline)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _residue_token_ids(tokenizer) -> list[int]:
    """Token ids of the 20 standard amino acids, in ``STANDARD_AMINO_ACIDS`` order."""
    ids = tokenizer.convert_tokens_to_ids(list(STANDARD_AMINO_ACIDS))
    for residue, token_id in zip(STANDARD_AMINO_ACIDS, ids):
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserInputError(
                f"the tokenizer has no token for residue {residue!r}: a masked protein LM needs the amino-acid "
                "tokenizer (hf_ext.data.protein.build_protein_tokenizer)"
            )
    if tokenizer.mask_token_id is None:
        raise UserInputError("the tokenizer has no mask token: a masked protein LM needs one")
    return ids


def _encode(tokenizer, sequences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded ``input_ids`` and ``attention_mask`` of ``sequences``, and the token index of residue 0.

    Checks the tokenizer maps one residue to one token, which the residue positions below rely on.
    """
    encoded = tokenizer(list(sequences), padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    special = tokenizer.num_special_tokens_to_add()
    for sequence, length in zip(sequences, lengths):
        if length != len(sequence) + special:
            raise UserInputError(
                f"the tokenizer does not give one token per residue ({length} tokens for {len(sequence)} residues "
                f"of {sequence[:20]}...): use the amino-acid tokenizer (hf_ext.data.protein.build_protein_tokenizer)"
            )
    residue = STANDARD_AMINO_ACIDS[0]
    offset = tokenizer(residue)["input_ids"].index(tokenizer.convert_tokens_to_ids(residue))
    return encoded["input_ids"], encoded["attention_mask"], offset


def sample_variants(
    model,
    tokenizer,
    parents: list[str],
    num_variants: int,
    num_edits: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[list[str]]:
    """``num_variants`` substitution variants of every parent, sampled from a masked LM.

    Each variant masks ``num_edits`` distinct positions of its parent (chosen uniformly at random) in one forward
    pass and fills each one independently with a residue sampled from ``softmax(logits / temperature)`` over the 20
    standard amino acids (``temperature=0`` takes the most likely one). A sample may be the parent's own residue,
    so a variant differs from its parent in at most ``num_edits`` positions.

    Every random draw (positions, then Gumbel noise for the residues) is made up front from ``seed``, in the order
    of the parents, so the result does not depend on ``batch_size``: same seed, same variants.
    """
    parents = validate_sequences(parents, source="parents")
    if num_variants < 1 or num_edits < 1:
        raise UserInputError(f"num_variants and num_edits must be at least 1, got {num_variants} and {num_edits}")
    if temperature < 0:
        raise UserInputError(f"temperature must be >= 0 (0 = most likely residue), got {temperature}")
    for index, parent in enumerate(parents):
        if num_edits > len(parent):
            raise UserInputError(
                f"parents: sequence {index} has {len(parent)} residues, fewer than num_edits={num_edits}"
            )
    residue_ids = torch.tensor(_residue_token_ids(tokenizer))

    rng = random.Random(seed)
    jobs = [
        (parent_index, sorted(rng.sample(range(len(parent)), num_edits)))
        for parent_index, parent in enumerate(parents)
        for _ in range(num_variants)
    ]
    uniform = torch.rand(len(jobs), num_edits, len(residue_ids), generator=torch.Generator().manual_seed(seed))
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))

    device = _device(model)
    variants: list[list[str]] = [[] for _ in parents]
    with eval_mode(model):
        for start in tqdm(range(0, len(jobs), batch_size), desc="Sampling variants", unit="batch"):
            batch = jobs[start : start + batch_size]
            input_ids, attention_mask, offset = _encode(tokenizer, [parents[parent_index] for parent_index, _ in batch])
            positions = torch.tensor([edit_positions for _, edit_positions in batch]) + offset
            rows = torch.arange(len(batch)).unsqueeze(1)
            input_ids[rows, positions] = tokenizer.mask_token_id
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logits = logits[rows.to(device), positions.to(device)][..., residue_ids.to(device)].float().cpu()
            if temperature > 0:
                choices = (logits / temperature + gumbel[start : start + len(batch)]).argmax(dim=-1)
            else:
                choices = logits.argmax(dim=-1)
            for (parent_index, edit_positions), row in zip(batch, choices.tolist()):
                residues = list(parents[parent_index])
                for position, choice in zip(edit_positions, row):
                    residues[position] = STANDARD_AMINO_ACIDS[choice]
                variants[parent_index].append("".join(residues))
    return variants


def _scored_positions(length: int, max_positions: int | None) -> list[int]:
    """All positions, or ``max_positions`` evenly spaced ones (the centres of equal bins): the same positions for
    every sequence of a given length, so a parent and its substitution variants are scored at the same places."""
    if max_positions is None or max_positions >= length:
        return list(range(length))
    return [(2 * index + 1) * length // (2 * max_positions) for index in range(max_positions)]


def pseudo_log_likelihood(
    model,
    tokenizer,
    sequences: list[str],
    batch_size: int = 32,
    max_positions: int | None = None,
) -> list[float]:
    """The masked LM's pseudo-log-likelihood of each sequence, per residue (nats; higher is more likely).

    Each position is masked once (one forward pass per position, batched) and scored with the log-probability the
    model gives the true residue there, over its whole vocabulary; the result is the mean over positions, so
    sequences of different lengths compare. ``max_positions`` scores only that many evenly spaced positions per
    sequence, ``max_positions`` forward passes instead of one per residue: faster, but an estimate, and it may
    miss the edited positions themselves (their effect on the other positions still counts).
    """
    sequences = validate_sequences(sequences, on_unknown="unk", source="scored sequences")
    if max_positions is not None and max_positions < 1:
        raise UserInputError(f"max_positions must be at least 1, got {max_positions}")
    _residue_token_ids(tokenizer)  # a protein tokenizer with a mask token
    jobs = [
        (index, position)
        for index, sequence in enumerate(sequences)
        for position in _scored_positions(len(sequence), max_positions)
    ]
    totals = [0.0] * len(sequences)
    counts = [0] * len(sequences)
    device = _device(model)
    with eval_mode(model):
        for start in tqdm(range(0, len(jobs), batch_size), desc="Pseudo-log-likelihood", unit="batch"):
            batch = jobs[start : start + batch_size]
            input_ids, attention_mask, offset = _encode(tokenizer, [sequences[index] for index, _ in batch])
            rows = torch.arange(len(batch))
            positions = torch.tensor([position for _, position in batch]) + offset
            true_ids = input_ids[rows, positions].clone()
            input_ids[rows, positions] = tokenizer.mask_token_id
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            log_probs = logits[rows.to(device), positions.to(device)].float().log_softmax(dim=-1)
            scores = log_probs.gather(1, true_ids.to(device).unsqueeze(1)).squeeze(1).tolist()
            for (index, _), score in zip(batch, scores):
                totals[index] += score
                counts[index] += 1
    return [total / count for total, count in zip(totals, counts)]


def load_scorer(
    spec: str, model=None, tokenizer=None, batch_size: int = 32, max_positions: int | None = None
) -> Scorer:
    """A scorer from its CLI spelling: ``pll`` (the pseudo-log-likelihood under ``model``) or ``module:function``,
    any importable callable taking a list of sequences and returning one float per sequence."""
    if spec == "pll":
        if model is None or tokenizer is None:
            raise UserInputError("scorer pll needs the masked LM and its tokenizer")
        return partial(pseudo_log_likelihood, model, tokenizer, batch_size=batch_size, max_positions=max_positions)
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UserInputError(f"scorer {spec!r}: expected pll or module:function (e.g. my_package.fitness:score)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"scorer {spec!r}: cannot import {module_name}: {error}") from None
    scorer = getattr(module, function_name, None)
    if not callable(scorer):
        raise UserInputError(f"scorer {spec!r}: {module_name} has no callable {function_name!r}")
    return scorer


def _score(scorer: Scorer, sequences: list[str]) -> dict[str, float]:
    """Scores of the distinct ``sequences``, each scored once, checked to be one finite float per sequence."""
    unique = list(dict.fromkeys(sequences))
    scores = list(scorer(unique))
    if len(scores) != len(unique):
        raise UserInputError(f"the scorer returned {len(scores)} scores for {len(unique)} sequences")
    checked = {}
    for sequence, score in zip(unique, scores):
        try:
            checked[sequence] = float(score)
        except (TypeError, ValueError):
            checked[sequence] = math.nan
        if not math.isfinite(checked[sequence]):
            raise UserInputError(f"the scorer returned {score!r} for {sequence[:20]}...: expected a finite number")
    return checked


def _is_valid_variant(variant: str, parent: str) -> bool:
    return bool(variant) and len(variant) == len(parent) and all(residue in STANDARD_AMINO_ACIDS for residue in variant)


def _identity(first: str, second: str) -> float:
    return sum(a == b for a, b in zip(first, second)) / len(first)


def design_metrics(parents: list[str], variants: list[list[str]], scorer: Scorer | None = None) -> dict:
    """Metrics of substitution variants (``variants[i]`` are the variants of ``parents[i]``).

    - ``valid_fraction``: variants that are non-empty, made of the 20 standard residues only and as long as their
      parent (substitution edits keep the length), over all variants.
    - ``unique_fraction``: per parent, the distinct variants that differ from the parent, summed over parents and
      divided by all variants. Duplicates and unchanged copies of the parent both lower it.
    - ``mean_edits``: mean number of positions where a valid variant differs from its parent.
    - ``mean_pairwise_identity``: over every pair of valid variants of the same parent, the fraction of positions
      where they agree, averaged over all pairs of all parents (None with fewer than two variants per parent).
      Lower means more diverse.
    - ``liability_pass_fraction``: valid variants that pass ``liability_pass`` against their parent, over valid
      variants; ``introduced_liabilities`` counts, per liability kind, the valid variants that introduce it.
    - ``mean_reward_delta``: mean over valid variants of ``scorer(variant) - scorer(parent)`` (only with a
      scorer; each distinct sequence is scored once).

    Fractions over valid variants are None when no variant is valid.
    """
    if len(parents) != len(variants):
        raise UserInputError(f"{len(parents)} parents but variants for {len(variants)}")
    num_variants = sum(len(group) for group in variants)
    if num_variants == 0:
        raise UserInputError("no variants to evaluate")
    valid = [
        (parent, variant)
        for parent, group in zip(parents, variants)
        for variant in group
        if _is_valid_variant(variant, parent)
    ]
    unique = sum(len(set(group) - {parent}) for parent, group in zip(parents, variants))
    identities = [
        _identity(first, second)
        for parent, group in zip(parents, variants)
        for first, second in itertools.combinations([v for v in group if _is_valid_variant(v, parent)], 2)
    ]
    introduced = Counter(name for parent, variant in valid for name in introduced_liabilities(variant, parent))
    metrics = {
        "num_parents": len(parents),
        "num_variants": num_variants,
        "valid_fraction": len(valid) / num_variants,
        "unique_fraction": unique / num_variants,
        "mean_edits": _mean([sum(a != b for a, b in zip(parent, variant)) for parent, variant in valid]),
        "mean_pairwise_identity": _mean(identities),
        "liability_pass_fraction": _mean([liability_pass(variant, parent) for parent, variant in valid]),
        "introduced_liabilities": {name: introduced[name] for name in LIABILITY_NAMES},
    }
    if scorer is not None:
        scores = _score(scorer, [parent for parent, _ in valid] + [variant for _, variant in valid]) if valid else {}
        metrics["mean_reward_delta"] = _mean([scores[variant] - scores[parent] for parent, variant in valid])
    return metrics


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def write_baseline(metrics: dict, path: str | Path, settings: dict | None = None) -> dict:
    """Store the tracked metrics (``METRIC_DIRECTIONS``) of a run as a baseline JSON for ``check_regression``.

    Format: ``{"metrics": {name: {"value": float, "direction": "higher_is_better" | "lower_is_better"}},
    "settings": {...}}``; metrics that are None (not computed) are left out, ``settings`` records how the run was
    made so later checks can be made the same way.
    """
    baseline = {
        "metrics": {
            name: {"value": metrics[name], "direction": direction}
            for name, direction in METRIC_DIRECTIONS.items()
            if metrics.get(name) is not None
        },
        "settings": settings or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(baseline, indent=2) + "\n")
    return baseline


def read_baseline(path: str | Path) -> dict:
    """A baseline JSON, validated: every metric has a numeric ``value`` and a known ``direction``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"baseline {path}: file does not exist (create one with --write_baseline)")
    try:
        baseline = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"baseline {path}: not valid JSON ({error})") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("metrics"), dict):
        raise UserInputError(f'baseline {path}: expected {{"metrics": {{name: {{"value": ..., "direction": ...}}}}}}')
    for name, entry in baseline["metrics"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
            raise UserInputError(f"baseline {path}: metrics.{name} needs a numeric value")
        if entry.get("direction") not in (HIGHER_IS_BETTER, LOWER_IS_BETTER):
            raise UserInputError(
                f"baseline {path}: metrics.{name}.direction must be {HIGHER_IS_BETTER} or {LOWER_IS_BETTER}, "
                f"got {entry.get('direction')!r}"
            )
    return baseline


def check_regression(metrics: dict, baseline_path: str | Path, tolerance: dict[str, float] | float = 0.0) -> list[str]:
    """The metrics that got worse than the baseline by more than their tolerance, one message each (empty: pass).

    ``tolerance`` is absolute, in the metric's own unit: one number for every metric, or a mapping from metric name
    to tolerance (metrics it does not name get 0). A ``higher_is_better`` metric regresses when
    ``value < baseline - tolerance``, a ``lower_is_better`` one when ``value > baseline + tolerance``; a baseline
    metric missing from ``metrics`` (or None) is a regression too.
    """
    baseline = read_baseline(baseline_path)
    if isinstance(tolerance, dict):
        unknown = set(tolerance) - set(baseline["metrics"])
        if unknown:
            raise UserInputError(
                f"tolerance for {', '.join(sorted(unknown))}: not a metric of baseline {baseline_path} "
                f"({', '.join(baseline['metrics'])})"
            )
    regressions = []
    for name, entry in baseline["metrics"].items():
        allowed = tolerance.get(name, 0.0) if isinstance(tolerance, dict) else tolerance
        value, reference, direction = metrics.get(name), entry["value"], entry["direction"]
        if value is None:
            regressions.append(f"{name}: missing from this run (baseline {reference:.4f})")
        elif direction == HIGHER_IS_BETTER and value < reference - allowed:
            regressions.append(
                f"{name} = {value:.4f} is below baseline {reference:.4f} - tolerance {allowed:g} (higher is better)"
            )
        elif direction == LOWER_IS_BETTER and value > reference + allowed:
            regressions.append(
                f"{name} = {value:.4f} is above baseline {reference:.4f} + tolerance {allowed:g} (lower is better)"
            )
    return regressions


def parse_tolerance(text: str) -> dict[str, float] | float:
    """``"0.02"`` (every metric) or ``"valid_fraction=0,mean_reward_delta=0.1"`` (per metric, others 0)."""
    try:
        if "=" not in text:
            return float(text)
        items = [item.split("=", 1) for item in text.split(",") if item.strip()]
        tolerance = {name.strip(): float(value) for name, value in items}
    except ValueError:
        raise UserInputError(f"tolerance {text!r}: expected a number or metric=number,metric=number") from None
    unknown = sorted(set(tolerance) - set(METRIC_DIRECTIONS))
    if unknown:
        raise UserInputError(
            f"tolerance {text!r}: {', '.join(unknown)} is not a checked metric ({', '.join(METRIC_DIRECTIONS)})"
        )
    return tolerance


def load_masked_lm(path: str):
    """``AutoModelForMaskedLM`` and ``AutoTokenizer`` from the same folder (or Hub id), with a clear error."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer  # hf_ext's architectures registered by `import hf_ext`

    from hf_ext.loading import resolve_model, safe_weights_kwargs

    source = resolve_model(path)  # a missing folder or an uncached Hub id fails here, with the usual messages
    if source.kind not in ("folder", "hub"):
        raise UserInputError(f"model {path}: antibody_design needs a masked-LM folder or Hub id, not a {source.kind}")
    weights = safe_weights_kwargs(source.location, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location)
        model = AutoModelForMaskedLM.from_pretrained(source.location, **weights)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"model {path}: cannot load a masked LM and its tokenizer: {first_line}") from None
    return model, tokenizer


def evaluate_antibody_design(
    model_path: str,
    num_parents: int = 16,
    num_variants: int = 8,
    num_edits: int = 3,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    scorer: str | Scorer = "pll",
    max_positions: int | None = None,
    validation_fraction: float = 0.1,
    split_seed: int = 42,
) -> dict:
    """The whole evaluation of one masked LM: parents, variants, metrics (the ``hf-ext eval`` task).

    Parents are ``num_parents`` held-out sequences of ``load_antibody_corpus(validation_fraction, split_seed)``,
    chosen with ``seed``. The split must be the one the model was trained with, so the parents are truly unseen: for a
    model hf_ext trained, pass its recipe's ``corpus_validation_fraction`` and ``seed``
    (``hf_ext.recipe.saved_recipe(model_path)``, as ``hf-ext eval --task antibody_design`` does); the defaults are
    the corpus' own (0.1, 42).
    Returns ``{"model", "settings", "metrics", "designs"}``.
    """
    from hf_ext.data.protein import load_antibody_corpus

    held_out = load_antibody_corpus(validation_fraction=validation_fraction, seed=split_seed)["validation"]
    if not 1 <= num_parents <= len(held_out):
        raise UserInputError(
            f"num_parents must be between 1 and the {len(held_out)} held-out sequences, got {num_parents}"
        )
    chosen = random.Random(seed).sample(range(len(held_out)), num_parents)
    parents = [held_out[index]["sequence"] for index in chosen]
    names = [held_out[index]["name"] for index in chosen]

    scorer_name = scorer if isinstance(scorer, str) else getattr(scorer, "__qualname__", repr(scorer))
    model, tokenizer = load_masked_lm(model_path)
    if isinstance(scorer, str):
        scorer = load_scorer(scorer, model, tokenizer, batch_size=batch_size, max_positions=max_positions)
    variants = sample_variants(model, tokenizer, parents, num_variants, num_edits, temperature, seed, batch_size)
    metrics = design_metrics(parents, variants, scorer)
    settings = {
        "task": "antibody_design",
        "num_parents": num_parents,
        "num_variants": num_variants,
        "num_edits": num_edits,
        "temperature": temperature,
        "seed": seed,
        "scorer": scorer_name,
        "max_positions": max_positions,
        "validation_fraction": validation_fraction,
        "split_seed": split_seed,
    }
    designs = [
        {"name": name, "parent": parent, "variants": group} for name, parent, group in zip(names, parents, variants)
    ]
    return {"model": model_path, "settings": settings, "metrics": metrics, "designs": designs}

