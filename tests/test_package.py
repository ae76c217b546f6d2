"""Packaging: one import namespace, the CLI entry points, no import side effects."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import ahn

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


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


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and canonicalize_name(name) not in pins, f"constraints.txt: {line!r} is not one exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_every_dependency_inside_its_range():
    """The pinned set (make demo / make test) is one the declared ranges accept, and each upper
    bound stops at the minor release after the pinned, tested one (raising it: docs/compat.md)."""
    pins = _pins()
    project = _project()
    for dep in (*project["dependencies"], *project["optional-dependencies"]["dev"]):
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside pyproject's {dep!r}"
        uppers = [Version(s.version) for s in req.specifier if s.operator == "<"]
        assert len(uppers) == 1, f"{dep!r} needs one '<' upper bound (the newest tested release)"
        pinned = pins[name].release + (0,)
        assert uppers[0] <= Version(f"{pinned[0]}.{pinned[1] + 1}"), f"{dep!r} allows untested releases past {pins[name]}"


def test_python_floor_covers_the_standard_library_in_use():
    """tomllib (the suite and tools/compat.py read pyproject.toml with it) is new in Python 3.11."""
    uses_tomllib = [p.name for p in (*ROOT.glob("tests/*.py"), *ROOT.glob("tools/*.py")) if "import tomllib" in p.read_text()]
    assert uses_tomllib
    assert not SpecifierSet(_project()["requires-python"]).contains("3.10.99"), f"{uses_tomllib} import tomllib (3.11+)"
