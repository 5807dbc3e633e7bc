# Two commands on a fresh machine:
#   make repro   set up, then run the whole pipeline (dvc repro) on real MNIST
#   make test    set up (Python venv and system packages), lint, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
UV_VERSION := 0.13.8
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1
STAMP := $(VENV)/.installed

.PHONY: setup repro test test-fast lint test-offline system-deps lock params ui serve predict sweep bench \
        plots-template team-up team-down team-status team-env

setup: $(STAMP)

# The venv holds exactly requirements.lock (hashes checked), plus this project (editable).
$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip sync --quiet --compile-bytecode --python $(VENV)/bin/python --require-hashes requirements.lock
	$(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python --no-deps -e .
	touch $@

# Chromium for the UI tests; npm for the npm mirror of the fetch stage; PostgreSQL for the
# team stack's tests.
system-deps:
	@bash scripts/system-deps.sh

repro: setup
	dvc repro

# Three workers on two cores: the whole-workflow tests spend part of their time waiting on
# DVC, PostgreSQL, servers and the browser, and a third worker runs in those gaps (the same
# tests on a 2-core AMD EPYC: 14 min 35 s with three workers, 15 min 49 s to 16 min 32 s in
# CI with two). Whole modules, longest first (tests/helpers/suite_order.py).
TEST_WORKERS := 3
test: setup system-deps lint
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Likely bugs and style (pyproject.toml's [tool.ruff.lint]), formatting (`ruff format` fixes
# it) and the library's types ([tool.mypy]); `make test` runs it first.
LINTED := src tests pipelines benchmarks scripts examples
lint: setup
	ruff check $(LINTED)
	ruff format --check $(LINTED)
	mypy

# The developer's loop, about a minute on 2 cores: config, data and the corrupted suite, gate
# rules, scores, calibration, cards, imaging, the request guard, the CLI, the tracking
# helpers, the drift tests and accuracy estimates. No training, no servers, no browser;
# `make test` runs everything.
FAST_TESTS := tests/config tests/data tests/docs tests/evaluation tests/serve tests/tracking \
              tests/monitoring \
              tests/pipeline/test_dvc_graph.py tests/training/test_calibration.py tests/test_cli.py \
              tests/team/test_credentials.py tests/test_suite_order.py
test-fast: setup
	pytest -n 2 -m "not slow and not browser and not team and not network" $(FAST_TESTS)

test-offline: setup
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not network"

# Regenerate the lock after editing requirements.in.
lock:
	$(VENV)/bin/uv pip compile requirements.in --generate-hashes --python-version 3.11 \
	    --python-platform x86_64-unknown-linux-gnu -o requirements.lock

# Recompose params.yaml from conf/ exactly as `dvc exp run` does.
params: setup
	python -m mnist_pipeline.config.compose

# The MLflow UI on this repository's tracking store: make ui [ARGS="--port 5050"]
ui: setup
	python -m mnist_pipeline.serve.ui $(ARGS)

# The champion over REST on 127.0.0.1:5001: make serve [ARGS="--model-uri models:/mnist-classifier/3"]
serve: setup
	python -m mnist_pipeline.serve.model_server $(ARGS)

# The champion's digit for each picture: make predict ARGS="three.png photo.jpg"
predict: setup
	mnist-predict $(ARGS)

# Bayesian search over conf/sweep/$(SPACE).yaml; writes conf/experiment/<sweep.name>.yaml.
#   make sweep SPACE=cnn ARGS="sweep.n_trials=30"
SPACE ?= mlp
sweep: setup
	python pipelines/sweep.py +sweep=$(SPACE) $(ARGS)

# Train speed of the train stage vs the tutorial script, and a cold `dvc repro` (~5 min).
# A quick look: make bench ARGS="--epochs 2 --skip-repro"
bench: setup
	python benchmarks/train_speed.py $(ARGS)

# The page `dvc plots show` fills (.dvc/plots.html, named in .dvc/config), with vega,
# vega-lite and vega-embed inlined from pinned npm tarballs (needs npm) so plots draw offline.
plots-template: setup
	python scripts/plots_template.py

# The team stack in .team/: PostgreSQL, an MLflow server on it, a DVC remote (docs/team.md).
#   make team-up [ARGS="--port 5050 --postgres-port 5433"]; then: eval "$$(make -s team-env)"
#   make team-up ARGS=--network: logins, roles, TLS; mnist-pipeline team user add NAME --role R
team-up: setup
	python -m mnist_pipeline.team up $(ARGS)

team-down: setup
	python -m mnist_pipeline.team down $(ARGS)

team-status: setup
	python -m mnist_pipeline.team status $(ARGS)

team-env: setup
	@python -m mnist_pipeline.team env $(ARGS)
