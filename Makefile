# Atelier: `make train` installs and runs the main job; `make test` installs and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?= model=ddpm data=mnist
# torch/torchvision pinned to a pair that works together (CUDA builds; they also run on CPU)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install train test test-fast lint bench clean

$(BIN)/atelier-installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,sd,sweep,cluster]"
	touch $@

install: $(BIN)/atelier-installed

train: install
	$(BIN)/python train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
