# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

demo: $(VENV)/.installed
	$(BIN)/nextlong-synth --config configs/synth/demo.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

bench: $(VENV)/.installed
	$(BIN)/python bench/synth.py

clean:
	rm -rf out .pytest_cache .hypothesis
