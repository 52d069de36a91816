# Everything a fresh machine needs, from nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's CPU build of torch; never let pip resolve an unpinned torch
# (it would pull several GB of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test demo info clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.dev: pyproject.toml setup.py $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.demo: pyproject.toml setup.py $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.demo
	$(BIN)/python examples/quickstart.py

info: $(VENV)/.dev
	$(BIN)/fastmask info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
