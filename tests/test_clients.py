"""Real clients of a pushed-and-pulled hf_ext model: transformers' `pipeline("text-generation")` and EleutherAI's
lm-evaluation-harness (`lm_eval`, its `HFLM` with `trust_remote_code=True`).

The tiny `mhc_lm` and causal `mamba_ssm` runs are pushed with `hf-ext push` to the Hub stand-in
(`tests/hub_stand_in.py`) and pulled by repo id in fresh processes where `import hf_ext` fails, so the clients run the
modeling code saved in the repository. What they produce is compared with hf_ext's own model loaded from the pushed
folder: greedy `generate` text, and log-likelihoods computed here from the model's logits.

The lm-eval tasks are the ones `docs/lm_eval.md` shows: `tests/lm_eval_task/*.yaml` over local JSONL files (read by
`datasets`' `json` builder, so nothing is downloaded).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_ext  # noqa: F401  (registers the architectures for the reference models loaded here)
from tests.conftest import REPO, hub_env, push, run_without_hf_ext
from tests.hub_stand_in import HubStandIn

USER = HubStandIn.user
TASK_DIR = REPO / "tests" / "lm_eval_task"
TASKS = ["hf_ext_python_facts", "hf_ext_arithmetic"]  # output types: multiple_choice (log-likelihood), generate_until
PROMPTS = ["Return the number of items in", "def read_file(path):"]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def repos(hub, tmp_path_factory, pretrained, causal_mamba) -> dict[str, Path]:
    """Repo id on the stand-in -> the run folder pushed there."""
    work = tmp_path_factory.mktemp("clients")
    pushed = {f"{USER}/clients-mhc": pretrained, f"{USER}/clients-mamba": causal_mamba}
    for repo_id, folder in pushed.items():
        result = push(hub, work, folder, repo_id)
        assert result.returncode == 0, result.stderr[-3000:]
    return pushed


def reference(folder: Path):
    """hf_ext's own model and tokenizer, loaded from the run folder (the registered classes, no remote code)."""
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The text `generate` adds to `prompt` greedily (special tokens dropped, as pipelines and lm-eval decode)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's logits, with lm-eval's split of the tokens: the whole text is
    encoded once and the continuation is what follows the context's tokens."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    logprobs = torch.log_softmax(logits[len(context_ids) - 1:-1].float(), dim=-1)
    targets = torch.tensor(whole[len(context_ids):])
    return logprobs.gather(-1, targets[:, None]).sum().item()


def run_pulled(hub, tmp_path: Path, body: str) -> dict:
    """Run `body` where hf_ext is not importable, pulling from the stand-in; it writes its results to the JSON file
    `out` (a name defined for it) and prints `ok`."""
    out = tmp_path / "results.json"
    run_without_hf_ext(tmp_path, f"out = {str(out)!r}\n" + body, env=hub_env(hub, tmp_path))
    return json.loads(out.read_text())


# ---------------------------------------------------------------- pipeline("text-generation")

PIPELINE_WITHOUT_HF_EXT = """
import json
from transformers import pipeline

results = {}
for repo in REPOS:
    generator = pipeline("text-generation", model=repo, trust_remote_code=True)
    texts = [generator(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"]
             for prompt in PROMPTS]
    results[repo] = {"module": type(generator.model).__module__, "texts": texts}
with open(out, "w") as f:
    json.dump(results, f)
print("ok")
"""


def test_pipeline_of_a_pulled_model_without_hf_ext_gives_the_greedy_generate_text(hub, repos, tmp_path):
    setup = f"REPOS = {list(repos)!r}\nPROMPTS = {PROMPTS!r}\nMAX_NEW_TOKENS = {MAX_NEW_TOKENS}\n"
    pulled = run_pulled(hub, tmp_path, setup + PIPELINE_WITHOUT_HF_EXT)
    for repo_id, folder in repos.items():
        assert pulled[repo_id]["module"].startswith("transformers_modules.")  # the repository's own code ran
        model, tokenizer = reference(folder)
        expected = [prompt + greedy_text(model, tokenizer, prompt, MAX_NEW_TOKENS) for prompt in PROMPTS]
        assert all(len(text) > len(prompt) for text, prompt in zip(expected, PROMPTS))  # something was generated
        assert pulled[repo_id]["texts"] == expected, repo_id


def test_pipeline_with_hf_ext_importable_gives_the_greedy_generate_text(repos):
    for folder in repos.values():
        generator = pipeline("text-generation", model=str(folder))
        assert type(generator.model).__module__.startswith("hf_ext.models.")  # the registered class, no remote code
        model, tokenizer = reference(folder)
        for prompt in PROMPTS:
            output = generator(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_full_text=False)
            assert output[0]["generated_text"] == greedy_text(model, tokenizer, prompt, MAX_NEW_TOKENS)


# ---------------------------------------------------------------- lm-evaluation-harness

LM_EVAL_WITHOUT_HF_EXT = """
import json, os
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

os.chdir(TASK_DIR)  # the task YAMLs name their data files relative to the working directory
task_manager = TaskManager(include_path=TASK_DIR)
results = {}
for repo in REPOS:
    for batch_size in (1, 4):
        lm = HFLM(pretrained=repo, trust_remote_code=True, batch_size=batch_size, device="cpu")
        output = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager, log_samples=True)
        results[f"{repo} {batch_size}"] = {
            "module": type(lm.model).__module__,
            "samples": {task: [{"arguments": sample["arguments"], "resps": sample["resps"]} for sample in samples]
                        for task, samples in output["samples"].items()},
        }
with open(out, "w") as f:
    json.dump(results, f, default=str)
print("ok")
"""


@pytest.fixture(scope="module")
def lm_eval_runs(hub, repos, tmp_path_factory) -> dict:
    """lm-eval's samples for every pulled repo and batch size 1 and 4, keyed "<repo> <batch size>"."""
    setup = f"REPOS = {list(repos)!r}\nTASKS = {TASKS!r}\nTASK_DIR = {str(TASK_DIR)!r}\n"
    return run_pulled(hub, tmp_path_factory.mktemp("lm_eval"), setup + LM_EVAL_WITHOUT_HF_EXT)


def scored(samples: list[dict]) -> dict[tuple[str, str], float]:
    """(context, continuation) -> lm-eval's log-likelihood, from a log-likelihood task's samples."""
    return {tuple(arguments[:2]): float(resp[0][0])
            for sample in samples for arguments, resp in zip(sample["arguments"], sample["resps"])}


def generated(samples: list[dict]) -> dict[str, str]:
    """context -> lm-eval's raw generation, from a generate_until task's samples."""
    return {sample["arguments"][0][0]: sample["resps"][0][0] for sample in samples}


def test_lm_eval_log_likelihoods_are_the_same_with_batch_size_1_and_4(lm_eval_runs, repos):
    for repo_id in repos:
        one, four = lm_eval_runs[f"{repo_id} 1"], lm_eval_runs[f"{repo_id} 4"]
        assert one["module"].startswith("transformers_modules.")  # lm-eval ran the repository's own code
        single, batched = scored(one["samples"]["hf_ext_python_facts"]), scored(four["samples"]["hf_ext_python_facts"])
        assert len(single) == 18 and single.keys() == batched.keys()  # 6 questions x 3 choices
        difference = max(abs(single[key] - batched[key]) for key in single)
        assert difference < 1e-4, (repo_id, difference)
        # greedy generation of left-padded batches gives what one prompt at a time gives
        assert generated(four["samples"]["hf_ext_arithmetic"]) == generated(one["samples"]["hf_ext_arithmetic"])


def test_lm_eval_scores_are_the_models_own_log_likelihoods_and_greedy_generations(lm_eval_runs, repos):
    for repo_id, folder in repos.items():
        model, tokenizer = reference(folder)
        samples = lm_eval_runs[f"{repo_id} 4"]["samples"]
        for (context, continuation), value in scored(samples["hf_ext_python_facts"]).items():
            assert value == pytest.approx(loglikelihood(model, tokenizer, context, continuation), abs=1e-4)
        for context, text in generated(samples["hf_ext_arithmetic"]).items():
            assert text == greedy_text(model, tokenizer, context, 8).split("\n")[0]  # max_gen_toks 8, until "\n"


def test_lm_eval_command_line_scores_a_pulled_model(hub, repos, tmp_path):
    """The command `docs/lm_eval.md` gives, run from the task folder (hf_ext installed but never imported)."""
    repo_id, folder = next(iter(repos.items()))
    result = subprocess.run(
        ["lm_eval", "--model", "hf", "--model_args", f"pretrained={repo_id},trust_remote_code=True", "--device", "cpu",
         "--tasks", ",".join(TASKS), "--include_path", ".", "--batch_size", "4", "--log_samples",
         "--output_path", str(tmp_path / "results")],
        cwd=TASK_DIR, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hf_ext_python_facts" in result.stdout and "hf_ext_arithmetic" in result.stdout  # the results table
    (samples_file,) = (tmp_path / "results").rglob("samples_hf_ext_python_facts_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 6
    model, tokenizer = reference(folder)
    for sample in samples:
        for arguments, resp in zip(sample["arguments"].values(), sample["resps"]):
            expected = loglikelihood(model, tokenizer, arguments["arg_0"], arguments["arg_1"])
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-4)
