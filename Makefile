# engram-pretrain — set-up, demo, tests and the user-facing targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(PY) -m engram_pretrain.cli
PYTEST_ARGS ?=

.PHONY: setup demo test test-all gpu-check lint docs params clean export import lock test-latest
IMPORT_DATA ?= data/default

# Installs are reproducible (docs/dependencies.md): every package at the exact version of requirements.lock,
# which `make lock` regenerates from the ranges in pyproject.toml.
LOCK := requirements.lock
$(VENV)/.installed: $(LOCK) pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv and install everything from requirements.lock (CPU torch pinned)

TOOLS_VENV ?= .venv-tools
lock:  ## re-pin requirements.lock from pyproject.toml's ranges (newest releases inside them)
	[ -x $(TOOLS_VENV)/bin/pip-compile ] || { python3 -m venv $(TOOLS_VENV) && \
	  $(TOOLS_VENV)/bin/pip install --quiet pip-tools==7.6.2; }
	$(TOOLS_VENV)/bin/pip-compile --quiet --upgrade --extra dev --extra data --extra eval --strip-extras \
	  --allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host -o $(LOCK) pyproject.toml

# The next breaking release, found by us first: a separate venv with the newest releases, upper bounds of
# pyproject.toml lifted (torch stays pinned); LATEST_PINS adds requirements, e.g. LATEST_PINS=transformers==5.0.0
# tests the oldest supported release. Not part of CI.
LATEST_VENV ?= .venv-latest
LATEST_PINS ?=
LATEST_TESTS ?= tests/test_export.py tests/test_export_checkpoint.py tests/test_eval.py tests/test_training.py \
  tests/test_dependencies.py
test-latest:  ## export, eval and DeepSpeed tests against the newest releases (not in CI)
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	python3 tools/deps.py unbounded pyproject.toml > $(LATEST_VENV)/requirements-latest.txt
	$(LATEST_VENV)/bin/pip install --quiet --upgrade pip setuptools
	$(LATEST_VENV)/bin/pip install --quiet --upgrade -r $(LATEST_VENV)/requirements-latest.txt $(LATEST_PINS)
	$(LATEST_VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(LATEST_VENV)/bin/python tools/deps.py compare $(LOCK)
	ENGRAM_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LATEST_TESTS)

demo: setup  ## run the main job end to end on the bundled default
	$(PY) -m engram_pretrain.demo

# Training on this machine: NPROC processes (torchrun via launchers/local.sh; CPU: gloo + DeepSpeed's CPU
# accelerator). ARGS: dotted overrides and --resume auto|PATH|none, e.g. ARGS="train.steps=50 --resume none".
CONFIG ?= configs/tiny.yaml
NPROC ?= 2
ARGS ?=
.PHONY: train
train: setup  ## train CONFIG on NPROC local processes (resumes from the latest checkpoint by default)
	launchers/local.sh --nproc $(NPROC) train $(CONFIG) $(ARGS)

# SLURM (docs/slurm.md): render the sbatch script of CONFIG into its run directory and submit it. NODES and
# GPUS (per node; 0 = CPU nodes with gloo) default to the config's launcher section; ARGS: dotted overrides;
# SUBMIT_ARGS: --partition --account --time --qos --constraint --dependency --array --dry-run ...
NODES ?=
GPUS ?=
SUBMIT_ARGS ?=
.PHONY: submit
submit: setup  ## submit CONFIG to SLURM: make submit CONFIG=configs/moe-3b.yaml NODES=4 GPUS=8 SUBMIT_ARGS="--time 4:00:00"
	$(CLI) submit $(if $(NODES),--nodes $(NODES)) $(if $(GPUS),--gpus-per-node $(GPUS)) $(SUBMIT_ARGS) $(CONFIG) $(ARGS)

# Experiments (docs/experiments.md): PRESET = proxy | 3b | tiny; STEPS: train.steps of every run (default: the
# presets'); EXP_DATA: dataset directory; EXP_ARGS: --only, --repeat-seeds K, --nproc N, --slurm, --dry-run ...
PRESET ?= proxy
STEPS ?=
EXP_DATA ?= data/default
EXP_ARGS ?=
.PHONY: ablation allocation
ablation: setup  ## ablation set + layer sweep -> runs/ablation/PRESET (Figure 5): make ablation PRESET=proxy STEPS=1000
	$(CLI) experiment ablation --preset $(PRESET) --data $(EXP_DATA) $(if $(STEPS),--steps $(STEPS)) $(EXP_ARGS)

allocation: setup  ## sparsity allocation sweep -> runs/allocation/PRESET (Figure 3)
	$(CLI) experiment allocation --preset $(PRESET) --data $(EXP_DATA) $(if $(STEPS),--steps $(STEPS)) $(EXP_ARGS)

test: setup  ## what CI runs
	$(PY) -m ruff check engram_pretrain data_prep tests benchmarks tools
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

GPU_PYTHON ?= $(PY)
gpu-check:  ## on a GPU machine (GPU_PYTHON: a CUDA build of torch): CUDA ops build, gpu tests, 2-step bf16 run
	$(GPU_PYTHON) tools/gpu_check.py

test-all: setup  ## also the slow tests
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

docs: setup  ## regenerate docs/config_reference.md from the dataclass docstrings
	$(CLI) config-docs -o docs/config_reference.md

params: setup  ## parameter counts of every preset
	@for p in configs/*.yaml; do $(CLI) params $$p; done

# Data preparation (python -m data_prep --help). CORPUS: input specs (files, dirs, quoted globs, hf:NAME,
# `default` = KJV Bible + Python stdlib); TOKENIZER: bpe | deepseek-v4 | tokenizer/dataset dir | hub name.
CORPUS ?= default
TOKENIZER ?= bpe
VOCAB ?= 4096
OUT ?= data/default
DATA_ARGS ?=
.PHONY: data tokenizer

data: setup  ## tokenize + shard CORPUS into OUT (default corpus, BPE vocab 4096 -> data/default)
	$(PY) -m data_prep build $(CORPUS) --out $(OUT) --tokenizer $(TOKENIZER) --vocab-size $(VOCAB) $(DATA_ARGS)

tokenizer: setup  ## train (bpe) or install TOKENIZER into OUT/tokenizer with its Engram compression map
	$(PY) -m data_prep tokenizer $(CORPUS) --out $(OUT) --tokenizer $(TOKENIZER) --vocab-size $(VOCAB)

CHECKPOINT ?= runs/demo
EXPORT_OUT ?= runs/demo/hf
export: setup  ## export CHECKPOINT (run dir, checkpoint dir or step dir) as a Hugging Face folder EXPORT_OUT
	$(CLI) export $(CHECKPOINT) $(EXPORT_OUT) $(EXPORT_ARGS)

import: setup  ## HF folder HF_DIR -> RUN_DIR (config + step_0) to continue pretraining on IMPORT_DATA
	$(CLI) import --data $(IMPORT_DATA) $(IMPORT_ARGS) $(HF_DIR) $(RUN_DIR) $(IMPORT_OVERRIDES)

# lm-evaluation-harness on an export (docs/export.md): TASKS from eval_tasks/ (the offline set engram_local)
# or the harness's own tasks where the hub is reachable (EVAL_ARGS=--online).
EXPORT ?= runs/demo/hf
TASKS ?= engram_local
EVAL_ARGS ?=
.PHONY: eval
eval: setup  ## lm-eval on EXPORT: make eval EXPORT=runs/demo/hf TASKS=engram_local -> EXPORT/eval/
	$(CLI) eval $(EXPORT) --tasks $(TASKS) $(EVAL_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TOOLS_VENV) runs .pytest_cache
