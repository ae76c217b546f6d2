"""The models shipped inside the package: the demo's recall teacher and the text teacher, for every layer that loads them.

A small Qwen2 model trained with full attention on associative recall (:mod:`ahn.demo.teacher` trains it and
``ahn demo`` distils memories into it) ships in ``ahn/demo/weights``. ``ahn distill --model demo-teacher`` and
the stream benchmark load it too; they find it here, below the demo, which they must not import.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

DEMO_TEACHER = "demo-teacher"  # the --model alias of the shipped teacher (ahn distill, configs)
DEMO_TEACHER_DIR = Path(__file__).resolve().parent / "demo" / "weights"


def load_demo_teacher(path=DEMO_TEACHER_DIR):
    """The teacher saved at ``path`` (default: the shipped one), in eval mode, float32."""
    return Qwen2ForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()


TEXT_TEACHER = "text-teacher"  # the alias of the shipped English teacher (ahn/demo/text)
TEXT_TEACHER_DIR = Path(__file__).resolve().parent / "demo" / "text" / "weights"
TEXT_TEACHER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def load_text_teacher(path=TEXT_TEACHER_DIR):
    """(model, tokenizer) of the text teacher saved at ``path`` (default: the shipped one): the model in eval
    mode, float32 (it is stored in float16). FileNotFoundError naming the fix when a file is missing."""
    path = Path(path)
    missing = [name for name in TEXT_TEACHER_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the text teacher at {path} lacks {', '.join(missing)}"
            + ("; the shipped teacher should be there: reinstall ahn" if path == TEXT_TEACHER_DIR else "")
            + "; run `ahn demo --task text --retrain-teacher` (it trains one into OUT/teacher first, 40 minutes or so on "
              "2 cores), or train one with `python -m ahn.demo.text.teacher --out DIR` and pass --teacher DIR")
    model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
