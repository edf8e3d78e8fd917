"""Open-ended instructions written by a base model (`hf-ext data generate-instructions`).

Each prompt shows a few hand-written instructions of one category, in plain text with no chat template and no
special tokens, and ends where the next instruction of that category starts; the model's continuation, cut at the
block's `END`, is a new instruction. It is kept when it terminates, has a sensible length and format, repeats
neither an example nor an earlier instruction, and the critic (`hf_ext.eval.critic`, a log-probability judgement in
both label orders) gives it at least `critic_threshold`. Every attempt is recorded with its status, and the QC
manifest counts kept and rejected attempts by reason, per category, with the critic's reliability.

Attempts are appended to `<output>.partial` as they are made, so an interrupted run resumes where it stopped; the
final file and its manifest are written only at the end.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hf_ext.data.manifest import partial_path, read_partial, resumable_attempts, write_data_file
from hf_ext.errors import UserInputError

logger = logging.getLogger("hf_ext")

# Hand-written examples per category (the categories of the prototype's instruction generation).
CATEGORIES: dict[str, list[str]] = {
    "qa": [
        "What is the difference between a list and a tuple in Python?",
        "Why does the sky look blue during the day?",
        "How many bones are there in an adult human body?",
        "What causes the seasons on Earth?",
    ],
    "completion": [
        "Complete the sentence: The best way to learn a new language is",
        "Finish this proverb: A journey of a thousand miles",
        "Continue the list: Monday, Tuesday, Wednesday,",
        "Complete the analogy: Bird is to nest as bee is to",
    ],
    "generation": [
        "Write a short email asking a colleague to move a meeting to Friday.",
        "List three tips for keeping a houseplant healthy.",
        "Write a one-sentence summary of what a compiler does.",
        "Give two examples of renewable energy sources.",
    ],
    "creative": [
        "Write a four-line poem about rain on a window.",
        "Invent a name for a bakery that only sells bread made with honey.",
        "Describe a sunset to someone who has never seen one, in two sentences.",
        "Write the opening line of a mystery story set on a train.",
    ],
    "analytical": [
        "Compare walking and cycling to work in terms of cost and time.",
        "Explain which is larger, 2 to the power of 10 or 10 to the power of 3, and why.",
        "List the pros and cons of working from home.",
        "A shop sells pens at 3 for 2 dollars. How much do 12 pens cost? Explain your steps.",
    ],
}
BLOCK = "Category: {category}\nInstruction: {instruction}\nEND"
URL = re.compile(r"https?://|www\.")


@dataclass(frozen=True)
class InstructionSettings:
    num_instructions: int = 200  # attempts; the manifest says how many were kept
    categories: tuple[str, ...] = tuple(CATEGORIES)
    shots: int = 3
    max_new_tokens: int = 48
    temperature: float = 0.9
    min_chars: int = 12
    max_chars: int = 300
    critic_threshold: float = 0.5
    # The first this many kept instructions are held out for `hf-ext eval --instructions`: recorded in the manifest,
    # which every tool reading the file follows.
    eval_size: int = 50
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        from hf_ext.eval.critic import check_threshold

        check_threshold(self.critic_threshold)
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown or not self.categories:
            raise UserInputError(f"categories: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(CATEGORIES)}")
        if self.num_instructions < 1 or self.shots < 1:
            raise UserInputError(f"num_instructions and shots must be >= 1, got {self.num_instructions} and {self.shots}")
        if self.eval_size < 0:
            raise UserInputError(f"eval_size: the number of held-out instructions must be >= 0, got {self.eval_size}")
        if not 0 < self.min_chars <= self.max_chars:
            raise UserInputError(f"min_chars / max_chars: expected 0 < min_chars <= max_chars, got {self.min_chars} / {self.max_chars}")


def instruction_prompt(category: str, rng: random.Random, shots: int) -> str:
    """`shots` examples of `category` (in a random order), then the start of the next block of that category."""
    examples = rng.sample(CATEGORIES[category], k=min(shots, len(CATEGORIES[category])))
    blocks = [BLOCK.format(category=category, instruction=example) for example in examples]
    return "\n\n".join(blocks + [f"Category: {category}\nInstruction:"])


def clean_instruction(continuation: str, settings: InstructionSettings) -> tuple[str | None, str]:
    """(instruction, status): the continuation cut at `END` (or the next block), or None and why it was rejected."""
    cuts = [i for i in (continuation.find("\nEND"), continuation.find("\nCategory:"), continuation.find("\n\n")) if i >= 0]
    if not cuts:
        return None, "rejected_unterminated"
    text = " ".join(continuation[: min(cuts)].split())
    if len(text) < settings.min_chars:
        return None, "rejected_short"
    if len(text) > settings.max_chars:
        return None, "rejected_long"
    if "Instruction:" in text or "Response:" in text or "Category:" in text or URL.search(text) or not re.search(r"[A-Za-z]{3}", text):
        return None, "rejected_format"
    return text, "kept"


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def generate_instructions(model, tokenizer, output: str | Path, settings: InstructionSettings, critic=None,
                          source_model: str | None = None, critic_model: str | None = None) -> dict:
    """Write the kept instructions of `settings.num_instructions` attempts to `output` (JSONL rows `instruction`,
    `category`, `critic_score`, `critic_agree`) with a QC manifest; `critic` is a `LogprobCritic` (none: every
    instruction that passes the filters is kept, with no score). Returns the manifest."""
    from hf_ext.eval.critic import CriticScore, reliability
    from hf_ext.generation import generate

    categories = list(settings.categories)
    seen = {_normalized(e) for c in categories for e in CATEGORIES[c]} | {
        _normalized(r["instruction"]) for r in read_partial(partial_path(output)) if r["status"] == "kept"}

    def attempt_batch(batch: list[int], start: int, to_do: int) -> list[dict]:
        category_of = {i: categories[i % len(categories)] for i in batch}
        prompts = [instruction_prompt(category_of[i], random.Random(f"{settings.seed}-{i}"), settings.shots)
                   for i in batch]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        continuations = generate(
            model, tokenizer, encoded, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, seed=settings.seed + batch[0], desc=f"Generating instructions {start}/{to_do}",
        )
        rows = []
        for i, (continuation,) in zip(batch, continuations):
            text, status = clean_instruction(continuation, settings)
            if text is not None:
                key = _normalized(text)
                status = "rejected_duplicate" if key in seen else status
                seen.add(key)
            rows.append({"index": i, "category": category_of[i], "instruction": text, "status": status, "critic": None})
        if critic is not None:
            critic.reject_below(settings.critic_threshold, rows)
        return rows

    rows = resumable_attempts(output, settings.num_instructions, settings.batch_size, attempt_batch)
    kept = [r for r in rows if r["status"] == "kept"]
    scores = {r["index"]: CriticScore(*r["critic"]) for r in rows if r["critic"] is not None}
    qc = {
        "attempts": len(rows),
        "kept": len(kept),
        "statuses": dict(sorted(Counter(r["status"] for r in rows).items())),
        "kept_by_category": {c: sum(r["category"] == c for r in kept) for c in categories},
        "mean_instruction_chars": sum(len(r["instruction"]) for r in kept) / len(kept) if kept else 0.0,
        "critic": None if critic is None else {
            "model": critic_model, "threshold": settings.critic_threshold,
            **reliability(list(scores.values()), settings.critic_threshold),
        },
    }
    decided = qc["critic"] and qc["critic"]["orders_agree"]
    if decided is not None and decided < 0.5:
        logger.warning("critic %s: its two label orders agree on only %.0f%% of the instructions, so it mostly prefers a "
                       "letter and its filter is close to random (see the manifest's qc.critic)", critic_model,
                       100 * decided)
    manifest = write_data_file(
        output,
        [{"instruction": r["instruction"], "category": r["category"],
          "critic_score": round(scores[r["index"]].score, 6) if r["index"] in scores else None,
          "critic_agree": scores[r["index"]].agree if r["index"] in scores else None} for r in kept],
        generator="hf_ext.data.instructions", qc=qc, source_model=source_model,
        parameters={**settings.__dict__, "categories": categories},
    )
    partial_path(output).unlink()
    return manifest


def generate_instruction_file(model: str, output: str | Path, settings: InstructionSettings,
                              critic_model: str | None = None, load_in_4bit: bool = False) -> dict:
    """`hf-ext data generate-instructions`: load `model` (and the critic, by default the same model) and write the
    instructions; returns the manifest."""
    from hf_ext.eval.critic import load_critic
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    loaded = load_model(ModelArguments(model_name_or_path=model, load_in_4bit=load_in_4bit))
    tokenizer = load_tokenizer(model)
    critic_model = critic_model or model
    critic = load_critic(critic_model, settings.batch_size, (model, loaded, tokenizer))
    return generate_instructions(loaded, tokenizer, output, settings, critic=critic, source_model=model,
                                 critic_model=critic_model)


@dataclass(frozen=True)
class InstructionPrompts:
    """Which instructions of a file written by `hf-ext data generate-instructions` a data tool uses: `num_prompts`
    after skipping `offset` (those another data step used), never the first ones, which the file's manifest holds out
    for `hf-ext eval --instructions` (its `eval_size`, set when the file was written). The open-ended counterpart of
    `hf_ext.data.tasks.TrainingPrompts`."""

    path: str
    num_prompts: int = 200
    offset: int = 0
    task = None  # open-ended: no verifier

    def __post_init__(self):
        if self.num_prompts < 1 or self.offset < 0:
            raise UserInputError(f"instructions {self.path}: num_prompts must be >= 1 and offset >= 0, got "
                                 f"{self.num_prompts} and {self.offset}")

    def read(self) -> tuple[list[str], dict]:
        """Every instruction of the file and its manifest, once the manifest says `generate-instructions` wrote the
        file and it is unchanged."""
        from hf_ext.data.manifest import verify_manifest

        if not Path(self.path).is_file():
            raise UserInputError(f"instructions {self.path}: no such file (write one with `hf-ext data generate-instructions`)")
        manifest = verify_manifest(self.path)
        if manifest["generator"] != "hf_ext.data.instructions":
            raise UserInputError(f"instructions {self.path}: its manifest says {manifest['generator']} wrote it; expected "
                                 "a file written by `hf-ext data generate-instructions` (generator hf_ext.data.instructions)")
        rows = [json.loads(line) for line in Path(self.path).read_text().splitlines() if line.strip()]
        for index, row in enumerate(rows):
            if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise UserInputError(f"instructions {self.path}: row {index + 1}: field 'instruction': expected a non-empty string")
        return [row["instruction"] for row in rows], manifest

    def eval_size(self, manifest: dict) -> int:
        return manifest["parameters"].get("eval_size", InstructionSettings.eval_size)

    def held_out(self) -> list[str]:
        """The instructions no data tool uses: what `hf-ext eval --instructions` scores on."""
        instructions, manifest = self.read()
        held_out = instructions[: self.eval_size(manifest)]
        if not held_out:
            raise UserInputError(f"instructions {self.path}: no instruction is held out for evaluation (eval_size 0 when "
                                 "it was written); write the file again with `generate-instructions --eval_size N`")
        return held_out

    def rows(self):
        """The chosen instructions as a `prompt` column."""
        from datasets import Dataset

        instructions, manifest = self.read()
        eval_size = self.eval_size(manifest)
        chosen = instructions[eval_size + self.offset : eval_size + self.offset + self.num_prompts]
        if not chosen:
            raise UserInputError(
                f"instructions {self.path}: {len(instructions)} instructions, of which the first {eval_size} are held "
                f"out for evaluation and {self.offset} skipped (offset), so none is left; write more or lower the offset"
            )
        if len(chosen) < self.num_prompts:
            logger.warning("instructions %s: %d instructions after the %d held out and the %d skipped, fewer than the %d "
                           "asked for", self.path, len(chosen), eval_size, self.offset, self.num_prompts)
        return Dataset.from_dict({"prompt": chosen})

    def describe(self) -> dict:
        """Which prompts these are, as recorded in the manifest of the data made from them."""
        _, manifest = self.read()
        return {"instructions": str(self.path), "instructions_sha256": manifest["sha256"],
                "eval_size": self.eval_size(manifest), "num_prompts": self.num_prompts, "offset": self.offset}
