# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Spark's Python workers must be this venv's interpreter, not the system one.
export PYSPARK_PYTHON := $(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(BIN)/python

.PHONY: install demo test test-fast lint format package quality test-cluster airflow-venv \
	airflow-check airflow-dags-test clean

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

# What spark-submit needs besides the job file: lib/, jobs/ and schemas/ as one --py-files zip
# (and a wheel) in dist/, and this venv as the executors' Python (--archives), cached under
# ~/.cache/listing-similarity/ until a dependency changes. Prints the paths as JSON.
package: install
	$(BIN)/python deploy/package.py --wheel --env

# The published lists vs every baseline on every data set found (generated marketplace, Inside
# Airbnb Albany and Barossa Valley, Online Retail): the whole pipeline per set, then hit-rate@10
# all/warm/cold, MRR@10 and a paired user-bootstrap interval vs the model per method.
# Last line: JSON {set: {method: {...}}}. E.g. QUALITY_ARGS='--sets albany'.
QUALITY_ARGS ?=
quality: install
	$(BIN)/python bench/quality.py $(QUALITY_ARGS)

# Every stage spark-submitted to a real standalone cluster (a master and two 1-core workers on
# 127.0.0.1) with the packaged environment; training as one DDP rank per executor. Fails unless
# shards, train and neighbours ran tasks on >= 2 executors (counted from each application's
# event log). Last line: JSON (master, executors, executors_by_stage, stage_seconds, ...).
test-cluster: install
	$(BIN)/python -m deploy.cluster_test

# Airflow lives in its own venv with its own pins (deploy/airflow/constraints.txt).
AIRFLOW_VENV := .venv-airflow
AIRFLOW_VERSION := 3.3.2
airflow-venv: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed: deploy/airflow/constraints.txt
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -c deploy/airflow/constraints.txt \
		apache-airflow==$(AIRFLOW_VERSION)
	touch $@

# The DAG loads without import errors and has the intended graph and policies.
airflow-check: install airflow-venv
	$(AIRFLOW_VENV)/bin/python deploy/airflow/check_dag.py

# Slower, not in CI: `airflow dags test` for one date, every task spark-submitting to local[2],
# on a tiny generated marketplace.
airflow-dags-test: install airflow-venv
	root=$$(mktemp -d) && \
	$(BIN)/python -m jobs.generate_sample_data --out $$root/inputs --listings 400 --users 300 \
		--events 12000 --days 30 --end-date 2026-11-21 --seed 3 >/dev/null && \
	LISTING_SIMILARITY_ROOT=$$root LISTING_SIMILARITY_PYTHON=$(BIN)/python \
	LISTING_SIMILARITY_MASTER='local[2]' \
	LISTING_SIMILARITY_GATE_RULES='model.full_lists_at_10 >= 0.99' \
	$(AIRFLOW_VENV)/bin/python deploy/airflow/check_dag.py --dags-test 2026-11-20 \
		--conf '{"k": 10, "epochs": 1, "batch_size": 256}' && rm -rf $$root

clean:
	rm -rf demo dist build *.egg-info .pytest_cache .ruff_cache
