# engram-pretrain — set-up, demo, tests and the user-facing targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(PY) -m engram_pretrain.cli
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint docs params clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv and install everything (CPU torch pinned)

demo: setup  ## run the main job end to end on the bundled default
	$(PY) -m engram_pretrain.demo

test: setup  ## what CI runs
	$(PY) -m ruff check engram_pretrain tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup  ## also the slow tests
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

docs: setup  ## regenerate docs/config_reference.md from the dataclass docstrings
	$(CLI) config-docs -o docs/config_reference.md

params: setup  ## parameter counts of every preset
	@for p in configs/*.yaml; do $(CLI) params $$p; done

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
