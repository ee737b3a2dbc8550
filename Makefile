# Setup, demo, tests and lint. The venv lives in .venv; torch (CPU build) goes in first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-python setup-browser demo test test-slow lint format proto clean

setup: setup-python setup-browser

setup-python: $(BIN)/cir

$(BIN)/cir: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/cir

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
setup-browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

demo: setup
	$(BIN)/cir demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup-python
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy retrieval indexer server frontend

format: setup-python
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: setup-python
	$(BIN)/python -m server.gen_proto

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
