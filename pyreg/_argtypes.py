"""argparse ``type=`` parsers shared by the command-line tools (bench, demo)."""
from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional, Sequence


def choice_list(choices: Sequence[str], what: str, lower: bool = False) -> Callable[[str], List[str]]:
    """A comma list of names from ``choices``, in order, without repeats."""
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if lower:
            items = [x.lower() for x in items]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list of {what}")
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad))} (choose from {', '.join(choices)})")
        return list(dict.fromkeys(items))
    return parse


def int_in(lo: int, hi: Optional[int] = None, hi_text: Optional[str] = None) -> Callable[[str], int]:
    """An integer with lo <= value (< hi when given; hi_text: how to print hi)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value >= hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi_text or hi})"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def output_folder(parser: argparse.ArgumentParser, path: str, option: str = "--out") -> str:
    """The output folder, made now (with its parents) and found writable, so
    that a bad one stops the tool before its run, not after it (exit 2)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"argument {option}: cannot make the folder {path!r} ({e.strerror or e})")
    if not os.access(path, os.W_OK | os.X_OK):
        parser.error(f"argument {option}: the folder {path!r} is not writable")
    return path
