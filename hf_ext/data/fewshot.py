"""SFT data from a base model by few-shot completion (`hf-ext data generate-sft`).

Each prompt is a few solved examples followed by a new instruction, all in the exact text format the SFT stage
trains on (`Instruction: ...\\nResponse: ...\\nEND`, see `hf_ext.data.formats.Instruction`), with no chat template
and no special tokens. The examples are drawn per prompt from a pool that spans several categories. The model's
continuation is cut at `END` or where it runs on into a new `Instruction:`; a continuation that never stops or is
too short is rejected; with a verifiable task so is a wrong one, and for open-ended instructions (a file written by
`hf-ext data generate-instructions`) so is one the log-probability critic (`hf_ext.eval.critic`) scores below its
threshold. Open-ended instructions are shown open-ended examples (`OPEN_ENDED_POOL`) instead of short answers.

Rows are appended to `<output>.partial` (one JSON line per processed instruction, kept or not) as they are made, so
an interrupted run resumes where it stopped; the final file and its QC manifest are written only at the end, so a
partial file is never trained on.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hf_ext.data.formats import Instruction
from hf_ext.data.instructions import InstructionPrompts
from hf_ext.data.manifest import partial_path, resumable_attempts, write_data_file
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
# The same for open-ended instructions, one category of `hf_ext.data.instructions.CATEGORIES` each; short answers, so
# that a small model's continuation ends within a few dozen tokens.
OPEN_ENDED_POOL = [
    ("qa", "Why does the sky look blue during the day?",
     "Air scatters blue sunlight much more than red light, so blue light reaches our eyes from every direction."),
    ("qa", "How many bones are there in an adult human body?", "An adult human body has 206 bones."),
    ("completion", "Finish this proverb: A journey of a thousand miles", "A journey of a thousand miles begins with a single step."),
    ("completion", "Complete the analogy: Bird is to nest as bee is to", "Bird is to nest as bee is to hive."),
    ("generation", "List three tips for keeping a houseplant healthy.",
     "1. Water it only when the top of the soil is dry. 2. Give it bright, indirect light. 3. Feed it once a month in spring and summer."),
    ("generation", "Write a one-sentence summary of what a compiler does.",
     "A compiler translates a program written in one language into another, usually machine code, so it can run."),
    ("creative", "Invent a name for a bakery that only sells bread made with honey.", "The Golden Crust"),
    ("creative", "Write the opening line of a mystery story set on a train.",
     "When the night train left Vienna, there were nine passengers in the sleeping car; by dawn there were eight."),
    ("analytical", "Explain which is larger, 2 to the power of 10 or 10 to the power of 3, and why.",
     "2 to the power of 10 is 1024 and 10 to the power of 3 is 1000, so 2 to the power of 10 is larger, by 24."),
    ("analytical", "A shop sells pens at 3 for 2 dollars. How much do 12 pens cost? Explain your steps.",
     "12 pens are 4 groups of 3 pens, and each group costs 2 dollars, so 12 pens cost 4 x 2 = 8 dollars."),
]


@dataclass(frozen=True)
class GenerationSettings:
    shots: int = 3
    max_new_tokens: int = 32
    temperature: float = 0.0
    min_response_chars: int = 1
    keep_unverified: bool = False
    critic_threshold: float = 0.5  # open-ended instructions: keep responses the critic gives at least this P(yes)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        from hf_ext.eval.critic import check_threshold

        check_threshold(self.critic_threshold)


def few_shot_prompt(instruction: str, rng: random.Random, shots: int, pool=FEW_SHOT_POOL) -> str:
    """`shots` solved examples of `pool` from different categories (as far as it allows), then `instruction`."""
    by_category: dict[str, list[tuple[str, str]]] = {}
    for category, question, answer in pool:
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


def generate_sft_data(model, tokenizer, instructions: list[str], output: str | Path, settings: GenerationSettings,
                      answers: list[str] | None = None, verify=None, critic=None, source_model: str | None = None,
                      critic_model: str | None = None, prompts: dict | None = None) -> dict:
    """Write the kept (instruction, response) rows to `output` (JSONL) with a QC manifest; returns the manifest.
    Responses are checked by `verify` (a task's verifier, against `answers`) or scored by `critic` (a
    `LogprobCritic`; open-ended instructions, shown `OPEN_ENDED_POOL` examples), or only by the format filters.
    `prompts` (which prompts `instructions` are) is recorded in the manifest."""
    from hf_ext.eval.critic import CriticScore, reliability
    from hf_ext.generation import generate

    pool = OPEN_ENDED_POOL if critic is not None else FEW_SHOT_POOL

    def attempt_batch(batch: list[int], start: int, to_do: int) -> list[dict]:
        texts = [few_shot_prompt(instructions[i], random.Random(f"{settings.seed}-{i}"), settings.shots, pool)
                 for i in batch]
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        continuations = generate(
            model, tokenizer, encoded, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, seed=settings.seed + batch[0], desc=f"Generating SFT data {start}/{to_do}",
        )
        rows = []
        for i, (continuation,) in zip(batch, continuations):
            response, status = clean_response(continuation, settings.min_response_chars)
            verified = None
            if response is not None and verify is not None:
                verified = bool(verify(response, answers[i]))
                if not verified and not settings.keep_unverified:
                    status = "rejected_wrong"
            rows.append({"index": i, "status": status, "instruction": instructions[i], "response": response,
                         "verified": verified, "critic": None})
        if critic is not None:
            critic.reject_below(settings.critic_threshold, rows)
        return rows

    rows = resumable_attempts(output, len(instructions), settings.batch_size, attempt_batch,
                              matches=lambda row: row["instruction"] == instructions[row["index"]])
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
    if critic is not None:
        scores = [CriticScore(*r["critic"]) for r in rows if r.get("critic")]
        qc["critic"] = {"model": critic_model, "threshold": settings.critic_threshold,
                        **reliability(scores, settings.critic_threshold)}
    manifest = write_data_file(
        output, [{"instruction": r["instruction"], "response": r["response"]} for r in kept],
        generator="hf_ext.data.fewshot", qc=qc, source_model=source_model,
        parameters={**settings.__dict__, "format": "instruction", "prompts": prompts,
                    "checked_by": "critic" if critic is not None else "verifier" if verify is not None else "filters"},
    )
    partial_path(output).unlink()
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
                             answers=list(rows["answer"]), verify=TASKS[prompts.task].verify, source_model=model,
                             prompts=prompts.describe())


def generate_open_ended_sft_data(model: str, prompts: InstructionPrompts, output: str | Path,
                                 settings: GenerationSettings, critic_model: str | None = None,
                                 load_in_4bit: bool = False) -> dict:
    """`hf-ext data generate-sft --instructions FILE`: load `model` (and the critic, by default the same model) and
    write SFT rows for the file's training instructions, responses kept by the critic; returns the manifest."""
    from hf_ext.eval.critic import load_critic
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    instructions = list(prompts.rows()["prompt"])  # a file without its manifest fails here, before any model loads
    loaded = load_model(ModelArguments(model_name_or_path=model, load_in_4bit=load_in_4bit))
    tokenizer = load_tokenizer(model)
    critic_model = critic_model or model
    critic = load_critic(critic_model, settings.batch_size, (model, loaded, tokenizer))
    return generate_sft_data(loaded, tokenizer, instructions, output, settings, critic=critic, source_model=model,
                             critic_model=critic_model, prompts=prompts.describe())
