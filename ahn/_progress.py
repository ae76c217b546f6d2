"""Progress bars of the libraries ahn drives (transformers' weight loading, datasets' map / filter)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def library_progress(enabled: bool):
    """Inside the block, transformers' and datasets' own progress bars are shown iff ``enabled``
    (ahn's ``--no-progress`` / ``progress: false`` then silences every bar, not only ours)."""
    if enabled:
        yield
        return
    # start-up time: `ahn demo` imports this module to build its flags
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    datasets_was_on, transformers_was_on = not are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_was_on:
            enable_progress_bars()
        if transformers_was_on:
            hf_logging.enable_progress_bar()
