"""argparse ``type=`` parsers shared by the command-line tools (bench, demo)."""
from __future__ import annotations

import argparse
import os
import tempfile
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
    try:  # (a folder may pass the access check and still refuse files: a file system of its own)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".pyreg-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        parser.error(f"argument {option}: cannot write files into {path!r} ({e.strerror or e})")
    return path


class OutputError(Exception):
    """A result file the run could not write (full disk, a folder in its
    place...): the tool's one-line error (exit 1), after the run."""


def output_error(e: OSError) -> OutputError:
    name = getattr(e, "filename2", None) or getattr(e, "filename", None)  # (a rename's target, else the file)
    where = f" {name}" if name else ""
    return OutputError(f"cannot write{where}: {e.strerror or e}")
