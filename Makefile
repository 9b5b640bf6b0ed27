# hoptune: every target sets itself up in .venv (created on first use).
#   make test   install (CUDA extension compiled when nvcc is present) and run the tests
#   make demo   install and run the built-in demo (tiny model, synthetic task, CPU or GPU)
#   make lint   ruff (lint + format check) and clang-format on csrc/
#   make wheel  build a wheel into dist/
#   make gpu    build + GPU tests + benchmarks on an H200 (bench/run_gpu.sh; OUT=dir)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
HOPTUNE_BUILD_CUDA ?= AUTO
export HOPTUNE_BUILD_CUDA
BUILD_DEPS := 'scikit-build-core>=0.10' 'pybind11>=2.12' 'nvidia-cutlass==4.2.0.0' 'cmake>=3.24' ninja
STAMP := $(VENV)/.hoptune-installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: test demo lint format wheel gpu clean setup

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (CPU build where no CUDA build is wanted), so nothing later pulls another one
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	touch $@

# the install is redone when HOPTUNE_BUILD_CUDA changes (a file named after its value)
BUILD_MODE := $(VENV)/.build-cuda-$(HOPTUNE_BUILD_CUDA)
$(BUILD_MODE): | $(BIN)/python
	rm -f $(VENV)/.build-cuda-*
	touch $@

$(STAMP): $(VENV)/.torch $(BUILD_MODE) $(SOURCES)
	$(BIN)/python -m pip install -q $(BUILD_DEPS)
	@echo "installing hoptune (HOPTUNE_BUILD_CUDA=$(HOPTUNE_BUILD_CUDA): where nvcc is found the CUDA extension compiles, some minutes on 2 cores, without output)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/hoptune demo

lint: $(BIN)/python
	$(BIN)/python -m pip install -q "ruff>=0.6" "clang-format>=18"
	$(BIN)/ruff check python tests bench
	$(BIN)/ruff format --check python tests bench
	$(BIN)/clang-format --dry-run --Werror $$(find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp')

format: $(BIN)/python
	$(BIN)/python -m pip install -q "ruff>=0.6" "clang-format>=18"
	$(BIN)/ruff check --fix python tests bench
	$(BIN)/ruff format python tests bench
	$(BIN)/clang-format -i $$(find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp')

# (the build runs isolated, with pyproject's build requirements: torch is not one of them)
wheel: $(BIN)/python
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build --wheel --outdir dist .

gpu:
	bash bench/run_gpu.sh $${OUT:-bench/results/gpu-run}

clean:
	rm -rf build dist $(VENV) .pytest_cache .ruff_cache
