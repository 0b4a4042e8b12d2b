# Two commands: `make demo` and `make test`. Both set up .venv on first use (torch CPU wheel first, so the
# project's `torch>=2.2` requirement is already satisfied and pip never pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-gpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/compress demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# GPU tests only (each stage on CUDA, DDP over nccl); they skip, with the reason, on a machine without CUDA
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu -rs
