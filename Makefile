# Two commands: `make demo` and `make test`. Both set up .venv on first use (torch CPU wheel first, so the
# project's torch requirement is already satisfied and pip never pulls a multi-GB CUDA build).
# `make test-min` runs the default suite against the oldest versions pyproject.toml allows (see there).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python
TORCH := torch==2.13.0
# The lower bounds test-min installs, read from pyproject.toml so the two cannot drift apart. torch is not in
# the list: its floor is the CPU wheel above (older CPU wheels are not on the configured indexes). pyarrow's floor
# comes from the dev extra (the hf: source's tests).
MIN_PACKAGES := onnx onnxruntime transformers torch-pruning pyarrow

.PHONY: demo test test-gpu test-min

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[hf,dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/compress demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# GPU tests only (each stage on CUDA, DDP over nccl); they skip, with the reason, on a machine without CUDA
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu -rs

$(VENV_MIN)/.installed: pyproject.toml scripts/min_pins.py
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -q $(TORCH)
	pins="$$($(PYTHON) scripts/min_pins.py $(MIN_PACKAGES))" && $(PY_MIN) -m pip install -q -e '.[hf,dev]' $$pins
	touch $@

test-min: $(VENV_MIN)/.installed
	$(PY_MIN) -m pip list --format=freeze | grep -i -E '^(torch|onnx|onnxruntime|onnxscript|transformers|torch.pruning|numpy)=='
	$(PY_MIN) -m pytest -q -m "not slow" -p no:cacheprovider
