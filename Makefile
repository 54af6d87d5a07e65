# Two set-up commands on a fresh machine: `make serve` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
# PyPI's Linux torch is its CUDA build (several GB of CUDA libraries); for the CPU-only one:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
HOST ?= 0.0.0.0
PORT ?= 8000
ARGS ?=

.PHONY: install serve test lint format bench demo-model clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installs torch only when none is importable (GPU users keep their CUDA build),
# then the project with its test extras. Re-runs only when pyproject changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/expertflow serve --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/offline.py
	$(BIN)/python benchmarks/offload.py
	$(BIN)/python benchmarks/prefix_cache.py
	$(BIN)/python benchmarks/mla_prefill.py

demo-model: install
	$(BIN)/python scripts/train_demo_model.py --out models/expertflow-demo

clean:
	rm -rf $(VENV) build *.egg-info
