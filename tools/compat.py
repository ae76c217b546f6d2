"""Run ahn's model, distill and demo tests against several transformers releases (`make compat`).

For each version X a throwaway venv (no system site-packages, so the versions are really
isolated) gets the pinned set of constraints.txt with transformers overridden to X, then runs
pytest on the selection. Pins that cannot hold next to X are relaxed and named in the table:
the pins X's own requirements exclude (e.g. huggingface-hub for an older X), and the pins of
packages that constrain transformers themselves (e.g. flash-linear-attention) with their exact
(==) requirements. Run it with the interpreter of the pinned set (make compat uses .venv): it
reads those packages' requirements from its installed metadata.

    python tools/compat.py                       # the declared floor, LAST_BEFORE_RENAME, the pinned and the newest release
    python tools/compat.py --versions 5.23.0 5.24.0 --keep --jobs 2
    python tools/compat.py --tests "tests/test_model.py -k decode"

Prints versions x (result, passed / failed / skipped, seconds, relaxed pins) and exits 1 if any
version fails to install or has a failing test. Logs and each venv's `pip freeze` stay in
--workdir; venvs are removed unless --keep.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_TESTS = "tests/test_model.py tests/test_distill.py tests/test_demo.py"
# transformers 5.24.0 renamed `past_key_values` to `cache` in the model / layer / attention
# forwards; the last release before it stays in the default set.
LAST_BEFORE_RENAME = "5.23.0"
TRANSFORMERS = "transformers"
# One editable build at a time: setuptools writes ahn.egg-info into the shared source tree.
EDITABLE_LOCK = threading.Lock()


@dataclass
class Outcome:
    version: str
    ok: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    install_s: float = 0.0
    tests_s: float = 0.0
    relaxed: list[str] = field(default_factory=list)
    note: str = ""


def read_pins(path: Path) -> dict[str, str]:
    """constraints.txt as {canonical name: exact version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def declared_floor() -> str:
    """The lower bound of transformers in pyproject.toml's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        if canonicalize_name(req.name) == TRANSFORMERS:
            floors = [s.version for s in req.specifier if s.operator == ">="]
            if len(floors) != 1:
                raise ValueError(f"pyproject.toml: {dep!r} needs exactly one '>=' floor")
            return floors[0]
    raise ValueError("pyproject.toml declares no transformers dependency")


def project_requirements() -> list[str]:
    """pyproject's dependencies plus its [dev] extra: what `-e .[dev]` installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"]]


def run(cmd: list[str], log, cwd: Path = ROOT, env: dict | None = None) -> int:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def fetch_wheel(version: str | None, dest: Path) -> Path:
    """Download transformers (==version, or the newest release) without dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = TRANSFORMERS if version is None else f"{TRANSFORMERS}=={version}"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", str(dest), spec],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed:\n{out.stdout}{out.stderr}")
    wheels = sorted(dest.glob(f"{TRANSFORMERS}-*.whl"), key=lambda p: Version(p.name.split("-")[1]))
    if version is None:
        return wheels[-1]
    return next(w for w in wheels if Version(w.name.split("-")[1]) == Version(version))


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def relaxed_pins(version: str, wheel: Path, pins: dict[str, str]) -> list[str]:
    """Pinned packages that must float next to transformers==version (see the module docstring)."""
    relaxed = {TRANSFORMERS}
    for req in wheel_requirements(wheel):
        name = canonicalize_name(req.name)
        if name in pins and not req.specifier.contains(pins[name], prereleases=True):
            relaxed.add(name)
    for name in pins:
        try:
            reqs = [Requirement(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        on_tf = [r for r in reqs if canonicalize_name(r.name) == TRANSFORMERS and (r.marker is None or r.marker.evaluate({"extra": ""}))]
        if any(not r.specifier.contains(version, prereleases=True) for r in on_tf):
            relaxed.add(name)
            relaxed.update(
                canonicalize_name(r.name) for r in reqs
                if any(s.operator == "==" for s in r.specifier) and canonicalize_name(r.name) in pins
            )
    return sorted(relaxed)


def parse_counts(text: str) -> dict[str, int]:
    """pytest's last summary line, e.g. '3 failed, 58 passed, 1 skipped in 12.3s'."""
    lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    if not lines:
        return {}
    return {kind.rstrip("s"): int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1])}


def check(version: str, wheel: Path, pins: dict[str, str], args) -> Outcome:
    outcome = Outcome(version, relaxed=[r for r in relaxed_pins(version, wheel, pins) if r != TRANSFORMERS])
    venv = args.workdir / f"venv-{version}"
    constraints = args.workdir / f"constraints-{version}.txt"
    log_path = args.workdir / f"{version}.log"
    skip = {TRANSFORMERS, *outcome.relaxed}
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if n not in skip))
    py = venv / "bin" / "python"
    with log_path.open("w") as log:
        start = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        # torch is pinned in the requirement itself too: a bare `torch` from an extra could
        # otherwise resolve to a multi-GB CUDA build.
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "--quiet", f"torch=={pins['torch']}", "-c", str(constraints),
             str(wheel), *project_requirements()],
        ]
        for step in steps:
            if run(step, log) != 0:
                outcome.note = f"install failed (see {log_path})"
                return outcome
        with EDITABLE_LOCK:
            if run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], log) != 0:
                outcome.note = f"install failed (see {log_path})"
                return outcome
        freeze = subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True)
        (args.workdir / f"{version}.freeze.txt").write_text(freeze.stdout)
        outcome.install_s = time.monotonic() - start

        start = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        code = run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", *shlex.split(args.tests)], log, env=env)
        outcome.tests_s = time.monotonic() - start
    outcome.counts = parse_counts(log_path.read_text())
    outcome.ok = code == 0
    if not outcome.ok:
        outcome.note = f"pytest exit {code} (see {log_path})"
    if not args.keep:
        shutil.rmtree(venv, ignore_errors=True)
    return outcome


def table(outcomes: list[Outcome]) -> str:
    head = ("transformers", "result", "passed", "failed", "skipped", "install s", "tests s", "relaxed pins / note")
    rows = [head]
    for o in outcomes:
        c = o.counts
        rows.append((
            o.version, "PASS" if o.ok else "FAIL", str(c.get("passed", 0)), str(c.get("failed", 0) + c.get("error", 0)),
            str(c.get("skipped", 0)), f"{o.install_s:.0f}", f"{o.tests_s:.0f}",
            "; ".join(x for x in (", ".join(o.relaxed), o.note) if x) or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(len(widths))) + "  " + r[-1] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", help="transformers versions (default: declared floor, "
                        f"{LAST_BEFORE_RENAME}, the pinned version and the newest release)")
    parser.add_argument("--tests", default=DEFAULT_TESTS, help=f"pytest arguments (default: {DEFAULT_TESTS!r})")
    parser.add_argument("--keep", action="store_true", help="keep the venvs (workdir/venv-VERSION)")
    parser.add_argument("--jobs", type=int, default=1, help="versions checked in parallel (default 1)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "compat", help="venvs, logs, wheels")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")

    pins = read_pins(CONSTRAINTS)
    wheels = args.workdir / "wheels"
    if args.versions:
        versions = list(dict.fromkeys(args.versions))
    else:
        newest = fetch_wheel(None, wheels).name.split("-")[1]
        candidates = [declared_floor(), LAST_BEFORE_RENAME, pins[TRANSFORMERS], newest]
        versions = sorted(set(candidates), key=Version)
    print(f"compat: transformers {', '.join(versions)}; tests: {args.tests}; workdir: {args.workdir}", flush=True)
    found = {v: fetch_wheel(v, wheels) for v in versions}

    def one(v: str) -> Outcome:
        o = check(v, found[v], pins, args)
        print(f"compat: transformers {v}: {'PASS' if o.ok else 'FAIL'} {o.note}".rstrip(), flush=True)
        return o

    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = list(pool.map(one, versions))
    print(table(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
