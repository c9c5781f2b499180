# edge-gemma. `make setup` builds .venv in the checkout (torch 2.13.0 CPU first); every other target calls it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.edge-gemma-installed

VARIANT ?=
CHECKPOINT ?=
QUANT ?= int4
BACKENDS ?=
OUT ?=
CONTEXT ?= 4096

.PHONY: setup test demo verify quantize export bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) $(PYTHON)
	touch $(STAMP)

# The README's test command. `.ci/run` calls exactly this.
test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# The README's main command: the main job on the embedded default model.
demo: setup
	$(VENV)/bin/edge-gemma demo

verify: setup
	$(VENV)/bin/edge-gemma verify $(if $(CHECKPOINT),$(CHECKPOINT),default)

quantize: setup
	$(VENV)/bin/edge-gemma quantize $(if $(CHECKPOINT),$(CHECKPOINT),default) --recipe $(QUANT) --out $(if $(OUT),$(OUT),artifacts/$(if $(CHECKPOINT),$(notdir $(CHECKPOINT)),default)-$(QUANT)-quantized)

bench: setup
	$(PY) benchmarks/bench_load.py

clean-venv:
	rm -rf $(VENV)
