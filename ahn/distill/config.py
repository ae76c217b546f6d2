"""`DistillConfig`: every setting of a self-distillation run, from YAML and/or command-line flags.

One dataclass is the single source of truth: the YAML keys, the ``ahn distill`` flags
(``--learning-rate`` for ``learning_rate``) and their help texts all come from its fields.
Defaults follow the AHN paper's recipe (ByteDance-Seed/AHN, train_qwen2.5_3b_ahn_gdn.sh):
AdamW, lr 1e-4, cosine schedule with 10% warmup, weight decay 0.1, KL on positions beyond
the window, random window / sinks, samples cut at 24,576 tokens. The paper also drops samples
of 288 tokens or fewer; that filter is a data choice of its recipe (``min_length: 288`` in
configs/distill/qwen2.5-*.yaml), not a library default: by default every sample with a
position beyond sinks + window (:attr:`DistillConfig.lossless_length`) is kept.

Every value (YAML or flag) is checked against its field's type when the config is built; a
YAML string that spells a number (``learning_rate: 1e-3``, which PyYAML reads as a string) is
converted.
"""

from __future__ import annotations

import argparse
import json
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import yaml

from ahn.configs import MODELS_DIR

from .sampling import PAPER_BUDGETS, PAPER_MAX_SINK_FRACTION, PAPER_MIN_BUDGET_FRACTION, PAPER_SINKS, WindowSampler


# The words of transformers' TrainingArguments.fsdp string that FSDP2 (its default since transformers 5) accepts.
FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


def _f(default, help: str, **kw):
    """A field with its help text; ``required=True``: the run needs a value; ``run_only=True``: the setting does not
    change the trained weights, so a resumed run may change it (:meth:`DistillConfig.training_settings`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_INT = re.compile(r"[+-]?\d+")


def _coerce(name: str, hint, value):
    """``value`` as the type ``hint`` of field ``name`` (a string that spells a number becomes one: YAML reads
    ``1e-3`` as a string); raises ValueError naming the key, the value and the expected type."""
    kinds = [t for t in (typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)) if t is not type(None)]
    if value is None and len(kinds) < len(typing.get_args(hint)):
        return None
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str) and _INT.fullmatch(value.strip()):
                return int(value)
        if kind is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if kind is str and isinstance(value, str):
            return value
        if kind is list and isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        if kind is dict and isinstance(value, dict):
            return dict(value)
    expected = " or ".join({bool: "true/false", int: "an int", float: "a number", str: "a string",
                            list: "a list of ints", dict: "a mapping (JSON object)"}[k] for k in kinds)
    raise ValueError(f"{name}={value!r} ({type(value).__name__}) must be {expected}"
                     + (" or null" if len(kinds) < len(typing.get_args(hint)) else ""))


@dataclass
class DistillConfig:
    # ---------------------------------------------------------------- model and memory
    model: Optional[str] = _f(None, "base model: a local directory, a Hub id, or demo-teacher (the shipped demo "
                                    "model)", required=True)
    memory: str = _f("gated_deltanet", "memory rule: gated_deltanet, deltanet, mamba2, kda, gdn2 or gated_deltaproduct")
    memory_kwargs: dict = _f({}, "rule-specific memory options (YAML mapping or JSON string)")
    layers: Optional[list] = _f(None, "decoder layers that get a memory (default: all)")
    backend: str = _f("auto", "ahn.kernels backend of the memory (auto, torch, fla, ...)")
    buffer_slots: int = _f(0, "priority buffer: exact KV slots per memory layer and kv head for the most salient "
                              "evicted tokens (0: none, the paper's mechanism)")
    salience_writes: bool = _f(False, "scale each evicted token's memory write by sigmoid(its salience)")
    readout: str = _f("add", "memory read-out: add (added to attention, the paper's) or defer (weighted by its share "
                             "of a softmax beside the attended keys)")
    salience_mass: bool = _f(True, "the salience score reads the attention a token received in the window (false: "
                                   "the token alone, and prefill attention needs no explicit softmax for it)")
    salience_mass_stride: Optional[int] = _f(None, "the received mass from every s-th query, each counted s times "
                                                   "(default: window // 256, at least 1; 1: every query)")
    # ---------------------------------------------------------------- data
    data: Optional[str] = _f(None, "training data: .jsonl/.json/.parquet file or directory, Hub id, or 'synthetic'",
                             required=True)
    data_split: str = _f("train", "split of a Hub dataset")
    synthetic: dict = _f({}, "options of the synthetic source (see ahn.distill.synthetic)")
    max_samples: Optional[int] = _f(None, "use only the first N records (the paper: 100000)")
    max_length: Optional[int] = _f(24576, "cut samples to this many tokens (the paper's cutoff_len)")
    min_length: int = _f(0, "keep only samples longer than this many tokens (the paper's filter_len: 288); samples "
                            "with no position beyond sinks + window are always dropped")
    response_only: bool = _f(False, "distil only positions predicting response tokens (chat: assistant turns; "
                                    "input_ids records: tokens whose 'labels' are not -100)")
    # ---------------------------------------------------------------- window and sinks
    window: Union[int, str] = _f("random", "sliding window per batch: an int, or 'random' (paper recipe)")
    sinks: int = _f(0, "attention sinks with a fixed window")
    budgets: list = _f(list(PAPER_BUDGETS), "random mode: candidates for sinks + window")
    sink_choices: list = _f(list(PAPER_SINKS), "random mode: candidates for sinks")
    min_budget_fraction: float = _f(PAPER_MIN_BUDGET_FRACTION, "random mode: sinks + window > this x sequence length")
    max_sink_fraction: float = _f(PAPER_MAX_SINK_FRACTION, "random mode: sinks <= this x (sinks + window)")
    inference_window: Optional[int] = _f(None, "window stored in the adapter (default: the fixed window, else 32640)")
    inference_sinks: Optional[int] = _f(None, "sinks stored in the adapter (default: the fixed sinks, else 128)")
    # ---------------------------------------------------------------- loss
    kl_weight: float = _f(1.0, "weight of KL(teacher || student) on positions beyond the window")
    response_weight: float = _f(1.0, "KL weight of positions predicting a response token (labelled) relative to "
                                     "the other distilled positions (response_only drops the others)")
    ce_weight: float = _f(0.0, "weight of the student's cross entropy on the labels, same positions")
    hidden_weight: float = _f(0.0, "weight of the per-layer hidden-state MSE, same positions")
    salience_weight: float = _f(1.0, "weight of the salience loss (memories with a salience scorer: buffer_slots > 0 "
                                     "or salience_writes): cross entropy of the scores against the teacher's attention "
                                     "mass on each evicted token")
    temperature: float = _f(1.0, "softmax temperature of the KL term")
    loss_chunk: int = _f(1024, "positions per LM-head chunk in the loss (memory vs speed)")
    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only; norms, biases and gate vectors get none)")
    warmup_ratio: float = _f(0.1, "fraction of the steps with linear warmup")
    lr_scheduler: str = _f("cosine", "learning-rate schedule (transformers' names: cosine, linear, constant, ...)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    batch_size: int = _f(1, "sequences per device per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    epochs: float = _f(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps (> 0 overrides epochs)")
    seed: int = _f(0, "seed of the data order, the window draws and the memory init")
    bf16: Union[bool, str] = _f("auto", "bfloat16 autocast: true, false, or auto (on when CUDA supports it)")
    gradient_checkpointing: bool = _f(False, "recompute decoder layers in the backward pass (less memory)",
                                      run_only=True)
    # ---------------------------------------------------------------- output and logging
    output: Optional[str] = _f(None, "output directory: the adapter, run config, log and checkpoints", required=True,
                               run_only=True)
    save_steps: int = _f(500, "save a checkpoint every N steps", run_only=True)
    save_total_limit: Optional[int] = _f(2, "keep at most this many checkpoints", run_only=True)
    logging_steps: int = _f(10, "log every N steps", run_only=True)
    report_to: str = _f("none", "also log to: none, tensorboard, wandb, ... (comma-separated)", run_only=True)
    resume: str = _f("auto", "auto (resume from the last complete checkpoint in output), never, or a checkpoint path",
                     run_only=True)
    progress: bool = _f(True, "show a progress bar", run_only=True)
    dataloader_workers: int = _f(0, "DataLoader worker processes", run_only=True)
    preprocess_workers: Optional[int] = _f(None, "processes that tokenise the data (datasets.map num_proc)", run_only=True)
    deepspeed: Optional[str] = _f(None, "DeepSpeed config JSON (e.g. ZeRO-3) for multi-GPU runs")
    fsdp: Optional[str] = _f(None, "FSDP2 across GPU processes (torchrun): words of " + " / ".join(FSDP_WORDS)
                             + " (e.g. 'full_shard auto_wrap'); docs/distill.md")

    def __post_init__(self):
        hints = typing.get_type_hints(DistillConfig)
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        if isinstance(self.window, str):
            if self.window.lstrip("-").isdigit():
                self.window = int(self.window)
            elif self.window != "random":
                raise ValueError(f"window={self.window!r} must be an int >= 1 or 'random'")
        if isinstance(self.bf16, str) and self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16={self.bf16!r} must be true, false or auto")
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            self.bf16 = self.bf16 == "true"
        for name in ("batch_size", "grad_accum", "save_steps", "logging_steps", "loss_chunk"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        for name in ("max_samples", "max_length", "save_total_limit", "preprocess_workers", "inference_window"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}={v!r} must be >= 1 (or unset)")
        for name in ("kl_weight", "ce_weight", "hidden_weight", "salience_weight", "learning_rate", "weight_decay", "response_weight",
                     "max_grad_norm", "dataloader_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        for name in ("min_length", "inference_sinks"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name}={v!r} must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if self.kl_weight == self.ce_weight == self.hidden_weight == 0:
            raise ValueError("kl_weight, ce_weight and hidden_weight are all 0: nothing to train")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if self.max_length is not None and self.max_length <= self.min_length:
            raise ValueError(f"max_length={self.max_length} must exceed min_length={self.min_length}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        self.sampler()  # validates window / sinks / budgets
        self.fsdp_config()  # validates fsdp
        if self.fsdp and self.deepspeed:
            raise ValueError(f"fsdp={self.fsdp!r} and deepspeed={self.deepspeed!r}: choose one of them")
        if self.max_length is not None and self.max_length <= self.lossless_length:
            raise ValueError(f"max_length={self.max_length} leaves no position beyond sinks + window = "
                             f"{self.lossless_length}: nothing would be distilled; use a smaller window / sinks")

    def fsdp_config(self) -> Optional[dict]:
        """``fsdp`` as transformers' ``TrainingArguments.fsdp_config`` for FSDP2 (None: no FSDP). The words are those
        of transformers' ``fsdp`` string, whose string form transformers deprecates: full_shard (re-shard the weights
        after each forward, the default) or shard_grad_op (keep them gathered until backward), offload (parameters
        on CPU between uses), auto_wrap (one FSDP unit per decoder layer; always so)."""
        if not self.fsdp:
            return None
        words = self.fsdp.split()
        unknown = [w for w in words if w not in FSDP_WORDS]
        if unknown:
            raise ValueError(f"fsdp={self.fsdp!r}: unknown {', '.join(map(repr, unknown))}; use words of "
                             f"{', '.join(FSDP_WORDS)} (FSDP2; FSDP1-only strategies such as hybrid_shard are not "
                             "supported)")
        if "full_shard" in words and "shard_grad_op" in words:
            raise ValueError(f"fsdp={self.fsdp!r}: full_shard and shard_grad_op exclude each other; choose one")
        return {"version": 2, "reshard_after_forward": "shard_grad_op" not in words, "cpu_offload": "offload" in words}

    @property
    def lossless_length(self) -> int:
        """Tokens at the start of every sample that are never distilled: sinks + window with a fixed
        window; 1 with random windows (a draw keeps fewer than the batch's length lossless, so a
        sample of two tokens or more always has a position to distil)."""
        return 1 if self.window == "random" else self.window + self.sinks

    def training_settings(self) -> dict:
        """The settings that shape the trained weights, as YAML values: every field but the run-only ones
        (output, resume, logging, saving, progress, worker counts, gradient checkpointing), which may
        change between a run and its resumption."""
        values = yaml.safe_load(self.to_yaml())
        return {f.name: values[f.name] for f in fields(self) if not f.metadata.get("run_only")}

    def check_required(self) -> None:
        missing = [f.name for f in fields(self) if f.metadata.get("required") and getattr(self, f.name) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}: pass " + " ".join(f"--{n}" for n in missing)
                             + " or set them in the --config YAML")

    def sampler(self) -> WindowSampler:
        return WindowSampler(
            window=None if self.window == "random" else self.window, sinks=self.sinks, budgets=tuple(self.budgets),
            sink_choices=tuple(self.sink_choices), min_budget_fraction=self.min_budget_fraction,
            max_sink_fraction=self.max_sink_fraction, seed=self.seed,
        )

    # ---------------------------------------------------------------- YAML
    @classmethod
    def from_yaml(cls, path, **overrides) -> "DistillConfig":
        """The config in YAML file ``path`` (see :func:`find_config`), with ``overrides`` on top."""
        path = find_config(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of DistillConfig keys")
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; run `ahn distill --help` for the valid ones")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def find_config(spec) -> Path:
    """A run config file: the path ``spec``, else a shipped config (package ``ahn.configs``) by name, with or
    without ``ahn/configs/``, ``distill/`` and ``.yaml``: ``tiny``, ``distill/tiny.yaml``, ``ahn/configs/distill/tiny.yaml``."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = MODELS_DIR.parent
    name = str(spec).removeprefix("ahn/").removeprefix("configs/")
    for candidate in (name, f"{name}.yaml", f"distill/{name}", f"distill/{name}.yaml"):
        if (shipped / candidate).is_file():
            return shipped / candidate
    names = ", ".join(sorted(p.stem for p in (shipped / "distill").glob("*.yaml")))
    raise ValueError(f"config file {spec} does not exist and is not a shipped config; shipped: {names}")


# ---------------------------------------------------------------------- command line
def _flag_type(f):
    """(argparse kwargs) for a DistillConfig field."""
    hint = typing.get_type_hints(DistillConfig)[f.name]
    args = set(typing.get_args(hint)) - {type(None)}
    base = hint if not args else (args.pop() if len(args) == 1 else str)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base is list or typing.get_origin(base) is list:
        return {"nargs": "+", "type": int}
    if base is dict:
        return {"type": _json_flag, "metavar": "JSON"}
    if base is float:
        return {"type": float}
    if base is int:
        return {"type": int}
    return {"type": str}


def _json_flag(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg}); e.g. '{{\"key\": 1}}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field; unset flags stay out of the namespace (YAML values then hold)."""
    parser.add_argument("--config", metavar="YAML", help="run config (keys as the flags below, with underscores): "
                        "a YAML path or a shipped config's name (e.g. tiny, qwen2.5-3b-instruct-gdn)")
    for f in fields(DistillConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["help"] + (" (required)" if f.metadata.get("required") else
                                          f" (default: {default})" if default is not None else "")
        kw = _flag_type(f)
        flags = ["--" + f.name.replace("_", "-")] + (["--out"] if f.name == "output" else [])  # --out as in demo / eval
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kw)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(DistillConfig) if hasattr(args, f.name)}
    if getattr(args, "config", None):
        cfg = DistillConfig.from_yaml(args.config, **overrides)
    else:
        cfg = DistillConfig.from_dict(overrides)
    cfg.check_required()
    return cfg
