# Two commands do everything on a fresh machine:
#   make train   install, generate the synthetic dataset on first use, train the default experiment
#   make test    install, run the test suite (what CI runs)
#   make gpu-kit download the wheels the GPU check kit carries to a GPU machine (benchmarks/gpu/README.md)
#
# Which PyTorch: TORCH is the pip requirement, TORCH_INDEX the index it comes from (empty: pip's
# own index; on Linux x86_64 PyPI serves the CUDA build of torch, elsewhere a CPU build).
# PyTorch's own wheel indexes choose the build explicitly:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu      # CPU build (small download)
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu126    # CUDA 12.6 build
#   make install TORCH=torch                                           # newest torch of pip's index
# Changing TORCH or TORCH_INDEX reinstalls torch into the existing .venv.
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
TORCH_SPEC  := $(VENV)/.torch-spec
INSTALL_LOG := $(VENV)/install.log

.PHONY: install train test test-fast clean gpu-kit FORCE

install: $(VENV)/.installed

# rewritten only when the requested torch changes, so that .installed is remade then (and only then)
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH) $(TORCH_INDEX)" ]; then echo "$(TORCH) $(TORCH_INDEX)" > $@; fi

# torch first, from its index; reinstalled (also the same version from another index) when the spec changes
$(VENV)/.torch-installed: $(TORCH_SPEC)
	@echo "make: installing torch '$(TORCH)' from $(if $(TORCH_INDEX),$(TORCH_INDEX),pip's default index) into $(VENV); pip's output goes to $(INSTALL_LOG) (a first install downloads 0.2-3 GB and takes minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --upgrade pip >$(INSTALL_LOG) 2>&1 || { tail -20 $(INSTALL_LOG); exit 1; }
	@$(BIN)/pip install --force-reinstall --no-deps "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) >>$(INSTALL_LOG) 2>&1 || { tail -20 $(INSTALL_LOG); exit 1; }
	@$(BIN)/pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) >>$(INSTALL_LOG) 2>&1 || { tail -20 $(INSTALL_LOG); exit 1; }
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	@echo "make: installing melrecon and its dependencies into $(VENV) (editable, with the test tools and nilearn for the brain dataset)"
	@$(BIN)/pip install -e ".[dev,brain]" >>$(INSTALL_LOG) 2>&1 || { tail -20 $(INSTALL_LOG); exit 1; }
	@$(BIN)/python -c "import torch; print('make: installed torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')"
	@touch $@

train: install
	@echo "make: training the default run: $(BIN)/python train.py $(ARGS) (the first run generates its synthetic data; the run folder is printed at the end)"
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

FORCE:
