"""Per-batch window and sinks: fixed, or drawn at random as in the AHN paper's training recipe.

The trainer calls :meth:`WindowSampler.draw` with a key (the optimizer step and the micro-
batch within it); the draw comes from a ``torch.Generator`` seeded by (seed, key), so a run
resumed from a checkpoint draws exactly what the uninterrupted run drew, and every process
of a distributed run draws the same. Nothing here touches a config.

Random mode (the release's ``sliding_window_type=random``, ByteDance-Seed/AHN qwen2_ahn.py):
the lossless budget c = sinks + window is drawn uniformly from ``budgets`` among values with
``min_budget_fraction * L < c < L`` (L: the batch's sequence length), then the sinks
uniformly from ``sink_choices`` among values <= ``max_sink_fraction * c``; window = c - sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# The release's candidate budgets and sinks (qwen2_ahn.py, pre_model_forward) and its bounds
# L/8 < c < L and sinks <= c/2.
PAPER_BUDGETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
PAPER_SINKS = (0, 32, 64, 128, 512, 2048, 4096)
PAPER_MIN_BUDGET_FRACTION = 0.125
PAPER_MAX_SINK_FRACTION = 0.5


@dataclass(frozen=True)
class WindowSampler:
    """Draws ``(window, sinks)`` per micro-batch.

    Args:
        window: a fixed window (int >= 1), or None for random draws.
        sinks: fixed sinks (int >= 0) when ``window`` is fixed.
        budgets, sink_choices, min_budget_fraction, max_sink_fraction: the random mode's
            candidates and bounds (module docstring).
        seed: base seed of the draws.
    """

    window: Optional[int] = None
    sinks: int = 0
    budgets: Sequence[int] = PAPER_BUDGETS
    sink_choices: Sequence[int] = PAPER_SINKS
    min_budget_fraction: float = PAPER_MIN_BUDGET_FRACTION
    max_sink_fraction: float = PAPER_MAX_SINK_FRACTION
    seed: int = 0

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window={self.window!r} must be an int >= 1, or 'random'")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks={self.sinks!r} must be an int >= 0")
        if self.window is None:
            if not self.budgets or any(not isinstance(c, int) or c < 1 for c in self.budgets):
                raise ValueError(f"budgets={list(self.budgets)!r} must be positive ints (sinks + window candidates)")
            if not self.sink_choices or any(not isinstance(s, int) or s < 0 for s in self.sink_choices):
                raise ValueError(f"sink_choices={list(self.sink_choices)!r} must be non-negative ints")
            if not 0 <= self.min_budget_fraction < 1:
                raise ValueError(f"min_budget_fraction={self.min_budget_fraction!r} must be in [0, 1)")
            if not 0 <= self.max_sink_fraction <= 1:
                raise ValueError(f"max_sink_fraction={self.max_sink_fraction!r} must be in [0, 1]")

    @property
    def is_random(self) -> bool:
        return self.window is None

    def draw(self, seq_len: int, step: int, micro: int = 0) -> tuple[int, int]:
        """``(window, sinks)`` for a batch of sequence length ``seq_len`` at optimizer step ``step``."""
        if not self.is_random:
            return self.window, self.sinks
        import torch  # start-up time: building the CLI's flags (DistillConfig) imports this module

        gen = torch.Generator().manual_seed(hash((self.seed, step, micro)) & (2**63 - 1))
        lo = self.min_budget_fraction * seq_len
        budgets = [c for c in self.budgets if lo < c < seq_len]
        if not budgets:
            # Shorter than every candidate: keep half of the sequence lossless and distil the rest.
            c = max(1, seq_len // 2)
            return c, 0
        c = budgets[int(torch.randint(len(budgets), (1,), generator=gen))]
        sinks = [s for s in self.sink_choices if s <= self.max_sink_fraction * c and s < c]
        s = sinks[int(torch.randint(len(sinks), (1,), generator=gen))] if sinks else 0
        return c - s, s
