"""Argument types shared by the command lines of ahn (``ahn``, ``ahn demo``, ``ahn eval``, ...).

A low-level module (standard library only), so that every layer that builds flags can import it
and none has to import the CLI, which sits on top of them all.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``; argparse names the flag in the error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def json_object(text: str) -> dict:
    """An argparse ``type``: a JSON object (argparse names the flag in the error, exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"decay_rank\": 8}}'")
    return value
