# Quick start: `make test` and `make demo` set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export BENTOML_DO_NOT_TRACK := True

.PHONY: test test-fast demo bench clean

# torch/torchvision are pinned to the pair this project is tested with; pip takes them from a local wheel
# cache where one exists. Everything else comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,openvino,ray]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

bench: $(VENV)/.installed
	$(PY) benchmarks/loss_speed.py

clean:
	rm -rf $(VENV) runs/demo
