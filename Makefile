# Everything a fresh machine with only python3 needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
# torch and torchvision first, pinned to the tested versions. The default index's Linux wheels are CUDA builds,
# which bring the nvidia-* and triton packages (several GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes PyTorch's CPU-only wheels instead (e.g. `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
TORCH_STAMP := $(VENV)/.torch
DEMO_STAMP := $(VENV)/.demo
DEV_STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(TORCH_STAMP): Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	touch $@

# the demo needs the package and scikit-learn's digits only
$(DEMO_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) -e '.[demo]'
	touch $@

# tests and lint: every extra, pytest, ruff and timm
$(DEV_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) -e '.[dev]'
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/repvgg demo

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks

# the test files spread over one worker per core (each file's tests stay in one worker, sharing its fixtures), handed
# out in collection order: tests/conftest.py puts the longest files first
test: $(DEV_STAMP) lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) build .pytest_cache
