# Two entry points for a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Both create ./.venv on first use and install the pinned, tested set of constraints.txt
# (pip -c). Where a torch is already importable (a CUDA build, say), the venv sees the system's
# site-packages so that torch is used as is (torch and triton, whose version torch fixes, then
# come out of the pins); elsewhere the venv is isolated, so it holds exactly the pinned set and
# no system package conflicts with it, and torch is pinned to 2.13.0 in the same pip command as
# everything else, so pip never resolves a plain `torch` requirement to a multi-GB CUDA build
# on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ahn-installed
CONSTRAINTS := constraints.txt
HAVE_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)
TORCH_PIN := $(if $(HAVE_TORCH),,$(shell grep '^torch==' $(CONSTRAINTS)))

.PHONY: setup demo test bench gpu-check compat clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(if $(HAVE_TORCH),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(HAVE_TORCH),grep -v -E '^(torch|triton)==',cat) $(CONSTRAINTS) > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ahn demo

# `python -m pytest` (pytest comes with the [dev] extra).
test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m ahn.benchmarks.kernels

# The GPU check (docs/gpu.md): on a CUDA machine, at most 8 minutes; writes results.json and results.md
# to GPU_CHECK_OUT. GPU_CHECK_ARGS=--dry-run runs the same code at tiny sizes on CPU (the suite does too).
# On a machine that cannot download (its CUDA torch preinstalled), GPU_PYTHON=python3 runs it with that
# Python once ahn and the wheels of docs/gpu.md are installed there, without building .venv.
GPU_CHECK_OUT ?= build/gpu-check
GPU_PYTHON ?= $(BIN)/python
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),$(STAMP))
	$(GPU_PYTHON) -m ahn.benchmarks.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# The model, distill and demo tests against several transformers releases, each in a throwaway
# venv under build/compat (docs/compat.md): make compat [VERSIONS="5.23.0 5.24.0"] [COMPAT_ARGS="--keep --jobs 2"]
compat: $(STAMP)
	$(BIN)/python tools/compat.py $(if $(VERSIONS),--versions $(VERSIONS)) $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
