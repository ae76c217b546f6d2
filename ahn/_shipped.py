"""The model shipped inside the package: the demo's recall teacher, for every layer that loads it.

A small Qwen2 model trained with full attention on associative recall (:mod:`ahn.demo.teacher` trains it and
``ahn demo`` distils memories into it) ships in ``ahn/demo/weights``. ``ahn distill --model demo-teacher`` and
the stream benchmark load it too; they find it here, below the demo, which they must not import.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2ForCausalLM

DEMO_TEACHER = "demo-teacher"  # the --model alias of the shipped teacher (ahn distill, configs)
DEMO_TEACHER_DIR = Path(__file__).resolve().parent / "demo" / "weights"


def load_demo_teacher(path=DEMO_TEACHER_DIR):
    """The teacher saved at ``path`` (default: the shipped one), in eval mode, float32."""
    return Qwen2ForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
