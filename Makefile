# `make demo` and `make test` each set up .venv on a fresh machine (pip takes torch from this
# machine's disk) and then run. Nothing is downloaded at run time.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DISABLE_DOCKER_CPU_WARNING := 1
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1

.PHONY: venv test lint format demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/fractalgen demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache .ruff_cache
