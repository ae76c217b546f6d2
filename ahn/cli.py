"""The ``ahn`` command line (also ``python -m ahn`` and ``torchrun -m ahn``)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from ahn import __version__
from ahn._cli_args import int_at_least, json_object
from ahn.benchmarks.evaluate import add_eval_arguments
from ahn.benchmarks.evaluate import run as run_eval
from ahn.config import MODES, READOUTS, readout_choice
from ahn.configs import load_model_config
from ahn.demo.run import add_arguments as add_demo_arguments
from ahn.demo.run import main_args as run_demo
from ahn.distill.config import add_arguments as add_distill_arguments
from ahn.distill.config import config_from_args

# Everything above builds the parser without torch (`ahn --help`, `ahn --version` stay fast); what imports torch
# (FLOPs, the trainer, generate) is imported by the command that runs it ("start-up time").


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own (examples keep their lines and indent) and
    appends ``(default: X)`` to an option that has a default worth showing (not required, not None, not
    an off switch)."""

    def _fill_text(self, text, width, indent):
        lines = []
        for line in text.splitlines():
            own = line[: len(line) - len(line.lstrip())]  # an indented line (an example) wraps with a hanging indent
            lines.append(textwrap.fill(line.strip(), width, initial_indent=indent + own,
                                       subsequent_indent=indent + own + ("    " if own else "")))
        return "\n".join(lines)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.required or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def _add_flops(sub) -> None:
    p = sub.add_parser(
        "flops",
        help="FLOPs and cache of full attention vs sinks + window vs window + memory",
        description=(
            "Analytic prefill FLOPs (matmuls; causal attention over the lower triangle; the memory's own cost) "
            "and the cache left after N tokens, for full attention, sinks + window, and window + memory."
        ),
        epilog=(
            "examples:\n"
            "  ahn flops --model Qwen2.5-3B-Instruct --seq-len 131072\n"
            "  ahn flops --model path/to/config.json --seq-len 32768 --window 8064 --sinks 64 --json\n"
            "  ahn flops --model Qwen3-8B --seq-len 65536 --plot flops.png --max-len 131072"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="config.json path, model directory, shipped config name (e.g. Qwen2.5-3B-Instruct) or Hub id")
    p.add_argument("--seq-len", type=int_at_least(1), required=True, help="tokens processed (prefill length)")
    p.add_argument("--window", type=int_at_least(1), default=32640, help="sliding-window tokens (excluding sinks)")
    p.add_argument("--sinks", type=int_at_least(0), default=128, help="attention-sink tokens")
    p.add_argument("--memory", default="gated_deltanet",
                   help="memory rule: gated_deltanet, deltanet, mamba2, kda, gdn2 or gated_deltaproduct")
    p.add_argument("--memory-kwargs", type=json_object, default=None, metavar="JSON",
                   help='the rule\'s options (AHNConfig.memory_kwargs), e.g. \'{"decay_rank": 8}\'')
    p.add_argument("--buffer-slots", "--buffer", dest="buffer", metavar="M", type=int_at_least(0), default=0,
                   help="priority-buffer slots per memory layer and kv head (AHNConfig.buffer_slots)")
    p.add_argument("--salience-writes", action="store_true", help="salience-gated writes (AHNConfig.salience_writes)")
    p.add_argument("--readout", type=readout_choice, choices=READOUTS, default="add",
                   help="memory read-out (AHNConfig.readout): add (the paper's) or defer")
    p.add_argument("--dtype", default="bfloat16", help="KV cache dtype (memory gates and states are float32)")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="sequences processed together")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="also plot FLOPs and cache against sequence length")
    p.add_argument("--max-len", type=int_at_least(1), default=None,
                   help="longest length on the plot (default: --seq-len)")
    p.set_defaults(func=_run_flops)


def _run_flops(args) -> int:
    from ahn.flops import ModelShape, compare, plot  # start-up time

    if args.plot and not Path(args.plot).parent.is_dir():
        raise ValueError(f"--plot {args.plot}: the folder {str(Path(args.plot).parent)!r} does not exist; create it "
                         "or choose another path")
    if args.plot:
        if not os.access(Path(args.plot).parent, os.W_OK | os.X_OK):
            raise ValueError(f"--plot {args.plot}: the folder {str(Path(args.plot).parent)!r} is not writable; choose "
                             "a folder you can write to")
        args.plot = args.plot if Path(args.plot).suffix else args.plot + ".png"  # the name matplotlib writes
    shape = ModelShape.from_config(load_model_config(args.model))
    kw = dict(window=args.window, sinks=args.sinks, memory=args.memory, dtype=args.dtype, batch=args.batch,
              buffer_slots=args.buffer, salience_writes=args.salience_writes, readout=args.readout,
              memory_kwargs=args.memory_kwargs)
    result = compare(shape, args.seq_len, **kw)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        options = f", buffer {args.buffer}" * bool(args.buffer) + ", salience writes" * args.salience_writes + (
            f", {args.readout} read-out" if args.readout != "add" else "")
        print(f"{args.model}: {args.seq_len:,} tokens, sinks {args.sinks}, window {args.window}, memory {args.memory}"
              f"{options}, KV {args.dtype}")
        print(f"{'mode':<8}{'TFLOPs':>12}{'saving':>9}{'cache GiB':>12}{'saving':>9}   FLOPs breakdown (TFLOPs)")
        for mode in MODES:
            r = result[mode]
            parts = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in r["flops_breakdown"].items())
            fs = f"{r['flops_saving_pct']:.1f}%" if mode != "full" else "-"
            cs = f"{r['cache_saving_pct']:.1f}%" if mode != "full" else "-"
            print(f"{mode:<8}{r['flops'] / 1e12:>12.1f}{fs:>9}{r['cache_bytes'] / 2**30:>12.3f}{cs:>9}   {parts}")
    if args.plot:
        plot(shape, args.max_len or args.seq_len, args.plot, title=args.model, **kw)
        print(f"plot written to {args.plot}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="long-context benchmarks (LV-Eval, InfiniteBench, LongBench, RULER, perplexity) per attention mode",
        description=(
            "Run a benchmark with the official prompts, truncation and metrics in each attention mode (full, "
            "window, ahn) and write per-mode predictions (resumable), results.json, results.md and results.png."
        ),
        epilog=(
            "examples:\n"
            "  ahn eval lveval --model Qwen/Qwen2.5-3B-Instruct --adapter ADAPTER_DIR --data LVEVAL_DIR "
            "--lengths 16k,32k --out runs/lveval\n"
            "  ahn eval ruler --model MODEL_DIR --adapter ADAPTER_DIR --lengths 8k --datasets niah_single_1,vt "
            "--limit 5 --out runs/ruler\n"
            "  ahn eval perplexity --model MODEL_DIR --window 1024 --sinks 64 --data book.txt --lengths 8k "
            "--modes window,ahn --out runs/ppl"
        ),
        formatter_class=HelpFormatter,
    )
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train a memory adapter by self-distillation from the frozen full-attention model",
        description=(
            "Self-distillation: the frozen model with full attention is the teacher, the same model with sinks + "
            "sliding window + memory the student; only the memory trains. Settings come from --config YAML and/or "
            "the flags below (flags win). Multi-process: torchrun --nproc_per_node N -m ahn distill ... "
            "Writes OUTPUT/ahn_adapter.safetensors + ahn_config.json (load with AHNModel.from_pretrained), "
            "distill_config.yaml, train_log.jsonl and checkpoints/; rerunning resumes from the last checkpoint."
        ),
        epilog=(
            "examples:\n"
            "  ahn distill --config tiny    # a shipped config by name (ahn/configs/distill/tiny.yaml)\n"
            "  ahn distill --model PATH_OR_ID --memory gated_deltanet --data train.jsonl --window 16 --sinks 4 "
            "--max-steps 12 --output out/\n"
            "  torchrun --nproc_per_node 8 -m ahn distill --config ahn/configs/distill/qwen2.5-3b-instruct-gdn.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_distill_arguments(p)
    p.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from ahn.distill.trainer import distill  # start-up time

    distill(config_from_args(args))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="read a text of any length through sinks + window + memory, then generate (greedy)",
        description=(
            "Reads --input (a UTF-8 file, or - for standard input; any length) in chunks of --chunk tokens with "
            "constant memory: the model keeps only sinks + window KV and its memory state. A progress bar shows "
            "tokens/s and the cache size. Then it generates up to --max-new-tokens tokens greedily to standard "
            "output. --save-state writes the state after reading the input (before generating); --state continues "
            "from one: reading A, saving, then reading B with --state computes exactly what reading A then B in one "
            "run computes (each input is cut into chunks from its own first token)."
        ),
        epilog=(
            "examples:\n"
            "  ahn generate --model Qwen/Qwen2.5-3B-Instruct --adapter ADAPTER_DIR --input book.txt --chat\n"
            "  ahn generate --model MODEL_DIR --adapter ADAPTER_DIR --input book.txt --save-state book.state "
            "--max-new-tokens 0\n"
            "  ahn generate --model MODEL_DIR --adapter ADAPTER_DIR --state book.state --input question.txt\n"
            "  cat notes.txt | ahn generate --model MODEL_DIR --input - --max-new-tokens 64"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model: local directory or Hub id, with its tokenizer")
    p.add_argument("--adapter", help="trained memory adapter directory (default: a fresh memory, i.e. sinks + window)")
    p.add_argument("--input", required=True, metavar="FILE", help="UTF-8 text file to read, or - for standard input")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=256,
                   help="tokens to generate after the input (0: only read, e.g. with --save-state)")
    p.add_argument("--chat", action="store_true",
                   help="read the input as one user turn of the tokenizer's chat template (with its generation prompt)")
    p.add_argument("--state", metavar="FILE",
                   help="continue from a state written by --save-state (same model and adapter; its window and sinks "
                        "are the default)")
    p.add_argument("--save-state", metavar="FILE",
                   help="write the state after reading the input, before generating (atomically; its size does not "
                        "grow with the text)")
    p.add_argument("--window", type=int_at_least(1),
                   help="sliding-window tokens (default: the state's, else the adapter's, else 32640)")
    p.add_argument("--sinks", type=int_at_least(0),
                   help="attention-sink tokens (default: the state's, else the adapter's, else 128)")
    p.add_argument("--chunk", type=int_at_least(1), default=4096, help="tokens per forward call while reading")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="model dtype")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from ahn.generate import run  # start-up time

    return run(args)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the built-in demo: a memory recovers what the window forgot (CPU, minutes, no download)",
        description=(
            "Distils a memory into the shipped recall teacher (a small Qwen2 model) and scores the same held-out "
            "sequences with full attention, sinks + window, and window + memory: accuracy on answers beyond the "
            "window (and within it), by distance. Writes results.json and accuracy.png under --out. --task text: "
            "the text teacher on held-out Paul Graham essays, window 256 + 16 sinks: full attention, sinks + window, "
            "the paper's memory, the recommended configuration, the buffer alone at equal cache bytes and the "
            "memory alone, on a needle grid, perplexity by position and word-pair recall (results.json, results.md, "
            "needles.png, perplexity.png, recall.png)."
        ),
        epilog=(
            "examples:\n"
            "  ahn demo\n"
            "  ahn demo --task text --out text-run\n"
            "  ahn demo --task text --quick --out text-quick\n"
            "  ahn demo --memory all --threads 2 --out demo-run\n"
            "  ahn demo --pairs 8 --steps 300"
        ),
        formatter_class=HelpFormatter,
    )
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ahn",
        description=(
            "ahn: long-context language models with a sliding-window KV cache, attention sinks and a "
            "compressed memory (Artificial Hippocampus Networks) for Hugging Face models."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ahn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_distill(sub)
    _add_eval(sub)
    _add_flops(sub)
    _add_generate(sub)
    for p in (parser, *sub.choices.values()):
        p.allow_abbrev = False  # a flag is what the user typed: --lr is not --lr-scheduler
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"ahn {args.command}: error: {e}\n")
