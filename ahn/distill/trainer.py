"""Self-distillation on transformers' Trainer: frozen full-attention teacher, windowed student + memory.

Both are the same model object (one copy of the base weights): per micro-batch, one
forward in ``attention_mode("full")`` without gradients (the teacher) and one in
``attention_mode("ahn")`` with the batch's window and sinks (the student). Only the memory
parameters require gradients, so only they reach the optimizer and DDP's gradient sync.
Everything else (gradient accumulation, mixed precision, gradient checkpointing, DDP /
FSDP / DeepSpeed, logging, checkpoints, resume) is the Trainer's.

A run writes into ``output``:
    ahn_adapter.safetensors, ahn_config.json   the trained memory (AHNModel.from_pretrained)
    distill_config.yaml                        the run's full DistillConfig
    train_log.jsonl                            one JSON line per logging step
    checkpoints/checkpoint-<step>/             Trainer checkpoints: the memory weights only
                                               (model.safetensors, under the Trainer model's
                                               names, + ahn_config.json), optimizer, RNG

The Trainer is extended through public points only: ``compute_loss``, ``log``,
``get_decay_parameter_names``, ``save_model`` (which the Trainer calls for every checkpoint:
it writes the memory weights where ``train(resume_from_checkpoint=...)`` reads a model's
weights back, non-strictly), callbacks, and torch's public load_state_dict post-hook, which
tells that load that the frozen base weights are absent from a checkpoint by design.

Rerunning into an output directory resumes from its last complete checkpoint, but only with
the same training settings (:meth:`DistillConfig.training_settings`: everything but output,
resume, logging, saving, progress, worker counts and gradient checkpointing; ``max_steps`` and
``epochs`` count, since they shape the learning-rate schedule). A finished run (its last checkpoint at
its last step) is left as it is: rerunning it does nothing, or only writes a missing adapter from that
checkpoint. Ctrl-C or SIGTERM finishes the step, saves a checkpoint and stops.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import SAFE_WEIGHTS_NAME

from ahn._io import check_writable_folder, replace_file
from ahn._jsonl import read_appended
from ahn._loading import load_causal_lm, load_tokenizer
from ahn._progress import library_progress
from ahn._shipped import DEMO_TEACHER, DEMO_TEACHER_DIR
from ahn.adapters import WEIGHTS_NAME, save_adapter
from ahn.config import CONFIG_NAME, AHNConfig
from ahn.model import add_memory
from ahn.salience import SalienceRecord

from .config import DistillConfig
from .data import DistillCollator, load_records, prepare_dataset
from .losses import (chunked_head_losses, distill_positions, evictable_positions, hidden_mse, next_token_targets,
                     salience_loss)
from .sampling import WindowSampler

LOG_NAME = "train_log.jsonl"
RUN_CONFIG_NAME = "distill_config.yaml"
CHECKPOINTS = "checkpoints"
# AHNConfig defaults for an adapter trained with random windows: the paper's evaluation setting.
DEFAULT_INFERENCE_WINDOW, DEFAULT_INFERENCE_SINKS = 32640, 128


class DistillTrainer(Trainer):
    """A Trainer whose loss is self-distillation; saves and loads memory weights only."""

    def __init__(self, *args, ahn_model, distill_config: DistillConfig, sampler: WindowSampler, **kwargs):
        super().__init__(*args, model=ahn_model, **kwargs)
        self.ahn_model = ahn_model
        self.distill_config = distill_config
        self.sampler = sampler
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self._micro = (-1, -1)  # (optimizer step, micro-batch index within it)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # Memory parameters: their names in the Trainer's model (AHNModel) -> in the adapter (the base model's).
        adapter_names = {id(p): n for n, p in ahn_model.named_memory_parameters()}
        self.memory_names = {n: adapter_names[id(p)] for n, p in ahn_model.named_parameters() if id(p) in adapter_names}
        ahn_model.register_load_state_dict_post_hook(self._frozen_weights_are_not_missing)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill_config
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        window, sinks = self.sampler.draw(int(mask.sum(-1).max()), step, micro)
        pos = distill_positions(mask, window, sinks, labels if cfg.response_only else None)  # [B, T]
        kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        salience = cfg.salience_weight > 0 and self.ahn_model.ahn_config.uses_salience
        if salience:
            # The teacher through ahn's attention with a window spanning the sequence (full attention, invariant 1),
            # recording the attention mass it puts on each token from queries at least `window` later.
            teacher_record, student_record = SalienceRecord(probe_window=window), SalienceRecord()
            with torch.no_grad(), self.ahn_model.attention_mode("window"):
                teacher = model(**kw, window=ids.shape[1], sinks=0, salience_record=teacher_record).hidden_states
            with self.ahn_model.attention_mode("ahn"):
                student = model(**kw, window=window, sinks=sinks, salience_record=student_record).hidden_states
        else:
            with torch.no_grad(), self.ahn_model.attention_mode("full"):
                teacher = model(**kw).hidden_states
            with self.ahn_model.attention_mode("ahn"):
                student = model(**kw, window=window, sinks=sinks).hidden_states
        b, t = pos.nonzero(as_tuple=True)
        n = b.numel()
        head = self.ahn_model.get_output_embeddings()
        next_labels = next_token_targets(labels)[b, t]  # [n]
        targets = next_labels if cfg.ce_weight > 0 else None
        weights = None
        if cfg.response_weight != 1.0 and not cfg.response_only:
            weights = 1.0 + (cfg.response_weight - 1.0) * (next_labels != -100).float()  # [n]
        kl_sum, ce_sum = chunked_head_losses(
            student[-1][b, t], teacher[-1][b, t], head.weight, head.bias, targets, weights,
            temperature=cfg.temperature, with_kl=cfg.kl_weight > 0, chunk=cfg.loss_chunk,
        )
        loss = student[-1].sum() * 0.0  # keeps the graph (and DDP's gradient sync) alive when n == 0
        kl = kl_sum / (weights.sum().clamp(min=1e-6) if weights is not None else max(n, 1))
        loss = loss + cfg.kl_weight * kl
        if targets is not None:
            ce = ce_sum / (targets != -100).sum().clamp(min=1)
            loss = loss + cfg.ce_weight * ce
            self._metrics["ce"].append(ce.item())
        if cfg.hidden_weight > 0:
            # Layer outputs (hidden_states[1:]; the last one is after the final norm).
            mse = torch.stack([hidden_mse(s[b, t], h[b, t]).mean() if n else s.new_zeros(())
                               for s, h in zip(student[1:], teacher[1:])]).mean()
            loss = loss + cfg.hidden_weight * mse
            self._metrics["hidden_mse"].append(mse.item())
        if salience:
            evictable = evictable_positions(mask, window, sinks)  # [B, T]
            sal = torch.stack([salience_loss(student_record.scores[i], teacher_record.teacher_mass[i], evictable)
                               for i in student_record.scores]).mean()
            loss = loss + cfg.salience_weight * sal
            self._metrics["salience"].append(sal.item())
        self._metrics["kl"].append(kl.item())
        self._metrics["window"].append(window)
        self._metrics["sinks"].append(sinks)
        self._metrics["distilled_tokens"].append(n)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for k, v in self._metrics.items():
                logs[k] = round(sum(v) / len(v), 6) if v else None
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices only; norms, biases, A_log and dt_bias (vectors) get none."""
        return [n for n, p in model.named_parameters() if p.ndim >= 2]

    # ------------------------------------------------------------------ checkpoints
    def memory_state(self) -> dict[str, torch.Tensor]:
        """The memory weights under the Trainer model's names, full tensors on CPU; every rank calls it (DeepSpeed /
        FSDP gather). Under FSDP2 each memory parameter is a DTensor shard: only those are gathered (``full_tensor``,
        a collective), never the frozen base that FSDP's own state dict would gather whole onto rank 0."""
        if self.is_fsdp_enabled:  # FSDP2 (ahn asks for version 2): DTensor shards once prepared, whole before
            params = {n: p for n, p in self.model.named_parameters() if n in self.memory_names}
            assert params.keys() == self.memory_names.keys(), "FSDP renamed the memory parameters"
            return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                    for n, p in params.items()}
        state = self.accelerator.get_state_dict(self.model_wrapped)
        return {n: t for n, t in state.items() if n in self.memory_names}

    def save_model(self, output_dir: Optional[str] = None, **kwargs) -> None:
        """Checkpoint weights (the Trainer calls this on every rank for each checkpoint): the memory weights only,
        as ``model.safetensors`` under the Trainer model's names (what resuming loads back), + ``ahn_config.json``.
        Trainer.save_model's other keywords (Hub pushes) do not apply. The finished adapter: :meth:`save_adapter`."""
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        state = self.memory_state()
        if self.args.should_save:
            tensors = {n: t.detach().contiguous().cpu() for n, t in state.items()}
            out.mkdir(parents=True, exist_ok=True)
            replace_file(out / SAFE_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
            replace_file(out / CONFIG_NAME, lambda p: p.write_text(self.ahn_model.ahn_config.to_json_string()))

    def save_adapter(self, output_dir) -> None:
        """Write the adapter (``AHNModel.from_pretrained`` format) to ``output_dir``; every rank calls it."""
        state = {self.memory_names[n]: t for n, t in self.memory_state().items()}
        if self.args.should_save:
            save_adapter(self.ahn_model, output_dir, state=state)

    def check_checkpoint(self, path: Path) -> None:
        """Refuse a checkpoint whose memory is not this run's (rule, parameter names and shapes)."""
        fix = "use another output directory or --resume never"
        if not (path / SAFE_WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
            raise ValueError(f"checkpoint {path} lacks {SAFE_WEIGHTS_NAME} or {CONFIG_NAME} (written by an older ahn?): "
                             f"{fix}")
        memory = AHNConfig.from_json_file(path / CONFIG_NAME).memory
        if memory != self.ahn_model.ahn_config.memory:
            raise ValueError(f"checkpoint {path} holds a {memory!r} memory but this run trains "
                             f"{self.ahn_model.ahn_config.memory!r}: {fix}")
        if self.is_deepspeed_enabled:
            return  # DeepSpeed resumes from its own files (and partitions the parameters: no shapes to compare)
        with safe_open(str(path / SAFE_WEIGHTS_NAME), "pt") as f:
            saved = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        params = dict(self.ahn_model.named_parameters())
        if saved != {n: tuple(params[n].shape) for n in self.memory_names}:
            raise ValueError(f"checkpoint {path} does not match this model's memory layout: {fix}")

    def _frozen_weights_are_not_missing(self, module, incompatible_keys) -> None:
        """load_state_dict post-hook: a checkpoint holds the memory weights only, not the frozen base weights."""
        incompatible_keys.missing_keys[:] = [n for n in incompatible_keys.missing_keys if n in self.memory_names]


class InterruptCallback(TrainerCallback):
    """First Ctrl-C or SIGTERM (a scheduler's preemption): finish the current step, save a checkpoint and
    stop, on every rank at the same step. A second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.stopped_early = False
        self._previous = {}

    def request_stop(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _on_signal(self, signum, frame):
        print(f"\nahn distill: {signal.Signals(signum).name}; saving a checkpoint after this step (Ctrl-C again to "
              "abort)", flush=True)
        self.request_stop()

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=args.device if args.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag)  # every rank stops at the same step
            stop = bool(flag.item())
        if stop:
            self.stopped_early = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


class JsonlLogCallback(TrainerCallback):
    """Appends every log record to ``train_log.jsonl`` (rank 0); a resumed run drops records past its checkpoint
    and a torn last line (a run killed mid-write, a full disk); another malformed line is an error naming it."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            kept = [r for r in read_appended(self.path) if r.get("step", 0) <= state.global_step]
            replace_file(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def is_complete_checkpoint(d: Path) -> bool:
    """Whether the Trainer finished saving ``d``: its trainer_state.json, written last, parses."""
    try:
        json.loads((d / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: Path) -> Optional[Path]:
    """The highest-step complete checkpoint in ``folder`` (one interrupted while saving is never used); None if none."""
    if not folder.is_dir():
        return None
    found = [(int(d.name.split("-")[-1]), d) for d in folder.iterdir()
             if d.is_dir() and d.name.startswith("checkpoint-") and d.name.split("-")[-1].isdigit()
             and is_complete_checkpoint(d)]
    return max(found)[1] if found else None


def _use_bf16(cfg: DistillConfig) -> bool:
    if cfg.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.bf16 and not torch.cuda.is_available():
        raise ValueError("bf16=true needs a CUDA device; use bf16=false (or auto) on CPU")
    return bool(cfg.bf16)


def resolve_model(name: str) -> str:
    """A model path or Hub id; ``demo-teacher`` (unless such a directory exists) is the shipped demo teacher."""
    if name == DEMO_TEACHER and not Path(name).exists():
        return str(DEMO_TEACHER_DIR)
    return name


def _load_tokenizer(path: str):
    try:
        return load_tokenizer(path)
    except ValueError:
        return None  # missing or empty: pre-tokenised data needs none; text / chat data will say so


def build_trainer(cfg: DistillConfig, callbacks: Sequence[TrainerCallback] = ()) -> DistillTrainer:
    """Load the base model and data and set up the Trainer for ``cfg`` (nothing is trained yet)."""
    cfg.check_required()
    out = Path(cfg.output)
    bf16 = _use_bf16(cfg)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun / accelerate
    _check_engine(cfg, multi_process)
    set_seed(cfg.seed)
    model_path = resolve_model(cfg.model)
    with library_progress(cfg.progress):
        base = load_causal_lm(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    fixed = cfg.window != "random"
    ahn_config = AHNConfig(
        memory=cfg.memory, memory_kwargs=dict(cfg.memory_kwargs), layers=cfg.layers, backend=cfg.backend,
        window=cfg.inference_window or (cfg.window if fixed else DEFAULT_INFERENCE_WINDOW),
        sinks=cfg.inference_sinks if cfg.inference_sinks is not None else (cfg.sinks if fixed else DEFAULT_INFERENCE_SINKS),
        buffer_slots=cfg.buffer_slots, salience_writes=cfg.salience_writes, readout=cfg.readout,
        salience_mass=cfg.salience_mass, salience_mass_stride=cfg.salience_mass_stride,
    )
    model = add_memory(base, ahn_config)
    for p in model.memory_parameters():  # optimizer master weights stay float32 under bf16 autocast
        p.data = p.data.float()
    tokenizer = _load_tokenizer(model_path)
    with library_progress(cfg.progress):
        records = load_records(cfg.data, split=cfg.data_split, synthetic_options=dict(cfg.synthetic),
                               vocab_size=base.config.vocab_size)
        if cfg.max_samples is not None and cfg.max_samples < len(records):
            records = records.select(range(cfg.max_samples))
        dataset = prepare_dataset(records, tokenizer, max_length=cfg.max_length, min_length=cfg.min_length,
                                  response_only=cfg.response_only, lossless=cfg.lossless_length,
                                  vocab_size=base.config.vocab_size, num_proc=cfg.preprocess_workers)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        report_to=[r.strip() for r in cfg.report_to.split(",")] if cfg.report_to != "none" else "none",
        seed=cfg.seed, data_seed=cfg.seed, bf16=bf16, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_workers, disable_tqdm=not cfg.progress, deepspeed=cfg.deepspeed,
        fsdp=bool(cfg.fsdp), fsdp_config=cfg.fsdp_config(), use_cpu=not cuda,
        ddp_backend="gloo" if multi_process and not cuda else None, ddp_find_unused_parameters=False,
    )
    made = [d for d in (out, out / CHECKPOINTS) if not d.exists()]  # the Trainer makes its output_dir
    trainer = DistillTrainer(
        ahn_model=model, distill_config=cfg, sampler=cfg.sampler(), args=args, train_dataset=dataset,
        data_collator=DistillCollator(pad_token_id=pad), callbacks=[JsonlLogCallback(out / LOG_NAME), *callbacks],
    )
    # accelerate decides the engine from the devices: it makes a CPU multi-process run plain DDP whatever fsdp or
    # deepspeed say (measured with accelerate 1.15). Refuse that rather than train with another engine than asked.
    engine = trainer.accelerator.distributed_type.value
    wrong = None
    if cfg.fsdp and not trainer.is_fsdp_enabled:
        wrong = (f"fsdp={cfg.fsdp!r}: accelerate set this run up as {engine}, not FSDP: it shards only across GPU "
                 "processes (CUDA, torchrun --nproc_per_node N); drop --fsdp here (CPU runs are DDP)")
    elif cfg.deepspeed and not trainer.is_deepspeed_enabled:
        wrong = (f"deepspeed={cfg.deepspeed!r}: accelerate set this run up as {engine}, not DeepSpeed: DeepSpeed needs "
                 "CUDA; drop --deepspeed here")
    if wrong:
        for d in reversed(made):  # leave nothing behind: the folders the Trainer made are still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise ValueError(wrong)
    return trainer


def _check_engine(cfg: DistillConfig, multi_process: bool) -> None:
    """What can be told of fsdp / deepspeed before the model is loaded (the rest: after the Trainer is built)."""
    if cfg.fsdp and not multi_process:
        raise ValueError(f"fsdp={cfg.fsdp!r} shards the model across processes, and this is one: launch it with "
                         "torchrun --nproc_per_node N -m ahn distill ... on N GPUs, or drop --fsdp")
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"deepspeed={cfg.deepspeed!r} but DeepSpeed is not installed: pip install deepspeed (on a "
                         "CUDA machine; it is in ahn's [gpu] extra), or drop --deepspeed")


def resume_checkpoint(cfg: DistillConfig) -> Optional[Path]:
    """The checkpoint this run resumes from (None: a fresh run), checked against the run in ``output``:
    resuming with other training settings is refused, naming them."""
    out = Path(cfg.output)
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        resume = last_complete_checkpoint(out / CHECKPOINTS)
    else:
        resume = Path(cfg.resume)
        if not is_complete_checkpoint(resume):
            raise ValueError(f"resume={cfg.resume!r} is not a complete checkpoint directory (with trainer_state.json); "
                             "use auto, never or a checkpoints/checkpoint-<step> directory")
    path = out / RUN_CONFIG_NAME
    if resume is not None and path.is_file():
        try:
            previous = DistillConfig.from_dict(yaml.safe_load(path.read_text()), source=str(path)).training_settings()
        except (ValueError, yaml.YAMLError) as e:
            raise ValueError(f"{path} cannot be read ({e}); choose another --output or pass --resume never") from None
        now = cfg.training_settings()
        diff = [f"{k}: {previous[k]!r} -> {v!r}" for k, v in now.items() if previous[k] != v]
        if diff:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)}); rerun with the same settings "
                             f"to resume it, or choose another --output (--resume never starts over in {out})")
    return resume


def _finished(checkpoint: Path) -> Optional[int]:
    """The planned step count of the run whose complete ``checkpoint`` is at its last step; None if it is not."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    steps = state.get("max_steps")
    return steps if isinstance(steps, int) and steps > 0 and state.get("global_step", 0) >= steps else None


def _write_error(e: OSError, out: Path) -> ValueError:
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ValueError(f"no space left on the device of {where} ({e.strerror}): free space or choose another "
                          "--output; rerunning resumes from the last complete checkpoint")
    return ValueError(f"cannot write {where} ({e.strerror}): choose a writable --output")


def distill(cfg: DistillConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Run self-distillation for ``cfg``; returns the output directory (the adapter, once finished).

    Resumes from the last complete checkpoint in ``output/checkpoints`` unless
    ``cfg.resume == "never"``. Ctrl-C or SIGTERM saves a checkpoint and returns without the
    final adapter. Everything is checked (settings, output, model, data, checkpoint) before
    anything is written.
    """
    cfg.check_required()
    out = Path(cfg.output)
    check_writable_folder(out, "--output")
    resume = resume_checkpoint(cfg)
    done = resume is not None and _finished(resume)
    if done and (out / WEIGHTS_NAME).is_file():  # resuming would train past max_steps and rotate checkpoints away
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ahn distill: {out} holds a finished run ({resume.name} of {_finished(resume)} steps); nothing to "
                  f"do, the adapter is left as it is (--resume never trains again from the start)", flush=True)
        return out
    interrupt = InterruptCallback()
    trainer = build_trainer(cfg, [interrupt, *callbacks])
    if resume is not None:
        trainer.check_checkpoint(resume)
    if done:  # finished, but the adapter was not written (stopped between the last checkpoint and the adapter)
        trainer.model.load_state_dict(load_file(str(resume / SAFE_WEIGHTS_NAME)), strict=False)
        try:
            trainer.save_adapter(out)
        except OSError as e:
            raise _write_error(e, out) from e
        if trainer.is_world_process_zero():
            print(f"ahn distill: {out} holds a finished run ({resume.name}); adapter written to {out} from it",
                  flush=True)
        return out
    try:
        if trainer.is_world_process_zero():
            out.mkdir(parents=True, exist_ok=True)
            n = sum(p.numel() for p in trainer.ahn_model.memory_parameters())
            print(f"ahn distill: {cfg.memory} memory, {n:,} trainable parameters; {len(trainer.train_dataset):,} "
                  "samples" + (f"; resuming from {resume}" if resume else ""), flush=True)
            replace_file(out / RUN_CONFIG_NAME, lambda p: p.write_text(cfg.to_yaml()))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if interrupt.stopped_early and trainer.state.global_step < trainer.state.max_steps:
            if trainer.is_world_process_zero():
                print(f"ahn distill: stopped at step {trainer.state.global_step}; checkpoint saved under "
                      f"{out / CHECKPOINTS}; run the same command again to resume", flush=True)
            return out
        trainer.save_adapter(out)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        raise _write_error(e, out) from e
    if trainer.is_world_process_zero():
        last = [r for r in trainer.state.log_history if "loss" in r]
        loss = f", last loss {last[-1]['loss']:.4g}" if last and not math.isnan(last[-1]["loss"]) else ""
        print(f"ahn distill: done, {trainer.state.global_step} steps{loss}; adapter written to {out}", flush=True)
    return out
