"""SFT data from a base model by few-shot completion (`hf-ext data generate-sft`).

Each prompt is a few solved examples followed by a new instruction, all in the exact text format the SFT stage
trains on (`Instruction: ...\\nResponse: ...\\nEND`, see `hf_ext.data.formats.Instruction`), with no chat template
and no special tokens. The examples are drawn per prompt from a pool that spans several categories. The model's
continuation is cut at `END` or where it runs on into a new `Instruction:`; a continuation that never stops or is
too short is rejected, and with a verifiable task so is a wrong one.

Rows are appended to `<output>.partial` (one JSON line per processed instruction, kept or not) as they are made, so
an interrupted run resumes where it stopped; the final file and its QC manifest are written only at the end, so a
partial file is never trained on.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hf_ext.data.formats import Instruction
from hf_ext.data.manifest import write_data_file
from hf_ext.data.tasks import TrainingPrompts

# (category, instruction, response): solved examples shown to the base model, checked by hand.
FEW_SHOT_POOL = [
    ("arithmetic", "What is 23 + 58? Reply with the number only.", "81"),
    ("arithmetic", "What is 7 times 6? Reply with the number only.", "42"),
    ("arithmetic", "What is 100 minus 37? Reply with the number only.", "63"),
    ("lists", "Sort these numbers in ascending order: 9 2 7. Reply with the sorted numbers separated by spaces only.", "2 7 9"),
    ("lists", "Name the largest number in this list: 14, 3, 27, 8.", "27"),
    ("lists", "How many items are in this list: apple, pear, plum?", "3"),
    ("words", "Reverse the string 'cat'. Reply with the reversed string only.", "tac"),
    ("words", "Write the word 'river' in capital letters.", "RIVER"),
    ("words", "What is the first letter of the word 'garden'?", "g"),
    ("facts", "What is the capital of France?", "Paris"),
    ("facts", "How many days are in a week?", "7"),
    ("facts", "What do bees make?", "Honey"),
]


@dataclass(frozen=True)
class GenerationSettings:
    shots: int = 3
    max_new_tokens: int = 32
    temperature: float = 0.0
    min_response_chars: int = 1
    keep_unverified: bool = False
    batch_size: int = 16
    seed: int = 0


def few_shot_prompt(instruction: str, rng: random.Random, shots: int) -> str:
    """`shots` solved examples from different categories (as far as the pool allows), then `instruction`."""
    by_category: dict[str, list[tuple[str, str]]] = {}
    for category, question, answer in FEW_SHOT_POOL:
        if question != instruction:
            by_category.setdefault(category, []).append((question, answer))
    categories = rng.sample(sorted(by_category), k=min(shots, len(by_category)))
    examples = [rng.choice(by_category[c]) for c in categories]
    while len(examples) < shots:
        examples.append(rng.choice([e for c in by_category.values() for e in c]))
    blocks = [Instruction.PROMPT.format(instruction=q) + Instruction.COMPLETION.format(response=a) for q, a in examples]
    return "\n\n".join(blocks + [Instruction.PROMPT.format(instruction=instruction)])


def clean_response(continuation: str, min_chars: int) -> tuple[str | None, str]:
    """(response, status): the continuation cut at END or at a run-on `Instruction:`, or None and why it was rejected."""
    end = continuation.find("\nEND")
    run_on = continuation.find("\nInstruction:")
    if end < 0 and run_on < 0:
        return None, "rejected_unterminated"
    cut = min(i for i in (end, run_on) if i >= 0)
    response = continuation[:cut].strip()
    if len(response) < min_chars:
        return None, "rejected_short"
    return response, "kept" if cut == end else "kept_cut_run_on"


def read_partial(path: Path) -> list[dict]:
    """Complete lines of a partial file; a line cut by a crash is dropped (and redone)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def generate_sft_data(model, tokenizer, instructions: list[str], output: str | Path, settings: GenerationSettings,
                      answers: list[str] | None = None, verify=None, source_model: str | None = None) -> dict:
    """Write the kept (instruction, response) rows to `output` (JSONL) with a QC manifest; returns the manifest."""
    from hf_ext.generation import generate

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    done = {row["index"]: row for row in read_partial(partial)}
    todo = [i for i in range(len(instructions)) if i not in done]
    with open(partial, "a") as handle:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            prompts = [few_shot_prompt(instructions[i], random.Random(f"{settings.seed}-{i}"), settings.shots) for i in batch]
            encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            continuations = generate(
                model, tokenizer, encoded, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature, seed=settings.seed + start, desc=f"Generating SFT data {start}/{len(todo)}",
            )
            for i, (continuation,) in zip(batch, continuations):
                response, status = clean_response(continuation, settings.min_response_chars)
                verified = None
                if response is not None and verify is not None:
                    verified = bool(verify(response, answers[i]))
                    if not verified and not settings.keep_unverified:
                        status = "rejected_wrong"
                row = {"index": i, "status": status, "instruction": instructions[i], "response": response, "verified": verified}
                handle.write(json.dumps(row) + "\n")
                done[i] = row
            handle.flush()
            os.fsync(handle.fileno())

    rows = [done[i] for i in range(len(instructions))]
    kept = [r for r in rows if r["status"].startswith("kept")]
    statuses = Counter(r["status"] for r in rows)
    checked = [r["verified"] for r in rows if r["verified"] is not None]
    qc = {
        "instructions": len(rows),
        "kept": len(kept),
        "statuses": dict(sorted(statuses.items())),
        "verified_fraction_of_terminated": sum(checked) / len(checked) if checked else None,
        "mean_response_chars": sum(len(r["response"]) for r in kept) / len(kept) if kept else 0.0,
        "duplicate_instructions": len(kept) - len({r["instruction"] for r in kept}),
    }
    manifest = write_data_file(
        output, [{"instruction": r["instruction"], "response": r["response"]} for r in kept],
        generator="hf_ext.data.fewshot", qc=qc, source_model=source_model,
        parameters={**settings.__dict__, "format": "instruction"},
    )
    partial.unlink()
    return manifest


def generate_task_sft_data(model: str, prompts: TrainingPrompts, output: str | Path, settings: GenerationSettings,
                           load_in_4bit: bool = False) -> dict:
    """`hf-ext data generate-sft`: load `model` and write SFT rows for the task's training `prompts`, responses
    checked by the task's verifier; returns the manifest."""
    from hf_ext.data.tasks import TASKS
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    rows = prompts.rows()
    loaded = load_model(ModelArguments(model_name_or_path=model, load_in_4bit=load_in_4bit))
    return generate_sft_data(loaded, load_tokenizer(model), list(rows["prompt"]), output, settings,
                             answers=list(rows["answer"]), verify=TASKS[prompts.task].verify, source_model=model)
