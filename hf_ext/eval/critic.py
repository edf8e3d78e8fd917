"""A log-probability critic: is an instruction (or an instruction with its response) good, asked in both orders.

The critic model reads the instruction (and the response) and a yes/no question whose two answers are labelled A and
B. Every item is asked twice, once with A meaning yes and once with A meaning no, which cancels the model's
preference for a letter (the same device as the judge's swapped responses, `hf_ext.eval.judge`). Per order, the
probability of "yes" is P(yes label) / (P(yes label) + P(no label)) of the next token; the item's score is the mean
of the two orders, in [0, 1], and the two orders *agree* when both are on the same side of 0.5. A model that only
prefers a letter scores 0.5 with orders that disagree; that is what the reliability numbers measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hf_ext.errors import UserInputError
from hf_ext.eval.judge import LogprobJudge

INSTRUCTION_QUESTION = (
    "Here is an instruction that a user could give an assistant.\n\nInstruction: {instruction}\n\n"
    "Is this a clear, complete and answerable instruction? {a} means {first}, {b} means {second}. "
    "Answer with the letter A or B only."
)
PAIR_QUESTION = (
    "Here is an instruction and a response.\n\nInstruction: {instruction}\n\nResponse: {response}\n\n"
    "Does the response follow the instruction correctly and helpfully? {a} means {first}, {b} means {second}. "
    "Answer with the letter A or B only."
)


@dataclass(frozen=True)
class CriticScore:
    score: float  # P(yes), mean of both orders, in [0, 1]
    yes_as_a: float  # P(yes) with A meaning yes
    yes_as_b: float  # P(yes) with B meaning yes

    @property
    def agree(self) -> bool:
        """Both orders on the same side of 0.5: the critic decided, rather than preferred a letter."""
        return (self.yes_as_a > 0.5) == (self.yes_as_b > 0.5)


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise UserInputError(f"critic_threshold: a probability of 'yes' between 0 and 1 is expected, got {threshold!r}")
    return float(threshold)


class LogprobCritic(LogprobJudge):
    """Scores items with the judge's next-token A/B margins, asked in both label orders."""

    def score(self, instructions: list[str], responses: list[str] | None = None,
              desc: str = "Critic") -> list[CriticScore]:
        """One score per instruction, or per (instruction, response) when `responses` are given."""
        if responses is not None and len(responses) != len(instructions):
            raise ValueError(f"critic: {len(instructions)} instructions but {len(responses)} responses")
        template = INSTRUCTION_QUESTION if responses is None else PAIR_QUESTION
        items = [{"instruction": i} if responses is None else {"instruction": i, "response": r}
                 for i, r in zip(instructions, responses or instructions)]
        yes_first = [self._question_ids(template.format(**item, a="A", b="B", first="yes", second="no"))
                     for item in items]
        yes_second = [self._question_ids(template.format(**item, a="A", b="B", first="no", second="yes"))
                      for item in items]
        margins = self._letter_margins(yes_first + yes_second, desc)  # log P(A) - log P(B)
        as_a = [_sigmoid(m) for m in margins[: len(items)]]
        as_b = [_sigmoid(-m) for m in margins[len(items) :]]
        return [CriticScore((x + y) / 2, x, y) for x, y in zip(as_a, as_b)]

    def reject_below(self, threshold: float, rows: list[dict]) -> None:
        """Score the rows a data tool kept so far (status `kept...`; their `instruction`, with its `response` when
        the rows have one), record `critic` = [score, P(yes) with A meaning yes, with B meaning yes] on each, and
        mark those below `threshold` `rejected_critic`."""
        kept = [row for row in rows if row["status"].startswith("kept")]
        if not kept:
            return
        responses = [row["response"] for row in kept] if "response" in kept[0] else None
        for row, verdict in zip(kept, self.score([row["instruction"] for row in kept], responses)):
            row["critic"] = [verdict.score, verdict.yes_as_a, verdict.yes_as_b]
            if verdict.score < threshold:
                row["status"] = "rejected_critic"


def load_critic(reference: str, batch_size: int, loaded: tuple | None = None) -> LogprobCritic:
    """The critic model `reference`; `loaded` = (reference, model, tokenizer) of a model already in memory, reused
    when it is the same one."""
    if loaded is not None and loaded[0] == reference:
        return LogprobCritic(loaded[1], loaded[2], batch_size)
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    return LogprobCritic(load_model(ModelArguments(model_name_or_path=reference)), load_tokenizer(reference), batch_size)


def reliability(scores: list[CriticScore], threshold: float) -> dict:
    """How far the critic's verdicts can be trusted: the share of items whose two orders agree, and the share kept."""
    n = len(scores)
    return {
        "items": n,
        "orders_agree": sum(s.agree for s in scores) / n if n else None,
        "kept_at_threshold": sum(s.score >= threshold for s in scores) / n if n else None,
        "mean_score": sum(s.score for s in scores) / n if n else None,
        "mean_order_gap": sum(abs(s.yes_as_a - s.yes_as_b) for s in scores) / n if n else None,
    }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
