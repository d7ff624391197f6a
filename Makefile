# Each target creates .venv and installs first. torch's CPU build (2.13.0, on local disk)
# goes in before the project, so pip never downloads a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install demo test test-all bench lint typecheck check

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

# mypy sees the package as installed: scaleforge/<folder> links to each top-level package
# folder (those with an __init__.py, as pyproject.toml maps them), so module names match.
PACKAGE_FOLDERS := $(filter-out tests,$(patsubst %/__init__.py,%,$(wildcard */__init__.py)))
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/scaleforge
	for folder in $(PACKAGE_FOLDERS); do ln -s "$(CURDIR)/$$folder" build/typecheck/scaleforge/; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p scaleforge

check: lint typecheck
