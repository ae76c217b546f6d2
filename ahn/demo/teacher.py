"""The demo's teacher: a small Qwen2 model trained with full attention on associative recall.

The repo ships the result in ``ahn/demo/weights/`` (``config.json`` + ``model.safetensors``);
:func:`train_teacher` redoes it from a seed (same weights on the same machine and torch).

Recipe (:class:`TeacherRecipe`), and why. Recall needs an induction circuit: a head that
writes each token's predecessor into its position (previous-token head), and a later head
that matches the query key against it and copies the value. Trained on recall alone, a
2-layer Qwen2 model sits on a plateau (it learns to output *some* value of the context,
~15% accuracy, and stays there for thousands of steps). Two things get it off:

- a previous-token drill, every other step until the curriculum ends: sequences of triples
  ``a b a`` whose third token is the label, which only a previous-token head predicts, so the
  first half of the circuit gets a direct gradient;
- a length curriculum: short sequences (``short_len`` tokens) until the lookup is learned,
  then the length grows linearly to the task's; RoPE attention learned at 64 tokens only
  partly carries over to 256 without it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

from ahn._shipped import DEMO_TEACHER_DIR, load_demo_teacher
from ahn.distill.synthetic import IGNORE_INDEX, NUM_SPECIAL, RecallTask, sample_recall

WEIGHTS_DIR = DEMO_TEACHER_DIR  # the shipped teacher
load_teacher = load_demo_teacher  # the teacher at a path (default: the shipped one), in eval mode, float32
TRAINING_RECORD = "training.json"

# The demo's task and attention setting: a 32-token window over 256-token sequences, so most
# answers lie beyond the window; 8 pairs, few enough for a fixed-size memory to hold.
DEMO_TASK = RecallTask(seq_len=256, num_pairs=8)
DEMO_WINDOW = 32
DEMO_SINKS = 4  # == DEMO_TASK.prefix_len: the sinks see BOS and filler, never a pair


@dataclass(frozen=True)
class TeacherRecipe:
    """Architecture and optimisation of the teacher (see the module docstring for the why).

    The defaults train the shipped teacher: ~95k parameters, head size 32.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    rope_theta: float = 10000.0
    batch_size: int = 32
    steps: int = 2500
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    short_len: int = 64  # curriculum: sequence length while the lookup is learned
    hold_steps: int = 600  # steps at short_len
    grow_until: int = 1400  # step at which the length reaches the task's; the drill stops here too


def teacher_config(task: RecallTask, recipe: TeacherRecipe = TeacherRecipe()):
    """The teacher's ``transformers.Qwen2Config`` (tied embeddings, vocabulary of ``task``)."""
    return Qwen2Config(
        vocab_size=task.vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=task.seq_len, tie_word_embeddings=True,
        rope_theta=recipe.rope_theta, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def curriculum_task(task: RecallTask, recipe: TeacherRecipe, step: int) -> RecallTask:
    """The task trained at ``step``: ``short_len`` tokens for ``hold_steps``, then a linear
    growth (in multiples of 8) to ``task.seq_len`` at ``grow_until``."""
    short = min(recipe.short_len, task.seq_len)
    if step >= recipe.grow_until:
        return task
    if step < recipe.hold_steps:
        return replace(task, seq_len=short)
    f = (step - recipe.hold_steps) / (recipe.grow_until - recipe.hold_steps)
    return replace(task, seq_len=max(short, int(short + f * (task.seq_len - short)) // 8 * 8))


def previous_token_drill(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> dict:
    """Sequences of random triples ``a b a``; labels on every third token (``IGNORE_INDEX``
    elsewhere), which the model predicts only by reading the previous token.

    Returns ``input_ids`` and ``labels``, both ``[batch_size, seq_len // 3 * 3]`` long.
    """
    pairs = torch.randint(NUM_SPECIAL, vocab_size, (batch_size, seq_len // 3, 2), generator=generator)
    ids = torch.cat([pairs, pairs[..., :1]], dim=-1).view(batch_size, -1)  # [B, 3 * (seq_len // 3)]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2::3] = ids[:, 2::3]
    return {"input_ids": ids, "labels": labels}


def _lr_factor(recipe: TeacherRecipe, step: int) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, recipe.steps) / recipe.steps))
    return warm * (cosine * (1 - recipe.min_lr_ratio) + recipe.min_lr_ratio)


def train_teacher(out_dir, seed: int = 0, steps: Optional[int] = None, task: RecallTask = DEMO_TASK,
                  recipe: TeacherRecipe = TeacherRecipe(), progress: bool = True) -> dict:
    """Train a teacher from scratch with full attention and save it to ``out_dir``
    (``config.json``, ``model.safetensors``, and ``training.json``: the recipe, seed, seconds
    and the loss every step). ``steps`` overrides ``recipe.steps``. Returns the record.

    Single-threaded use (``torch.set_num_threads(1)``) is what the shipped teacher was timed with.
    """
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an int >= 1")
        recipe = replace(recipe, steps=steps)
    torch.manual_seed(seed)  # the model's random init
    model = Qwen2ForCausalLM(teacher_config(task, recipe))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=recipe.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(recipe, s))
    data = torch.Generator().manual_seed(seed + 1)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="teacher", disable=not progress)
    for step in bar:
        current = curriculum_task(task, recipe, step)
        if step < recipe.grow_until and step % 2 == 0:
            batch = previous_token_drill(recipe.batch_size, current.seq_len, task.vocab_size, data)
        else:
            batch = sample_recall(current, recipe.batch_size, data)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", len=current.seq_len)
    record = {"seed": seed, "task": asdict(task), "recipe": asdict(recipe),
              "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(), "losses": losses}
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    return record
