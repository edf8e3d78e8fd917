"""Model cards whose usage code works as written: each card's snippet is run against the saved folder, with and
without hf_ext, and the model it loads reproduces the numbers the card states."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOLLM2, front_matter, run_without_hf_ext

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def usage_code(folder: Path) -> str:
    """The Python block of the card's `## Use` section."""
    section = (folder / "README.md").read_text().split("\n## Use\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run_with_hf_ext(cwd: Path, script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]


def without_hf_ext(code: str) -> str:
    """The snippet as a user without hf_ext runs it: no `import hf_ext`, the commented trust_remote_code line instead
    of the plain one."""
    lines = code.splitlines()
    remote = [line.removeprefix("# ") for line in lines if "trust_remote_code=True" in line and line.startswith("# model")]
    assert len(remote) == 1, code
    kept = [line for line in lines if not line.startswith("import hf_ext")]
    plain = next(i for i, line in enumerate(kept) if line.startswith("model = "))
    kept[plain] = remote[0]
    return "\n".join(kept) + "\n"


# ids a saved tokenizer can encode, as a prompt for comparing logits
LOGITS_PROBE = "import torch\nids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 7]]) % model.config.vocab_size\n"


@pytest.mark.parametrize("run", ["pretrained", "causal_mamba"])
def test_full_model_snippet_runs_with_and_without_hf_ext_and_gives_the_stated_perplexity(run, request, tmp_path):
    from hf_ext.data.corpus import load_text_corpus
    from hf_ext.recipe import saved_recipe

    folder: Path = request.getfixturevalue(run)
    code = usage_code(folder)
    assert f'from_pretrained("{folder.name}")' in code and "import hf_ext" in code, code
    stated = float(re.search(r"perplexity \*\*([0-9.]+)\*\*", (folder / "README.md").read_text()).group(1))
    saved = saved_recipe(folder)
    corpus = load_text_corpus(saved.setting("corpus"), validation_fraction=saved.setting("corpus_validation_fraction"))
    (tmp_path / "validation.json").write_text(json.dumps(list(corpus["validation"]["text"])))

    # as written, with hf_ext: the card's perplexity on its validation documents, blocks of the trained length
    run_with_hf_ext(folder.parent, code + LOGITS_PROBE + f"""
import json
from hf_ext.eval.perplexity import text_perplexity
texts = json.load(open({str(tmp_path / "validation.json")!r}))
result = text_perplexity(model, tokenizer, texts, block_size={saved.setting("max_length")}, max_tokens=10**9)
torch.save(model(ids).logits, {str(tmp_path / "with.pt")!r})
json.dump(result, open({str(tmp_path / "perplexity.json")!r}, "w"))
""")
    measured = json.loads((tmp_path / "perplexity.json").read_text())["perplexity"]
    recorded = json.loads((folder / "metrics.json").read_text())["validation"]["perplexity"]
    assert stated == float(f"{recorded:.2f}"), "the card states the run's validation perplexity"
    # Not to the last digit: the Trainer's evaluation averages per block, batch by batch (measured: 5e-5 relative on
    # the tiny mHC run); another checkpoint or a freshly initialised model is off by far more.
    assert measured == pytest.approx(recorded, rel=2e-4), (measured, recorded)

    # without hf_ext: the trust_remote_code line of the same card gives the same logits
    remote = without_hf_ext(code)
    assert "trust_remote_code=True" in remote and "hf_ext" not in remote.replace("without hf_ext", "")
    model_copy = tmp_path / folder.name
    shutil.copytree(folder, model_copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    run_without_hf_ext(tmp_path, remote + LOGITS_PROBE
                       + f"torch.save(model(ids).logits, {str(tmp_path / 'without.pt')!r})\nprint('ok')\n")
    torch.testing.assert_close(torch.load(tmp_path / "without.pt"), torch.load(tmp_path / "with.pt"), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_adapter_snippet_loads_the_4bit_base_as_trained_and_gives_the_stated_accuracy(main_job, tmp_path):
    """The QLoRA adapter of the main job: its card's snippet, with the base's Hub id replaced by a local copy (what
    its comment tells an offline user to do), loads the base in 4 bits as trained. The model it gives scores the
    card's accuracy and equals the model `hf-ext eval` scores; the same adapter on the unquantized base does not."""
    from hf_ext.loading import ModelArguments, gguf_to_folder, load_model, load_tokenizer, resolve_model

    out, _ = main_job
    code = usage_code(out)
    assert f'"{SMOLLM2_HUB_ID}",  # offline: the path of a local copy' in code and "BitsAndBytesConfig(" in code, code
    local_base = gguf_to_folder(resolve_model(SMOLLM2).location)  # the weights the adapter was trained on
    code = code.replace(f'"{SMOLLM2_HUB_ID}"', f'"{local_base}"')
    model_index = front_matter(out / "README.md")["model-index"][0]["results"][0]["metrics"][0]
    stated_accuracy = model_index["value"]

    run_with_hf_ext(out.parent, code + f"""
import json
from hf_ext.data.formats import detect_format
from hf_ext.data.tasks import TASKS
from hf_ext.eval.accuracy import evaluate_task
from hf_ext.recipe import saved_recipe, task_evaluation
settings, saved = task_evaluation({out.name!r}), saved_recipe({out.name!r})
task = TASKS[settings.task]
rows = task.splits(settings.train_size, settings.eval_size, settings.seed)["test"]
result = evaluate_task(model, tokenizer, task, rows, detect_format(rows.column_names, settings.data_format, task.name),
                       saved.setting("eval_batch_size"), saved.setting("eval_max_new_tokens"))
ids = tokenizer("What is 12 + 30? Reply with the number only.", return_tensors="pt").input_ids
torch.save(model(ids).logits, {str(tmp_path / "snippet.pt")!r})
json.dump(result, open({str(tmp_path / "accuracy.json")!r}, "w"))
""")
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert accuracy["num_examples"] == metrics["accuracy_after"]["num_examples"]
    assert round(accuracy["accuracy"], 4) == stated_accuracy == round(metrics["accuracy_after"]["accuracy"], 4)

    snippet_logits = torch.load(tmp_path / "snippet.pt")
    ids = load_tokenizer(str(out))("What is 12 + 30? Reply with the number only.", return_tensors="pt").input_ids
    with torch.no_grad():
        as_evaluated = load_model(ModelArguments(model_name_or_path=str(out), load_in_4bit=True)).eval()(ids).logits
        unquantized = load_model(ModelArguments(model_name_or_path=str(out), load_in_4bit=False)).eval()(ids).logits
    torch.testing.assert_close(snippet_logits, as_evaluated, rtol=1e-5, atol=1e-5)
    assert (snippet_logits - unquantized).abs().max() > 1e-2, "the card's quantization config is what makes it match"
