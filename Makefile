# memetrain: `make demo` runs the main job (the demo sweep) on SynthMemes, `make test` the whole suite.
# Both create (or update) the virtual environment in .venv first. `make bench` runs the CPU
# benchmarks and appends their tables to BENCHMARKS.md (benchmarks/README.md).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# pytest-xdist workers of `make test` and `make test-fast`: one per core of the 2-core CI machine
# (each test file runs whole on one worker; TEST_WORKERS=0 runs the suite in this process)
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint bench clean

install: $(INSTALLED)

$(INSTALLED): setup.cfg setup.py pyproject.toml memetrain/data/_jpeg_rows.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/python launcher/pack.py source=synth count=8000 image_size=224 unlabeled=4000 output=shards/synth
	$(BIN)/python launcher/sweep.py +sweep=demo launcher=local

test: $(INSTALLED)
	$(BIN)/pytest -n $(TEST_WORKERS)

test-fast: $(INSTALLED)
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not slow"

lint: $(INSTALLED)
	$(BIN)/ruff check memetrain launcher tests benchmarks
	$(BIN)/ruff format --check memetrain launcher tests benchmarks

bench: $(INSTALLED)
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/collector.py

clean:
	rm -rf $(VENV) runs outputs
