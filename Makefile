# peftvision developer tasks. Everything runs inside .venv, which `make venv` creates and keeps
# in sync with pyproject.toml (the stamp file is re-made whenever pyproject.toml is newer).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftvision-installed
DOCS_STAMP := $(VENV)/.peftvision-docs-installed
# pytest-xdist workers; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-slow lint build release docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[all,dev]"
	touch $@

# The main job: every classification method on a generated dataset with tiny timm models,
# offline (no model hub), ending with the results table and plots in runs/demo/.
demo: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks demo

# The default suite: every test but those marked slow (full-size models, the whole demo, long
# end-to-end runs). One torch thread per xdist worker so 2 workers don't oversubscribe the cores
# (override with OMP_NUM_THREADS=...). `make test-slow` runs the slow ones; CI runs both.
PYTEST := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -q

test: venv
	$(PYTEST) -m "not slow"

test-slow: venv
	$(PYTEST) -m slow

lint: venv
	$(BIN)/ruff check .

build: venv
	$(BIN)/python -m build

# A release in one step: the version lives only in peftvision/__init__.py (set it and add its
# CHANGELOG.md section first); builds sdist + wheel and checks their metadata for PyPI.
# Then: $(BIN)/twine upload dist/*
release: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist/
	$(BIN)/twine check --strict dist/*

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -e ".[docs]"
	touch $@

# The docs site (mkdocs-material + mkdocstrings) into site/ (git-ignored); --strict turns every
# warning (broken link, page missing from the nav, unresolvable ::: reference) into a failure.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf build dist site .pytest_cache .ruff_cache .hypothesis *.egg-info
