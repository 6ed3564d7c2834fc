# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Spark's Python workers must be this venv's interpreter, not the system one.
export PYSPARK_PYTHON := $(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(BIN)/python

.PHONY: install demo test test-fast lint format package clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null || { echo "Java 17 is required (Spark runs on the JVM)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: an unpinned torch pulls GBs of CUDA wheels.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/listing-similarity demo --root demo

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# What spark-submit needs besides the job file: lib/, jobs/ and schemas/ as one --py-files zip.
package: install
	rm -rf dist && mkdir -p dist
	zip -qr dist/listing_similarity.zip lib jobs schemas -x '*/__pycache__/*'
	@echo "dist/listing_similarity.zip"

clean:
	rm -rf demo dist build *.egg-info .pytest_cache .ruff_cache
