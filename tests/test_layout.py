"""The repository layout: the source tree is the import tree, and ahn attaches through public seams only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_lives_under_ahn_and_is_discovered():
    """The source tree is the import tree: packages are found under ahn/, none is listed (or remapped) by hand,
    and no top-level folder of the repository is importable as a package of its own."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in setup and "find" in setup.get("packages", {}), setup
    assert setup["packages"]["find"]["include"] == ["ahn*"]
    top = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert top == ["ahn"], f"top-level folders importable from the repository root: {top}"


def test_import_from_the_repository_root_without_safe_path():
    """A script, `python -c` or a notebook beside README.md puts the root on sys.path: ahn must still import
    (a top-level kernels/ was once taken for the Hugging Face `kernels` package)."""
    code = (
        "import ahn, torch; from transformers import Qwen2Config, Qwen2ForCausalLM; "
        "m = ahn.add_memory(Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, "
        "num_attention_heads=4, num_key_value_heads=2, vocab_size=300)), ahn.AHNConfig(window=16, sinks=2)); "
        "print(m(torch.randint(0, 300, (1, 40))).logits.shape)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([1, 40, 300])" in out.stdout


# What would tie ahn to one transformers release: restating a private forward, swapping classes,
# patching methods, copying a family's RoPE, or overriding the Trainer's private methods.
PRIVATE_SEAMS = {
    "def forward(self, hidden_states": "a restated transformers forward signature",
    "__class__ = ": "a class swap",
    "types.MethodType": "a patched method",
    "apply_rotary_pos_emb": "a family's RoPE code",
    "modeling_qwen": "an import from a family's modelling file",
    "def _save(": "an override of Trainer._save",
    "def _load_from_checkpoint": "an override of Trainer._load_from_checkpoint",
    '"full_attention":': "the dict-of-masks shortcut of a family's forward",
}


def test_no_private_transformers_seam_is_used():
    sources = [p for p in (ROOT / "ahn").rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}: {what} ({needle!r})" for p in sources for needle, what in PRIVATE_SEAMS.items()
             if needle in p.read_text()]
    assert not found, "\n".join(found)


def test_no_test_module_imports_another():
    """Tests share fixtures through conftest.py and plain helpers through helpers.py and kernel_cases.py; no file
    under tests/ imports a test module (which would run its module-level code twice and tie the files together)."""
    tests = ROOT / "tests"
    test_modules = {p.stem for p in tests.rglob("test_*.py")}
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # from test_x / tests.test_x import y; from . import test_x
                names = [node.module or ""] + [f"{node.module or ''}.{alias.name}" for alias in node.names]
            else:
                continue
            hits = sorted({part for name in names for part in name.split(".") if part in test_modules})
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(hits)}")
    assert not found, "move what is shared into tests/helpers.py or tests/conftest.py:\n" + "\n".join(found)
