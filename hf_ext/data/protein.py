"""Protein sequences: the amino-acid tokenizer, sequence validation and a real antibody corpus that exists offline.

Vocabulary (26 tokens, fixed ids)::

    0 <pad>   1 <mask>   2 <cls>   3 <eos>   4 <unk>
    5..24     the 20 standard residues A C D E F G H I K L M N P Q R S T V W Y (in that order)
    25        X, an unknown residue (as in FASTA files: a real residue whose identity is not known)

Models may round their ``vocab_size`` up (``PROTEIN_MODEL_VOCAB_SIZE`` = 32, the ``MambaSSMConfig`` default) so the
embedding and output matrices have a friendlier shape; ids 26-31 are never produced by the tokenizer.

Tokenization is one token per character, between ``<cls>`` and ``<eos>``. Input is upper-cased first (lowercase
letters in FASTA files are soft-masked regions, still real residues), so ``"acd"`` and ``"ACD"`` give the same ids.
Any other character (``B``, ``Z``, ``*``, whitespace, digits...) becomes ``<unk>``; ``validate_sequences`` catches
them up front with an error naming the sequence and position.

The corpus (``load_antibody_corpus``) assembles the human germline antibody variable domains that the PyPI package
``abnumber`` ships (IMGT V and J gene amino-acid sequences): every V gene joined with every J gene of its chain type.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import string
from collections import Counter
from collections.abc import Iterable

from datasets import Dataset, DatasetDict
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_ext.errors import UserInputError

logger = logging.getLogger(__name__)

PAD, MASK, CLS, EOS, UNK = "<pad>", "<mask>", "<cls>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, MASK, CLS, EOS, UNK)
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
UNKNOWN_RESIDUE = "X"
PROTEIN_ALPHABET = STANDARD_AMINO_ACIDS + UNKNOWN_RESIDUE
PROTEIN_VOCAB = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *PROTEIN_ALPHABET))}
PROTEIN_MODEL_VOCAB_SIZE = 32
PROTEIN_MODEL_MAX_LENGTH = 1024
ON_UNKNOWN_CHOICES = ("error", "unk")
CHAINS = ("H", "K", "L")
# Only ASCII letters, as the tokenizer's normalizer: str.upper() would turn "ß" into "SS", two serines.
_ASCII_UPPERCASE = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def build_protein_tokenizer(model_max_length: int = PROTEIN_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """The character-level amino-acid tokenizer (ids in the module docstring); ``save_pretrained`` writes a folder
    that ``AutoTokenizer.from_pretrained`` loads back with the same ids."""
    backend = Tokenizer(WordLevel(PROTEIN_VOCAB, unk_token=UNK))
    # tokenizers has no upper-casing normalizer; one Replace per ASCII letter does it.
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace(lower, upper) for lower, upper in zip(string.ascii_lowercase, string.ascii_uppercase)]
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # "ACD", not "A C D"
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {EOS}",
        pair=f"{CLS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(CLS, PROTEIN_VOCAB[CLS]), (EOS, PROTEIN_VOCAB[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        mask_token=MASK,
        cls_token=CLS,
        eos_token=EOS,
        unk_token=UNK,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def validate_sequences(
    sequences: Iterable[str], on_unknown: str = "error", source: str = "sequences"
) -> list[str]:
    """The sequences upper-cased (ASCII letters only, as the tokenizer does), each checked to be a non-empty string
    of amino-acid letters.

    ``on_unknown="error"`` rejects a character outside ``PROTEIN_ALPHABET`` with an error naming ``source``, the
    sequence index and the (0-based) position; ``on_unknown="unk"`` keeps such characters, which the tokenizer
    encodes as ``<unk>`` (their count is logged). Empty sequences are an error either way.
    """
    if on_unknown not in ON_UNKNOWN_CHOICES:
        raise UserInputError(f"on_unknown must be one of {', '.join(ON_UNKNOWN_CHOICES)}, got {on_unknown!r}")
    if isinstance(sequences, str):
        raise UserInputError(f"{source}: expected a list of sequences, got a single string")
    allowed = set(PROTEIN_ALPHABET)
    validated = []
    unknown_count = 0
    for index, sequence in enumerate(sequences):
        if not isinstance(sequence, str):
            raise UserInputError(f"{source}: sequence {index} must be a string, got {type(sequence).__name__}")
        if not sequence:
            raise UserInputError(f"{source}: sequence {index} is empty")
        sequence = sequence.translate(_ASCII_UPPERCASE)
        for position, character in enumerate(sequence):
            if character in allowed:
                continue
            if on_unknown == "error":
                raise UserInputError(
                    f"{source}: sequence {index} has {character!r} at position {position}, outside the amino-acid "
                    f"alphabet {PROTEIN_ALPHABET} (set on_unknown: unk to map it to {UNK})"
                )
            unknown_count += 1
        validated.append(sequence)
    if unknown_count:
        logger.warning(
            "%s: %d characters outside %s will be encoded as %s", source, unknown_count, PROTEIN_ALPHABET, UNK
        )
    return validated


def v_gene_name(allele: str) -> str:
    """The gene a V allele belongs to, without its allele and duplicate-copy markers.

    ``IGHV1-69*01`` and ``IGHV1-69D*01`` (the duplicated copy) are both ``IGHV1-69``; ``IGKV1D-12*02`` is
    ``IGKV1-12``.
    """
    gene = allele.split("*", 1)[0]
    return re.sub(r"D(?=-|$)", "", gene)


def load_antibody_corpus(validation_fraction: float = 0.1, seed: int = 42) -> DatasetDict:
    """Human germline antibody variable domains (IMGT V + J segments from ``abnumber``), split by held-out V gene.

    Every V gene's amino-acid sequence (IMGT gaps removed) is joined with every J gene of the same chain type: heavy
    (``H``), kappa (``K``) and lambda (``L``). This is V-J recombination of germline segments only: heavy chains
    lack the D segment, so their CDR3 is much shorter and less diverse than in real antibodies, and there is no
    somatic hypermutation. Alleles with the same protein sequence (``IGHJ4*01``-``*03``; ``IGHV1-69*01`` and
    ``IGHV1-69D*01``) give the same assembly, kept once under the first V and J names in sorted order.

    Columns: ``sequence``, ``name`` (``"<V allele>+<J allele>"``, e.g. ``"IGHV1-18*01+IGHJ4*01"``) and ``chain``.

    The split holds out whole V genes, so validation measures generalisation to V genes never seen in training: all
    alleles of a gene (and its duplicated ``D`` copy) go to one side, and genes whose alleles share an identical
    V sequence (``IGHV3-30*01`` is ``IGHV3-30-3*01``) are held out together, so no V sequence is in both splits.
    The held-out groups are chosen per chain type, in the order of a SHA-256 hash of ``seed`` and the group's
    first gene name, until they hold ``validation_fraction`` of that chain's sequences (the last group may
    overshoot): deterministic, independent of the order of the data, and every chain type is in validation.
    Close paralogs (``IGHV3-30`` and ``IGHV3-33``, a few residues apart) are distinct genes and can land on
    different sides.

    With ``abnumber`` 0.4.4: 292 distinct V sequences (176 heavy, 53 kappa, 63 lambda) x the distinct J sequences
    of their chain (9, 8, 7) = 2,449 sequences (1,584 H, 424 K, 441 L) of 106-121 residues, 277,408 residues in
    all. With the defaults (``validation_fraction=0.1, seed=42``; 42 is the ``TrainingArguments`` default seed, which
    the MLM stage passes): train 2,146 sequences / 243,022 residues; validation 303 sequences / 34,386 residues
    (198 H, 56 K, 49 L) from 12 held-out V genes (36 V alleles).
    Built in ~0.1 s and cached for the process.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise UserInputError(f"validation_fraction must be strictly between 0 and 1, got {validation_fraction}")
    assemblies = _germline_assemblies()
    validation_groups = _validation_groups(assemblies, validation_fraction, seed)
    splits: dict[str, dict[str, list[str]]] = {
        split: {"sequence": [], "name": [], "chain": []} for split in ("train", "validation")
    }
    for sequence, name, chain, group in assemblies:
        columns = splits["validation" if group in validation_groups else "train"]
        columns["sequence"].append(sequence)
        columns["name"].append(name)
        columns["chain"].append(chain)
    return DatasetDict({split: Dataset.from_dict(columns) for split, columns in splits.items()})


def _validation_groups(
    assemblies: tuple[tuple[str, str, str, str], ...], validation_fraction: float, seed: int
) -> set[str]:
    """Per chain type, whole groups in the order of a seeded hash of their name, until they hold
    ``validation_fraction`` of that chain's sequences (the last group may overshoot)."""
    sizes: dict[str, Counter] = {chain: Counter() for chain in CHAINS}
    for _, _, chain, group in assemblies:
        sizes[chain][group] += 1
    selected = set()
    for chain_sizes in sizes.values():
        target, taken = validation_fraction * sum(chain_sizes.values()), 0
        for group in sorted(chain_sizes, key=lambda group: hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()):
            if taken >= target:
                break
            selected.add(group)
            taken += chain_sizes[group]
    return selected


@functools.cache  # cheap (~0.1 s), but every stage and evaluator of a run asks for it
def _germline_assemblies() -> tuple[tuple[str, str, str, str], ...]:
    """``(sequence, name, chain, held-out group)`` for every distinct V-J assembly, in a fixed order."""
    try:
        from abnumber.germlines import HUMAN_IMGT_IG_J, HUMAN_IMGT_IG_V
    except ImportError:
        raise UserInputError(
            "the antibody corpus needs the abnumber package (human IMGT germlines): pip install abnumber "
            "(or pip install 'hf_ext[bio]')"
        ) from None

    assemblies = []
    seen: set[str] = set()
    for chain in CHAINS:
        v_genes = _ungapped(HUMAN_IMGT_IG_V[chain])
        j_genes = _ungapped(HUMAN_IMGT_IG_J[chain])
        groups = _held_out_groups(v_genes)
        for v_name in sorted(v_genes):
            for j_name in sorted(j_genes):
                sequence = v_genes[v_name] + j_genes[j_name]
                if sequence not in seen:
                    seen.add(sequence)
                    assemblies.append((sequence, f"{v_name}+{j_name}", chain, groups[v_name]))
    return tuple(assemblies)


def _ungapped(germlines: dict) -> dict[str, str]:
    """``{allele name: amino-acid sequence}`` of one abnumber germline table, IMGT alignment gaps removed."""
    return {name: gapped.replace("-", "") for name, gapped in germlines["aligned_sequences"].items()}


def _held_out_groups(v_genes: dict[str, str]) -> dict[str, str]:
    """For each V allele, the name of the group it is held out with: the connected components of "same gene" and
    "same V sequence" (union-find), named by their first gene in sorted order."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    def union(first: str, second: str) -> None:
        first, second = find(first), find(second)
        if first != second:
            parent[max(first, second)] = min(first, second)

    first_gene_with_sequence: dict[str, str] = {}
    for name in sorted(v_genes):
        gene = v_gene_name(name)
        union(gene, first_gene_with_sequence.setdefault(v_genes[name], gene))
    return {name: find(v_gene_name(name)) for name in v_genes}
