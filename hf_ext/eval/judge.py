"""A log-probability A/B judge: which of two responses answers a prompt better, asked in both orders.

The judge model sees the prompt and two responses labelled A and B and the question which is better; its preference
is the difference of the log-probabilities of the next token "A" and "B". Every comparison is asked twice with the
responses swapped, which cancels the judge's position bias: the margin for the first response is the mean of the
two orders, and the two orders *agree* when both prefer the same response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hf_ext.generation import eval_mode, left_pad

QUESTION = (
    "Here is an instruction and two responses.\n\nInstruction: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
    "Which response follows the instruction correctly and concisely? Answer with the letter A or B only."
)


@dataclass(frozen=True)
class Verdict:
    margin: float  # > 0: the first response is preferred (mean over both orders, in nats)
    first_order: float  # log P(first) - log P(second) with the first response shown as A
    second_order: float  # the same with the first response shown as B

    @property
    def agree(self) -> bool:
        return (self.first_order > 0) == (self.second_order > 0)

    @property
    def outcome(self) -> str:
        """'win', 'loss' or 'tie' (the orders disagree) for the first response."""
        if not self.agree:
            return "tie"
        return "win" if self.margin > 0 else "loss"


class LogprobJudge:
    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.letter_ids = [self._letter_id(letter) for letter in ("A", "B")]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"judge tokenizer splits {letter!r} into {len(ids)} tokens; it needs one")
        return ids[0]

    def _prompt_ids(self, prompt: str, a: str, b: str) -> list[int]:
        return self._question_ids(QUESTION.format(prompt=prompt, a=a, b=b))

    def _question_ids(self, question: str) -> list[int]:
        """`question` as the judge model reads it: a user turn of its chat template, or plain text ending in
        `Answer:` for a model without one."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = question + "\nAnswer:"
        return self.tokenizer(text, add_special_tokens=not self.tokenizer.chat_template)["input_ids"]

    @torch.no_grad()
    def _letter_margins(self, prompts: list[list[int]], desc: str) -> list[float]:
        """log P("A") - log P("B") as the next token after each prompt."""
        margins: list[float] = []
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            for start in tqdm(range(0, len(prompts), self.batch_size), desc=desc, unit="batch"):
                input_ids, attention_mask = left_pad(prompts[start : start + self.batch_size], pad_id)
                # Only the next-token logits: a full (batch, length, vocab) logits tensor would cost hundreds of MB.
                logits = self.model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=1
                ).logits[:, -1]
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                margins += (log_probs[:, self.letter_ids[0]] - log_probs[:, self.letter_ids[1]]).tolist()
        return margins

    def compare(self, triples: list[tuple[str, str, str]], desc: str = "Judging") -> list[Verdict]:
        """One verdict per (prompt, first, second): is `first` better than `second`?"""
        shown_first = [self._prompt_ids(p, a, b) for p, a, b in triples]
        shown_second = [self._prompt_ids(p, b, a) for p, a, b in triples]
        margins = self._letter_margins(shown_first + shown_second, desc)
        first, second = margins[: len(triples)], [-m for m in margins[len(triples) :]]
        return [Verdict((x + y) / 2, x, y) for x, y in zip(first, second)]


def judge_against_first(results: list[dict], scorer: LogprobJudge, judge: str) -> None:
    """Add `judge_vs_first` (wins, losses, ties, win rate, and the share of comparisons whose two orders agree) to
    every result after the first: `scorer`'s verdict on each model's responses against the first model's, prompt by
    prompt (results with `model`, `prompts` and `responses`, as `evaluate_task` returns; `judge` names the scorer)."""
    from collections import Counter

    base = results[0]
    for result in results[1:]:
        triples = [(p, r, b) for p, r, b in zip(base["prompts"], result["responses"], base["responses"])]
        outcomes = Counter(v.outcome for v in scorer.compare(triples, desc=f"Judging {result['model']} vs {base['model']}"))
        result["judge_vs_first"] = {
            "judge": judge, "against": base["model"], **{k: outcomes.get(k, 0) for k in ("win", "loss", "tie")},
            "win_rate": (outcomes.get("win", 0) + 0.5 * outcomes.get("tie", 0)) / len(triples),
            "orders_agree": (outcomes.get("win", 0) + outcomes.get("loss", 0)) / len(triples),
        }


def load_judge(reference: str, batch_size: int = 16) -> LogprobJudge:
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    return LogprobJudge(load_model(ModelArguments(model_name_or_path=reference)), load_tokenizer(reference), batch_size)
