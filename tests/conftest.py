"""Test configuration: CPU-first, deterministic, Triton interpreted where there is no GPU; the shared fixtures.

Plain helpers (tiny configs, inputs, runs, tolerances) are in helpers.py and, for the kernels, kernel_cases.py.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest
import torch

# Must be set before triton is first imported: our Triton kernels then run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

import ahn  # noqa: E402  (after TRITON_INTERPRET: ahn's kernels import triton)
from helpers import BYTE_LM_SINKS, BYTE_LM_WINDOW, FAMILIES, save_byte_lm, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random models of every family (helpers.FAMILIES, seed 1) saved with save_pretrained; a test loads a
    fresh copy through AutoModelForCausalLM with helpers.load_base."""
    dirs = {}
    for family in FAMILIES:
        torch.manual_seed(1)
        model = tiny_model(family)
        d = tmp_path_factory.mktemp(family)
        model.save_pretrained(d)
        dirs[family] = str(d)
    return dirs


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory):
    """(model dir with a byte tokenizer and a chat template, adapter dir of a gated-deltanet memory with
    window BYTE_LM_WINDOW, BYTE_LM_SINKS sinks and non-zero random output projections): the model that the
    `ahn eval` and lm-eval tests run."""

    def randomize_output_projections(model):
        with torch.no_grad():
            for name, p in model.named_memory_parameters():
                if name.endswith("o_proj.weight"):
                    p.copy_(torch.randn(p.shape) * 0.3)

    model_dir, adapter_dir, _ = save_byte_lm(
        tmp_path_factory, ahn.AHNConfig(window=BYTE_LM_WINDOW, sinks=BYTE_LM_SINKS), randomize_output_projections)
    return model_dir, adapter_dir


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write to (root ignores permission bits: the immutable flag instead)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: no folder is read-only")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
