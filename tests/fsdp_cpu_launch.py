"""torchrun entry of test_distill's FSDP test: ``ahn distill`` (ahn's CLI) with accelerate's engine set to FSDP on CPU.

Not a test module. accelerate 1.15 turns FSDP on only for GPU-class process groups (``AcceleratorState``: the
``DistributedType.FSDP`` branch is inside ``if self.distributed_type in [MULTI_GPU, MULTI_NPU, MULTI_XPU, ...]``),
so a CPU run with ``--fsdp`` is plain DDP, which ``ahn distill`` refuses. Here the distributed type is set to FSDP
after accelerate's own set-up, the one thing a GPU launch does differently; the rest (``fully_shard`` per decoder
layer, FSDP2's DTensor parameters, the Trainer's FSDP checkpoints and resume) is accelerate's, transformers' and
torch's own code over gloo.

Also, for the test: on rank 0 at the start of training, ``<output>/fsdp_params.json`` lists every parameter of the
prepared model as [name, class, requires_grad]; with ``AHN_TEST_KILL_AT=K``, rank 1 kills itself (SIGKILL) at the end
of step K.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from transformers import TrainerCallback

import ahn.distill.trainer as distill_trainer
from ahn.cli import main

_accelerate_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


class ReportParameters(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            params = [[n, type(p).__name__, p.requires_grad] for n, p in model.named_parameters()]
            (Path(args.output_dir).parent / "fsdp_params.json").write_text(json.dumps(params))


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)


_build_trainer = distill_trainer.build_trainer


def _build_with_test_callbacks(cfg, callbacks=()):
    kill = int(os.environ.get("AHN_TEST_KILL_AT", "0"))
    return _build_trainer(cfg, [*callbacks, ReportParameters(), *([KillAt(kill)] if kill else [])])


if __name__ == "__main__":
    AcceleratorState.__init__ = _fsdp_on_cpu
    distill_trainer.build_trainer = _build_with_test_callbacks
    sys.exit(main(sys.argv[1:]))
