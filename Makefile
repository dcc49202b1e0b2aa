# Two commands do everything on a fresh machine:
#   make train   install, generate the synthetic dataset on first use, train the default experiment
#   make test    install, run the test suite (what CI runs)
#   make gpu-kit download the wheels the GPU check kit carries to a GPU machine (benchmarks/gpu/README.md)
PYTHON ?= python3
VENV   ?= .venv
# CPU build by default (it is what CI and laptops want); GPU users: make TORCH="torch" ...
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install train test test-fast clean gpu-kit

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: install
	$(BIN)/python train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# needs a package registry and `packaging` in $(PYTHON); prints the total size (limit 60 MB)
gpu-kit:
	PYTHON=$(PYTHON) bash benchmarks/gpu/prepare.sh

clean:
	rm -rf outputs logs multirun wandb lightning_logs .pytest_cache
