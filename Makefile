# One venv for everything; `make demo` and `make test` create it on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: on this project's machines pip finds it on local disk. Elsewhere,
# e.g.: make setup TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# Pythons of other environments holding anchors (benchmarks/anchor_worker.py), e.g.
# make bench ANCHOR_PYTHONS="/tmp/stenv/bin/python /tmp/aeenv/bin/python"
ANCHOR_PYTHONS ?=
ANCHORS := $(foreach py,$(ANCHOR_PYTHONS),--anchor-python $(py))

.PHONY: setup demo test test-all lint bench bench-mpnet clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python -m exporters.demo

# The fast default suite (CI); `slow` cases run in test-all.
test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/compare.py --model minilm $(ANCHORS)

bench-mpnet: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/compare.py --model mpnet $(ANCHORS)

clean:
	rm -rf build .pytest_cache .ruff_cache
