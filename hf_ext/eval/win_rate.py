"""Open-ended evaluation (`hf-ext eval --instructions FILE`): no verifier, so models are compared by a judge.

Each model answers the held-out instructions of a generated instruction file (greedy, one model in memory at a
time). The judge compares every model's answer with the first model's, in both orders (`judge_vs_first`: wins,
losses, ties where the orders disagree, win rate, and the share of comparisons it could decide), and the same model
as critic scores every answer on its own (`critic`: mean P(yes) and the share of answers whose two label orders
agree). Both reliability numbers are reported with the win rates: a judge whose orders rarely agree makes every win
rate close to 0.5 whatever the models do.
"""

from __future__ import annotations

import logging

from hf_ext.data.formats import FORMATS
from hf_ext.eval.accuracy import TaskEvaluation, generate_responses, peak_rss_mb

logger = logging.getLogger("hf_ext")


def evaluate_open_ended(models: list[tuple[str, TaskEvaluation]], instructions: list[str], judge: str,
                        batch_size: int = 16, max_new_tokens: int = 64, critic_threshold: float = 0.5) -> dict:
    """Responses of each `(model reference, settings)` to `instructions` (settings: how it is loaded and prompted),
    judged against the first model's, and scored by the critic. Returns `{"models": [...], "peak_rss_mb": ...}`."""
    from hf_ext.eval.critic import load_critic, reliability
    from hf_ext.eval.judge import judge_against_first
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer, release_memory

    results = []
    for reference, settings in models:
        data_format = FORMATS["instruction" if settings.data_format == "auto" else settings.data_format]
        tokenizer = load_tokenizer(reference)
        model = load_model(ModelArguments(model_name_or_path=reference, load_in_4bit=settings.load_in_4bit,
                                          dtype=settings.dtype))
        responses = generate_responses(model, tokenizer, instructions, data_format, batch_size, max_new_tokens,
                                       desc=reference)
        del model  # one model in memory at a time
        release_memory()
        results.append({"model": reference, "data_format": data_format.name, "num_examples": len(instructions),
                        "prompts": instructions, "responses": responses,
                        "samples": [{"prompt": p, "response": r} for p, r in list(zip(instructions, responses))[:5]]})
    critic = load_critic(judge, batch_size)
    if len(results) > 1:
        judge_against_first(results, critic, judge)
    for result in results:
        scores = critic.score(result["prompts"], result["responses"], desc=f"Critic on {result['model']}")
        result["critic"] = {"model": judge, **reliability(scores, critic_threshold)}
        logger.info("%s: critic mean P(yes) %.3f, orders agree on %.0f%%", result["model"],
                    result["critic"]["mean_score"], 100 * result["critic"]["orders_agree"])
    del critic
    release_memory()
    return {"models": results, "peak_rss_mb": peak_rss_mb()}
