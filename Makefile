# Quick start: `make test` and `make demo` set up .venv on first use, then run. `make docs` builds the manual.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export BENTOML_DO_NOT_TRACK := True

.PHONY: test test-fast docs demo bench clean

# torch/torchvision are pinned to the pair this project is tested with; pip takes them from a local wheel
# cache where one exists. Everything else comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,openvino,docs,ray,cvat]"
	touch $@

# The docs build first: --strict fails on a broken link, a missing anchor or a page left out of the nav
# (not with --quiet, which hides the warnings --strict counts).
test: docs
	$(PY) -m pytest

docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

bench: $(VENV)/.installed
	$(PY) benchmarks/loss_speed.py

clean:
	rm -rf $(VENV) runs/demo site
