"""lm-evaluation-harness integration (the ``[lm-eval]`` extra): importing this package registers the
``ahn`` model (:class:`AHNLM`, lm-eval's ``HFLM`` on an AHNModel) with lm-eval.

``python -m ahn.lm_eval ...`` is lm-eval's own command line with that model registered, e.g.
``python -m ahn.lm_eval run --model ahn --model_args pretrained=PATH,adapter=PATH,mode=ahn --tasks ahn_smoke``.
``TASKS_DIR`` holds the tasks shipped with ahn (``ahn_smoke``), for ``--include_path`` /
``TaskManager(include_path=...)``.
"""

from ahn.lm_eval.model import TASKS_DIR, UNBOUNDED, AHNLM

__all__ = ["AHNLM", "TASKS_DIR", "UNBOUNDED"]
