# Two commands do all set-up on a fresh machine: `make train` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# The package needs torch>=2.5. Prefer 2.13.0: on this project's machines pip takes that release's CPU wheel
	# from local disk, where a bare range would pick a multi-GB CUDA build; elsewhere it is an ordinary release.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.5"
	$(BIN)/pip install -q -e ".[dev,hf,train,finetune]"
	touch $@

.PHONY: install train demo test lint bench
install: $(BIN)/.installed

train: install
	$(BIN)/switchformer train

demo: install
	$(BIN)/python benchmarks/bench_moe_layer.py --quick

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_moe_layer.py
