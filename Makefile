# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# pip warns once per package about this machine's local index folders; keep the rest of its output.
QUIET := 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

.PHONY: demo test lint bench serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the build that pip finds on local disk; install it first, on its own.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) torch==2.14.1 torchvision==0.29.1 $(QUIET)
	$(PIP) -e . $(QUIET)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]' $(QUIET)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/coalign demo

# After `make demo`: embed the world's held-out samples with the demo model, index them, serve the
# search page on http://127.0.0.1:8000 (embedding resumes and is skipped once finished).
serve: $(VENV)/.installed
	@test -d runs/demo || { echo "run 'make demo' first"; exit 1; }
	$(BIN)/coalign embed runs/demo heldout_samples runs/demo-index
	test -f runs/demo-index/index/report.json || $(BIN)/coalign index runs/demo-index
	$(BIN)/coalign serve runs/demo runs/demo-index

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
