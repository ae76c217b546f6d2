"""Packaging: one import namespace, the CLI entry points, no import side effects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ahn

BIN = Path(sys.executable).parent


def run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_only_the_ahn_namespace_is_importable(tmp_path):
    code = (
        "import importlib.util as u\n"
        "print([n for n in ('kernels', 'distill', 'benchmarks') if u.find_spec(n) is not None])\n"
        "import ahn.kernels, ahn.distill, ahn.benchmarks\n"
        "print(ahn.kernels.gated_delta_rule.__module__)\n"
    )
    out = run([sys.executable, "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "[]", f"top-level modules shadow the ahn namespace: {lines[0]}"
    assert lines[1] == "ahn.kernels.gated_delta_rule"


def test_console_script_and_module_share_the_cli(tmp_path):
    script = run([str(BIN / "ahn"), "--version"], cwd=tmp_path)
    module = run([sys.executable, "-m", "ahn", "--version"], cwd=tmp_path)
    assert script.returncode == module.returncode == 0, script.stderr + module.stderr
    assert script.stdout.strip() == module.stdout.strip() == f"ahn {ahn.__version__}"
    helptext = run([sys.executable, "-m", "ahn", "--help"], cwd=tmp_path)
    assert helptext.returncode == 0 and "sliding-window" in helptext.stdout


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import sys, torch\n"
        "before = (torch._dynamo.config.suppress_errors, set(sys.modules))\n"
        "import ahn, ahn.kernels\n"
        "assert torch._dynamo.config.suppress_errors == before[0]\n"
        "new = set(sys.modules) - before[1]\n"
        "print(sorted(m for m in new if m.split('.')[0] in ('transformers', 'fla', 'triton')))\n"
    )
    out = run([sys.executable, "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing ahn.kernels pulled in heavy modules: {out.stdout}"
