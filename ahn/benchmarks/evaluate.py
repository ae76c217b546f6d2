"""`ahn eval`: the shared run loop of the long-context benchmarks.

One model is loaded once, given a memory (a trained adapter, or a fresh one, which is plain
sinks + window), and run greedily in each requested attention mode ("full", "window",
"ahn") on the same prompts. Per dataset and mode, predictions go to
``OUT/<mode>/<dataset>.jsonl`` one line per sample as soon as it is done; a restarted run
skips the samples already there, so an interrupted run resumes where it stopped and ends
with the same files; ``run.json`` holds the run's settings (the adapter also by the SHA-256
of its files) and a rerun with other settings or other adapter weights is refused. Then
``results.json``, ``results.md`` (datasets x modes) and ``results.png`` are written from
those files.

Launched as several processes (``torchrun --nproc_per_node N -m ahn eval ...`` or
``accelerate launch``: the ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` variables), each rank
takes the samples whose position in the run's sample order (datasets, then samples) is
``rank`` modulo the world size, runs them on its own device (``cuda:LOCAL_RANK`` with CUDA)
and writes ``OUT/ranks/<rank>/<mode>/<dataset>.jsonl``, resumable like a single process's files.
The ranks meet at gloo barriers (CPU, even when the models run on CUDA: only
coordination goes through them); once all are done, rank 0 merges every rank folder into
``OUT/<mode>/<dataset>.jsonl`` in the sample order and writes the results, the same files as a
single-process run. A rerun with another world size (or in one process) is correct: samples
finished in any rank folder or in ``OUT/<mode>/`` count as done, and the merge takes each
sample once.

The benchmark modules (:mod:`~ahn.benchmarks.lveval`, :mod:`~ahn.benchmarks.infinitebench`,
:mod:`~ahn.benchmarks.longbench`, :mod:`~ahn.benchmarks.ruler`) turn records into
:class:`Sample` lists with their official prompts; :mod:`~ahn.benchmarks.perplexity`
scores text instead of generating. This module imports no torch at import time (the CLI
builds its parser from it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

from ahn._cli_args import int_at_least
from ahn._io import replace_file
from ahn._jsonl import append_line, read_appended, read_jsonl
from ahn._loading import load_causal_lm, load_tokenizer
from ahn.config import CONFIG_NAME, MODES, AHNConfig
from ahn.plotting import pyplot

# `ahn --help` builds its parser from this module: torch, transformers, datasets, tqdm, matplotlib and the
# modules of ahn that import them are imported inside the functions that use them ("start-up time").

BENCHMARKS = ("lveval", "infinitebench", "longbench", "ruler", "perplexity")
RUN_FILE = "run.json"


# ----------------------------------------------------------------------------- samples and data
@dataclass(frozen=True)
class Sample:
    """One greedy generation to run and score.

    ``prompt`` is the user text before truncation; ``reference`` holds the record fields the
    scorer needs (written to the predictions file next to the prediction); ``system`` is a
    system message and ``answer_prefix`` text appended after the chat-formatted prompt (RULER).
    ``chat=False`` keeps this sample out of the chat template even when one is used.
    """

    id: str
    prompt: str
    max_new_tokens: int
    reference: dict
    system: Optional[str] = None
    answer_prefix: str = ""
    chat: bool = True


@dataclass
class Dataset:
    """Samples of one dataset (one file), with the official per-sample scorer (prediction -> [0, 1])."""

    name: str
    samples: list[Sample]
    score: Callable[[str, Sample], float]
    meta: dict = field(default_factory=dict)


def field_of(record: dict, name: str, kind: str, where: str):
    """``record[name]`` checked to be of ``kind``: "str", "list[str]" or "list" (non-empty lists).

    Raises ValueError naming ``where`` (file and line) and the field.
    """
    if name not in record:
        raise ValueError(f"{where}: field {name!r} is missing (fields present: {sorted(record)})")
    value = record[name]
    ok = {
        "str": isinstance(value, str),
        "list": isinstance(value, list) and len(value) > 0,
        "list[str]": isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise ValueError(f"{where}: field {name!r} must be a {'non-empty ' if kind != 'str' else ''}{kind}, "
                         f"got {value!r:.80}")
    return value


def load_records(data: Optional[str], names: Sequence[str], hub: Callable[[str], tuple[Optional[str], str]],
                 limit: Optional[int], example: str) -> dict[str, list[tuple[str, dict]]]:
    """``{name: [(location, record), ...]}``, the first ``limit`` records of each name.

    ``data`` is a directory holding ``<name>.jsonl`` (every file must exist) or a Hugging
    Face dataset id, read through ``datasets`` with ``hub(name) = (config, split)``.
    ``location`` ("file, line n") is what error messages name. ``example`` shows a valid
    ``--data`` in the error raised when it is missing.
    """
    if not data:
        raise ValueError(f"--data is required: {example}")
    out = {}
    if Path(data).is_dir():
        missing = [f"{n}.jsonl" for n in names if not (Path(data) / f"{n}.jsonl").exists()]
        if missing:
            raise ValueError(f"{data} lacks {', '.join(missing)}; pick what exists with --datasets / --lengths")
        for n in names:
            path = Path(data) / f"{n}.jsonl"
            rows = read_jsonl(path)
            out[n] = [(f"{path}, line {line}", r) for i, (line, r) in zip(range(limit or 2**62), rows)]
        return out
    from datasets import load_dataset  # start-up time

    for n in names:
        config, split = hub(n)
        rows = load_dataset(data, config, split=split)
        count = len(rows) if limit is None else min(limit, len(rows))
        out[n] = [(f"{data} {n}, row {i + 1}", dict(rows[i])) for i in range(count)]
    return out


# ----------------------------------------------------------------------------- prompts and truncation
def _halves(ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """The first and the last ``max_length // 2`` ids; ValueError below 2, where a half is no id at all."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 tokens: middle truncation keeps "
                         "max_length // 2 tokens from each end")
    half = max_length // 2
    return list(ids[:half]), list(ids[len(ids) - half:])


def middle_truncate(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first and the last ``max_length // 2`` ids when there are more than ``max_length``.

    The official harnesses' middle truncation (LongBench ``pred.py``, LV-Eval ``utils.py``,
    InfiniteBench ``truncate_input``): the instruction at the start and the question at
    the end survive.
    """
    head, tail = _halves(ids, max_length)
    return list(ids) if len(ids) <= max_length else head + tail


def truncate_prompt(tokenizer, prompt: str, max_length: int, decode_halves: bool) -> tuple[str, int, bool]:
    """Middle-truncate ``prompt`` to ``max_length`` tokens; returns (text, tokens before, truncated).

    ``decode_halves=True`` decodes the two halves separately and concatenates the strings
    (LongBench / LV-Eval); ``False`` decodes the joined ids once (InfiniteBench).
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    head, tail = _halves(ids, max_length)
    if len(ids) <= max_length:
        return prompt, len(ids), False
    if decode_halves:
        text = tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)
    else:
        text = tokenizer.decode(head + tail, skip_special_tokens=True)
    return text, len(ids), True


def build_input_ids(tokenizer, sample: Sample, text: str, use_chat: bool) -> list[int]:
    """Token ids of the model input: chat template (system + user turn, generation prompt) or raw text."""
    if use_chat and sample.chat:
        messages = ([{"role": "system", "content": sample.system}] if sample.system else [])
        messages.append({"role": "user", "content": text})
        formatted = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(formatted + sample.answer_prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(text + sample.answer_prefix)["input_ids"]


# ----------------------------------------------------------------------------- model
def load_model(model: str, adapter: Optional[str], window: Optional[int], sinks: Optional[int], dtype: str,
               device: str):
    """(AHNModel, tokenizer): the base model with the adapter at ``adapter``, or a fresh memory (= window)."""
    import torch  # start-up time

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r} must be one of {sorted(dtypes)}")
    tokenizer = load_tokenizer(model)
    base = load_causal_lm(model, dtype=dtypes[dtype]).to(device).eval()
    return attach_memory(base, adapter, window, sinks), tokenizer


def attach_memory(base, adapter: Optional[str], window: Optional[int], sinks: Optional[int], **overrides):
    """``base`` (a loaded causal LM) as an AHNModel: the adapter at ``adapter``, or a fresh memory (= window).

    ``window`` / ``sinks`` (and other AHNConfig ``overrides``, e.g. ``backend``) replace the
    adapter's values where given. ``ahn eval`` and the lm-evaluation-harness model (``ahn.lm_eval``)
    both load through here, so an adapter, window and sinks mean the same in both.
    """
    from ahn.model import AHNModel, add_memory  # start-up time

    overrides = {k: v for k, v in (("window", window), ("sinks", sinks), *overrides.items()) if v is not None}
    if not adapter:
        return add_memory(base, AHNConfig(**overrides))
    return AHNModel.from_pretrained(base, adapter, **overrides)  # a damaged file is named there


def adapter_files(adapter: str) -> list[Path]:
    """The files an adapter is read from: ahn's config + weights, else the official release's."""
    from ahn.adapters import OFFICIAL_WEIGHTS_NAME, WEIGHTS_NAME  # start-up time

    path = Path(adapter)
    names = (CONFIG_NAME, WEIGHTS_NAME) if (path / CONFIG_NAME).exists() else ("config.json", OFFICIAL_WEIGHTS_NAME)
    return [path / n for n in names if (path / n).exists()]


def adapter_fingerprint(adapter: Optional[str]) -> Optional[str]:
    """SHA-256 of the adapter's files (names and contents): a run resumes only with the same weights."""
    if not adapter:
        return None
    digest = hashlib.sha256()
    for f in adapter_files(adapter):
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_device(name: Optional[str], shard: Optional["Shard"] = None) -> str:
    """``--device`` checked to be usable on this machine (default: cuda if available, else cpu).

    In a multi-process run "cuda" (given or by default) is this process's GPU, ``cuda:LOCAL_RANK``.
    """
    import torch  # start-up time

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and shard is not None and shard.world > 1:
        name = f"cuda:{shard.local_rank}"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch build without CUDA
        raise ValueError(f"--device {name!r} cannot be used here ({e}); use --device cpu, or leave --device out "
                         "(cuda if available, else cpu)") from None
    return name


def generate(model, tokenizer, ids: list[int], mode: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy continuation of ``ids`` in ``mode``: (decoded text without special tokens, new tokens).

    A fresh generation config: greedy, no repetition penalty or sampling settings from the
    checkpoint; it stops at the checkpoint's EOS token(s).
    """
    import torch  # start-up time
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad[0] if isinstance(pad, list) else pad)
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad(), model.attention_mode(mode):
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    new = out[0, len(ids):]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


# ----------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Shard:
    """This process's part of a multi-process run (torchrun / accelerate launch): rank of world."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def owns(self, index: int) -> bool:
        """Whether the sample at ``index`` in the run's sample order is this rank's."""
        return index % self.world == self.rank

    @classmethod
    def from_env(cls) -> "Shard":
        """From ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (set by torchrun and accelerate launch); 0 of 1 without."""
        try:
            world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun or "
                             "accelerate launch, which set them)") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} must be in 0 .. WORLD_SIZE - 1 (WORLD_SIZE={world})")
        return cls(rank, world, local)


def barrier(shard: Shard) -> None:
    """Wait for every rank (a gloo process group, made on first use; nothing with one process).

    gloo on CPU whatever device the models use: only coordination goes through it. The timeout is
    long because ranks wait at the end for the slowest one, however long its samples take.
    """
    if shard.world == 1:
        return
    import torch.distributed as dist  # start-up time

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world, timeout=timedelta(weeks=52))
    dist.barrier()


def rank_dir(out: Path, rank: int) -> Path:
    return out / "ranks" / str(rank)


def read_finished(path: Path) -> list[dict]:
    """The complete lines of a predictions file, without touching it (another rank may be appending to it: an
    unfinished last line is left out). A complete line that is not a JSON object with an "id" is a ValueError
    naming the file and the line, as a rerun in the same folder reports it (:func:`read_predictions`)."""
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), 1):
        if line.endswith("\n") and line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}; fix or "
                                 "remove that line")
            if not isinstance(record.get("id"), (str, int)):
                raise ValueError(f"{path}, line {n}: a prediction needs an \"id\" (a string), got "
                                 f"{record.get('id')!r:.80}; fix or remove that line")
            records.append(record)
    return records


def finished_elsewhere(out: Path, shard: Shard, mode: str, name: str) -> set[str]:
    """Ids of ``name`` in ``mode`` already in ``OUT/<mode>/`` or in another rank's folder (an earlier run with
    another world size, or a single-process run): this rank does not redo them."""
    paths = [predictions_path(out, mode, name)] + [
        predictions_path(d, mode, name) for d in sorted((out / "ranks").glob("*")) if d != rank_dir(out, shard.rank)]
    return {r["id"] for p in paths for r in read_finished(p)}


def merge_ranks(out: Path, modes: Sequence[str], order: dict[str, Optional[list[str]]]) -> None:
    """Merge ``OUT/ranks/*/<mode>/<name>.jsonl`` (and an existing ``OUT/<mode>/<name>.jsonl``) into the latter,
    one line per id, ids in ``order[name]`` first in that order (then any others, in the order found);
    ``None``: numeric ids, in numeric order."""
    ranks = sorted((out / "ranks").glob("*"), key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0))
    for name, ids in order.items():
        for m in modes:
            records: dict[str, dict] = {}
            for path in [predictions_path(out, m, name)] + [predictions_path(d, m, name) for d in ranks]:
                for r in read_finished(path):
                    records.setdefault(r["id"], r)
            if not records:
                continue
            first = sorted(records, key=int) if ids is None else ids  # None: perplexity's sequence numbers
            wanted = [i for i in first if i in records]
            rest = [i for i in records if i not in set(first)]
            target = predictions_path(out, m, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_text(target, "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in wanted + rest))


# ----------------------------------------------------------------------------- predictions files
def predictions_path(out: Path, mode: str, dataset: str) -> Path:
    return out / mode / f"{dataset}.jsonl"


# The predictions files are appended a sample at a time; a run killed mid-line leaves an unfinished last line.
read_predictions = read_appended


def check_run_settings(out: Path, settings: dict) -> None:
    """Write ``run.json``, or check that an existing one (a run to resume) has the same settings."""
    path = out / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                "resume with the same settings or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- generation benchmarks
def run_generation(model, tokenizer, datasets: list[Dataset], modes: Sequence[str], out: Path, max_length: int,
                   use_chat: bool, decode_halves: bool, skip: Optional[dict] = None, desc: str = "ahn eval") -> dict:
    """Generate, score and write predictions for every dataset x mode; returns {dataset: {mode: [scores]}}.

    Samples already in a predictions file are skipped (resume), and so are the ids in
    ``skip[(dataset, mode)]`` (done by another rank). The progress bar counts samples and shows
    tokens per second (prompt + generated tokens over generation time).
    """
    from tqdm.auto import tqdm  # start-up time

    skip = skip or {}
    done = {(d.name, m): read_predictions(predictions_path(out, m, d.name)) for d in datasets for m in modes}
    finished_ids = {k: {r["id"] for r in v} | skip.get(k, set()) for k, v in done.items()}
    pending = sum(sum(s.id not in finished_ids[d.name, m] for s in d.samples) for d in datasets for m in modes)
    bar = tqdm(total=pending, unit="sample", desc=desc, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    for d in datasets:
        for m in modes:
            predictions_path(out, m, d.name).parent.mkdir(parents=True, exist_ok=True)
        inputs: dict[str, tuple[list[int], int, bool]] = {}
        for m in modes:
            finished = finished_ids[d.name, m]
            for s in d.samples:
                if s.id in finished:
                    continue
                if s.id not in inputs:
                    text, n_prompt, truncated = truncate_prompt(tokenizer, s.prompt, max_length, decode_halves)
                    inputs[s.id] = (build_input_ids(tokenizer, s, text, use_chat), n_prompt, truncated)
                ids, n_prompt, truncated = inputs[s.id]
                t0 = time.perf_counter()
                pred, n_new = generate(model, tokenizer, ids, m, s.max_new_tokens)
                seconds += time.perf_counter() - t0
                tokens += len(ids) + n_new
                record = {"id": s.id, "pred": pred, "score": d.score(pred, s), "prompt_tokens": n_prompt,
                          "truncated": truncated, "input_tokens": len(ids), "new_tokens": n_new, **s.reference}
                append_line(predictions_path(out, m, d.name), record)
                done[d.name, m].append(record)
                bar.update(1)
                bar.set_postfix_str(f"{d.name} {m} {tokens / max(seconds, 1e-9):.0f} tok/s")
    bar.close()
    wanted = {d.name: {s.id for s in d.samples} for d in datasets}
    return {d.name: {m: [r["score"] for r in done[d.name, m] if r["id"] in wanted[d.name]] for m in modes}
            for d in datasets}


# ----------------------------------------------------------------------------- results
def summarize(per_sample: dict, reduce: Callable[[list[float]], float]) -> tuple[dict, dict]:
    """(scores {dataset: {mode: value}}, counts {dataset: {mode: n}}) with ``reduce`` over each list."""
    scores = {d: {m: (reduce(v) if v else None) for m, v in by_mode.items()} for d, by_mode in per_sample.items()}
    counts = {d: {m: len(v) for m, v in by_mode.items()} for d, by_mode in per_sample.items()}
    return scores, counts


def official_mean(values: list[float]) -> float:
    """Per-dataset score reported the official way: mean x 100, rounded to 2 decimals."""
    return round(100 * sum(values) / len(values), 2)


def markdown_table(scores: dict, modes: Sequence[str], metric: str, average: bool = True) -> str:
    """A Markdown table, one row per dataset and one column per mode (plus an average row)."""
    lines = [f"| {metric} | " + " | ".join(modes) + " |", "| --- | " + " | ".join("---:" for _ in modes) + " |"]
    for d, row in scores.items():
        lines.append(f"| {d} | " + " | ".join("-" if row[m] is None else f"{row[m]:.2f}" for m in modes) + " |")
    if average and len(scores) > 1:
        means = []
        for m in modes:
            vals = [row[m] for row in scores.values() if row[m] is not None]
            means.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
        lines.append("| **average** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(path: Path, scores: dict, modes: Sequence[str], title: str, ylabel: str) -> None:
    """Grouped bars: one group per dataset, one bar per mode (matplotlib, Agg backend)."""
    plt = pyplot()
    names = list(scores)
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * len(modes) * 0.5 + 2), 4.5))
    for k, m in enumerate(modes):
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [scores[d][m] or 0.0 for d in names], width, label=m)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_results(out: Path, settings: dict, scores: dict, counts: dict, modes: Sequence[str], metric: str,
                  average: bool = True) -> str:
    """Write results.json, results.md and results.png; returns the Markdown table."""
    results = {**settings, "metric": metric, "scores": scores, "samples": counts}
    _write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    table = markdown_table(scores, modes, metric, average)
    _write_text(out / "results.md", table)
    plot_scores(out / "results.png", scores, modes, f"{settings['benchmark']}: {settings['model']}", metric)
    return table


def _write_text(path: Path, text: str) -> None:
    """Atomically: a run killed mid-write leaves the previous file, never half of one."""
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- CLI
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_token_counts(value: str, minimum: int = 1) -> list[int]:
    """``"4096,8k"`` -> ``[4096, 8192]`` (``k`` = 1024), each at least ``minimum``."""
    out = []
    for item in _csv(value):
        m = re.fullmatch(r"(\d+)([kK]?)", item)
        if not m:
            raise ValueError(f"--lengths {item!r}: give token counts such as 4096 or 4k")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
        if out[-1] < minimum:
            raise ValueError(f"--lengths {item}: each length must be at least {minimum} tokens")
    return out


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ahn eval`` (the CLI calls this; :func:`run` executes them)."""
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark to run")
    p.add_argument("--model", required=True, help="base model: local directory or Hub id")
    p.add_argument("--adapter", help="trained memory adapter directory (default: a fresh memory, i.e. sinks + window)")
    p.add_argument("--modes", default="full,window,ahn", help="comma-separated attention modes to compare")
    p.add_argument("--window", type=int_at_least(1), help="sliding-window tokens (default: the adapter's, else 32640)")
    p.add_argument("--sinks", type=int_at_least(0), help="attention-sink tokens (default: the adapter's, else 128)")
    p.add_argument("--data", help="local directory in the benchmark's official layout, or a Hub dataset id; "
                                   "ruler: optional haystack text file; perplexity: a .txt / .jsonl file or Hub id")
    p.add_argument("--datasets", help="comma-separated datasets / tasks (default: all of the benchmark's)")
    p.add_argument("--lengths", help="comma-separated lengths: LV-Eval levels (16k,32k,...) or token counts "
                                     "(ruler, perplexity)")
    p.add_argument("--out", "--output", dest="out", required=True, help="output directory (an existing run there is resumed)")
    p.add_argument("--limit", type=int_at_least(1),
                   help="at most N samples per dataset (ruler: samples generated per task, default 25; perplexity: "
                        "sequences per length)")
    p.add_argument("--max-length", type=int_at_least(2), help="prompt tokens kept by middle truncation (default: "
                                                                "the benchmark's official value)")
    p.add_argument("--max-new-tokens", type=int_at_least(1),
                   help="cap every dataset's official generation length (quick runs; recorded in run.json)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed raw prompts even if the tokenizer has a chat template")
    p.add_argument("--split", default="test", help="split of a Hub dataset (perplexity)")
    p.add_argument("--text-field", default="text", help="text field of .jsonl / Hub records (perplexity)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the RULER generator")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Execute ``ahn eval`` (see :func:`add_eval_arguments`); prints the results table."""
    modes = _csv(args.modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes {args.modes!r}: each mode must be one of {MODES}")
    bench = importlib.import_module(f"ahn.benchmarks.{args.benchmark}")
    out = Path(args.out)
    shard = Shard.from_env()
    device = resolve_device(args.device, shard)
    model, tokenizer = load_model(args.model, args.adapter, args.window, args.sinks, args.dtype, device)
    window, sinks = model.ahn_config.window, model.ahn_config.sinks
    settings = {"benchmark": args.benchmark, "model": args.model, "adapter": args.adapter,
                "adapter_sha256": adapter_fingerprint(args.adapter), "window": window, "sinks": sinks,
                "dtype": args.dtype, "data": args.data}
    if args.benchmark == "ruler":
        settings["seed"] = args.seed  # same dataset names, other samples
    if args.benchmark == "perplexity":
        lengths = settings["lengths"] = bench.parse_lengths(args.lengths)
        order = {f"ppl_{L}": None for L in lengths}  # ids "0", "1", ...: numeric order

        def work(target: Path, part: Shard, skip: Optional[dict] = None) -> tuple[dict, dict]:
            return bench.run(model, tokenizer, args, modes, target, lengths, shard=part, skip=skip)
    else:
        use_chat = not args.no_chat_template and getattr(tokenizer, "chat_template", None) is not None
        max_length = args.max_length or bench.DEFAULT_MAX_LENGTH
        settings.update(max_length=max_length, chat_template=use_chat, max_new_tokens=args.max_new_tokens)
        datasets = bench.load(args, tokenizer, use_chat)
        if args.max_new_tokens:
            for d in datasets:
                d.samples = [replace(s, max_new_tokens=min(s.max_new_tokens, args.max_new_tokens)) for s in d.samples]
        order = {d.name: [s.id for s in d.samples] for d in datasets}

        def work(target: Path, part: Shard, skip: Optional[dict] = None) -> tuple[dict, dict]:
            index = iter(range(2**62))  # sample numbers over the datasets in order
            mine = [replace(d, samples=[s for s in d.samples if part.owns(next(index))]) for d in datasets]
            desc = "ahn eval" if part.world == 1 else f"ahn eval [rank {part.rank}/{part.world}]"
            per_sample = run_generation(model, tokenizer, mine, modes, target, max_length, use_chat,
                                        bench.DECODE_HALVES, skip=skip, desc=desc)
            return summarize(per_sample, official_mean)

    if shard.rank == 0:  # rank 0 writes run.json (or refuses other settings) before the others read it
        check_run_settings(out, settings)
    barrier(shard)
    if shard.rank != 0:
        check_run_settings(out, settings)
    if shard.world > 1:
        skip = {(name, m): finished_elsewhere(out, shard, m, name) for name in order for m in modes}
        work(rank_dir(out, shard.rank), shard, skip)
        barrier(shard)  # every rank's samples are written
        if shard.rank != 0:
            return 0
    if (out / "ranks").is_dir():
        merge_ranks(out, modes, order)
    scores, counts = work(out, Shard())  # all done after a multi-process run: only reads and scores
    table = write_results(out, settings, scores, counts, modes, bench.METRIC, average=args.benchmark != "perplexity")
    print(table, end="")
    print(f"results written to {out}/results.json, results.md, results.png")
    return 0
