"""The ``ahn`` model of lm-evaluation-harness: lm-eval's ``HFLM`` with an AHN memory.

``HFLM`` does everything it does for a plain Hugging Face model (tokenizer, batching, the
loglikelihood / rolling / generation loops, accelerate data parallelism); ahn overrides
three of its methods:

* ``_create_model``: HFLM loads the base model (dtype, device, ...), then the memory is
  attached with :func:`ahn.benchmarks.evaluate.attach_memory`, the loading of ``ahn eval``
  (``adapter=``: a trained adapter, else a fresh memory, which is exactly sinks + window).
* ``_model_call`` / ``_model_generate`` run HFLM's own code inside
  ``model.attention_mode(mode)``. In "window" / "ahn" modes a forward builds an
  :class:`ahn.AHNCache` (sinks + window KV and the memory state) instead of a full KV cache,
  and ``generate`` decodes with one, so memory stays bounded however long a document is.

``max_length``: in "window" / "ahn" modes the model reads any length, so it defaults to
:data:`UNBOUNDED`: HFLM's rolling loglikelihood then scores a long document in one pass
(one window of HFLM's rolling scheme) and generation never truncates the prompt. Give
``max_length=N`` to cut as lm-eval does for a plain model. In "full" mode it is HFLM's default
(the model config's ``max_position_embeddings``).

model_args: ``pretrained=PATH`` (base model: directory or Hub id), ``adapter=PATH``,
``window=W``, ``sinks=S``, ``mode=ahn|window|full`` (default ahn), ``backend=auto|torch|triton``
(the memory's decode backend), and every HFLM argument (``dtype``, ``device``, ``batch_size``,
``max_length``, ...).
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Optional

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ahn.benchmarks.evaluate import attach_memory
from ahn.config import MODES
from ahn.kernels import BACKENDS

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# max_length of "window" / "ahn" modes unless given: no truncation, no rolling windows.
UNBOUNDED = 2**31 - 1


def _int_arg(name: str, value, minimum: int) -> Optional[int]:
    """A model_args integer (lm-eval passes "32" as 32, but a Python caller may pass a string)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model_args {name}={value!r}: must be an integer >= {minimum} "
                         f"(e.g. {name}={max(minimum, 32) if name == 'window' else max(minimum, 4)})")
    return value


def _unknown_arg(name: str, value) -> str:
    """The message for a model_arg nobody takes: its name, a close valid one, and the valid ones."""
    ours = [p for p in inspect.signature(AHNLM.__init__).parameters if p not in ("self", "kwargs")]
    hflm = [p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs", *ours)]
    close = difflib.get_close_matches(name, ours + hflm, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"model_args {name}={value!r}: unknown argument{hint}; ahn takes {', '.join(ours)}, and HFLM takes "
            f"{', '.join(hflm)} (other keys go to the model's from_pretrained, which does not take {name!r})")


@register_model("ahn")
class AHNLM(HFLM):
    """lm-eval's HFLM on an AHNModel; see the module docstring for the model_args."""

    def __init__(self, pretrained, adapter: Optional[str] = None, window=None, sinks=None, mode: str = "ahn",
                 backend: Optional[str] = None, max_length=None, batch_size=1, **kwargs):
        if mode not in MODES:
            raise ValueError(f"model_args mode={mode!r}: must be one of {', '.join(MODES)} "
                             "(ahn: window + memory; window: sinks + window only; full: the base model)")
        if not isinstance(pretrained, str):
            raise ValueError("model_args pretrained= must be a path or Hub id of the base model (a string), "
                             f"got {type(pretrained).__name__}; ahn attaches the memory itself")
        if adapter is not None:
            adapter = str(adapter)
            if not Path(adapter).is_dir():
                raise ValueError(f"model_args adapter={adapter!r}: no such directory; give the folder written by "
                                 "ahn distill / AHNModel.save_pretrained, or leave adapter out for a fresh memory "
                                 "(= sinks + window)")
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"model_args backend={backend!r}: must be one of {', '.join(BACKENDS)} (the memory's "
                                 "kernel backend; leave it out for auto)")
        self.mode = mode
        self._ahn_args = dict(adapter=adapter, window=_int_arg("window", window, 1),
                              sinks=_int_arg("sinks", sinks, 0), backend=backend)
        if max_length is None and mode != "full":
            max_length = UNBOUNDED
            if str(batch_size).startswith("auto"):
                raise ValueError(f"model_args batch_size={batch_size!r} with mode={mode}: HFLM sizes its probe batch "
                                 "by max_length, unbounded in this mode; give batch_size=N, or max_length=N too")
        try:
            super().__init__(pretrained, max_length=max_length, batch_size=batch_size, **kwargs)
        except TypeError as e:  # a model_arg that neither ahn, HFLM nor the model's from_pretrained takes
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if unknown is None or unknown.group(1) not in kwargs:
                raise
            raise ValueError(_unknown_arg(unknown.group(1), kwargs[unknown.group(1)])) from None

    # ------------------------------------------------------------------ HFLM's seams
    def _create_model(self, pretrained, *args, **kwargs) -> None:
        """HFLM loads the base model; the memory is attached as ``ahn eval`` attaches it."""
        super()._create_model(pretrained, *args, **kwargs)
        a = self._ahn_args
        try:
            self._model = attach_memory(self._model, a["adapter"], a["window"], a["sinks"], backend=a["backend"])
        except ValueError as e:
            what = f"adapter={a['adapter']!r}" if a["adapter"] else f"window={a['window']!r}, sinks={a['sinks']!r}"
            fix = ("; use the adapter trained for this base model" if a["adapter"] else "")
            raise ValueError(f"model_args {what} with pretrained={pretrained!r}: {e}{fix}") from None

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self.model.attention_mode(self.mode):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        # AHNModel.generate gives generate a fresh AHNCache in "window" / "ahn" mode.
        with self.model.attention_mode(self.mode):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        cfg = self.model.ahn_config
        info.update(ahn_mode=self.mode, ahn_adapter=self._ahn_args["adapter"], ahn_window=cfg.window,
                    ahn_sinks=cfg.sinks, ahn_memory=cfg.memory)
        return info
