"""The ``ahn`` command line. Sub-commands are added by the capabilities that provide them."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ahn import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ahn",
        description=(
            "ahn: long-context language models with a sliding-window KV cache, attention sinks and a "
            "compressed memory (Artificial Hippocampus Networks) for Hugging Face models."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ahn {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)
