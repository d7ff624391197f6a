# Each target creates .venv and installs first. torch's CPU build (2.13.0, on local disk)
# goes in before the project, so pip never downloads a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install demo test test-all bench lint

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: install
	$(BIN)/sf-train +experiment=demo

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ''

bench: install
	$(BIN)/python -m scaleforge.bench.train_step

lint: install
	$(BIN)/ruff check .
