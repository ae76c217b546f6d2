# Two entry points for a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Both create ./.venv on first use. The venv sees the system's site-packages, so a CUDA
# torch that is already installed is used as is; where no torch is importable, torch is
# pinned to 2.13.0 in the same pip command as everything else, so pip never resolves a
# plain `torch` requirement to a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ahn-installed
TORCH_PIN := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 || echo "torch==2.13.0")

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ahn demo

# `python -m pytest` (pytest may come from the system site-packages); PYTHONSAFEPATH keeps the
# repository root off sys.path, so the top-level kernels/ folder never shadows ahn.kernels.
test: $(STAMP)
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	PYTHONSAFEPATH=1 $(BIN)/python -m ahn.benchmarks.kernels

clean:
	rm -rf $(VENV) build *.egg-info
