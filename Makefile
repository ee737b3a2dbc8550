# Setup, demo, tests and lint. The venv lives in .venv; torch (CPU build) goes in first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-python setup-browser demo demo-model demo-reranker test test-slow lint format proto clean

setup: setup-python setup-browser

setup-python: $(BIN)/cir

$(BIN)/cir: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(BIN)/cir

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
setup-browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

demo: setup
	$(BIN)/cir demo

# The demo model: generate the world, train sprc-small from scratch (at most 85 min on 2 CPU
# cores, both torch threads: keep the machine otherwise idle), evaluate, write the card; then
# the second stage (make demo-reranker, ~17 min) on top of it.
# The committed model ran 6200 of the 7400 steps in the 85-min budget (~0.82 s/step; the cosine
# schedule was at 6 % of its peak lr); a machine at 0.6 s/step runs all 7400 in ~75 min.
TRAIN_FLAGS ?= --init sprc-small --batch-size 64 --max-steps 7400 --lr 8e-4 --warmup 0.03 \
	--train-vit --group-by-reference --reference-negatives --caption-loss 1.0 --hard-negatives 1 \
	--num-threads 2 \
	--seed 0 --save-every 200 --val-limit 300 --val-gallery 1000 --time-budget-min 85 \
	--weights-dtype float16 --precision bf16
demo-model: setup-python
	test -f data/shapes/gallery.jsonl || $(BIN)/cir data shapes --out data/shapes --seed 0 --overwrite
	$(BIN)/cir train --data data/shapes --out runs/sprc-shapes $(TRAIN_FLAGS)
	printf '%s\n' "cir data shapes --out data/shapes --seed 0" \
	  "cir train --data data/shapes --out runs/sprc-shapes $(TRAIN_FLAGS)" \
	  "python -m retrieval.model_card --run runs/sprc-shapes --data data/shapes --out models/sprc-shapes" \
	  > runs/sprc-shapes/commands.txt
	$(BIN)/python -m retrieval.model_card --run runs/sprc-shapes --data data/shapes \
	  --out models/sprc-shapes --commands-file runs/sprc-shapes/commands.txt
	$(MAKE) demo-reranker

# The second stage on the committed first stage (models/sprc-shapes): features of the train
# split and mining once (~10 min), then at most 55 min of training on 2 cores (10000 steps took
# 32 min), then the first-stage weight (alpha) fitted on the val split at the serving K (~30 s,
# retrieval/rerank_calibrate.py); the card gains the first-stage-alone and re-ranked figures of
# one run.
RERANK_THREADS ?= 2
RERANK_FLAGS ?= --features patches --width 64 --max-steps 10000 --batch-size 32 --negatives 15 --in-batch 8 \
	--mine-k 50 --lr 5e-4 --seed 0 --num-threads $(RERANK_THREADS) --val-every 2500 \
	--time-budget-min 55
demo-reranker: setup-python
	test -f data/shapes/gallery.jsonl || $(BIN)/cir data shapes --out data/shapes --seed 0 --overwrite
	$(BIN)/cir train-reranker --data data/shapes --encoder models/sprc-shapes \
	  --out runs/sprc-shapes-rerank $(RERANK_FLAGS)
	printf '%s\n' "cir train-reranker --data data/shapes --encoder models/sprc-shapes --out runs/sprc-shapes-rerank $(RERANK_FLAGS)" \
	  "python -m retrieval.model_card --reranker-only --reranker-run runs/sprc-shapes-rerank --data data/shapes --out models/sprc-shapes" \
	  > runs/sprc-shapes-rerank/commands.txt
	$(BIN)/python -m retrieval.model_card --reranker-only --reranker-run runs/sprc-shapes-rerank \
	  --data data/shapes --out models/sprc-shapes \
	  --reranker-commands-file runs/sprc-shapes-rerank/commands.txt

test: setup
	$(BIN)/python -m pytest -q

# Tests marked `slow` (kept out of `make test`); exit code 5 = none are marked at the moment.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

lint: setup-python
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy retrieval indexer server frontend cir

format: setup-python
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: setup-python
	$(BIN)/python -m server.gen_proto

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
