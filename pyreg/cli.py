"""pyreg's command line (also ``python -m pyreg``):

    pyreg info    versions, compiled backends, CPU instruction set, threads
    pyreg demo    a regularization study (see ``pyreg demo --help``)
    pyreg bench   the benchmark suite (see ``pyreg bench --help``)

Each subcommand owns its options; this module only routes to it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

_COMMANDS = {
    "info": "versions (pyreg, torch, Python), compiled backends, CPU instruction set, threads",
    "demo": "regularization study on generated and real data: L1, L2, elastic net, group lasso, alpha grid and "
            "path, one strength for every layer, target sparsity, LSTM, fine-tuning, compaction",
    "bench": "benchmark suite: pyreg vs Python loop, torch._foreach, torch.compile, torch's fused AdamW, roofline",
}


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader closed its end (``pyreg info | head -1``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nor at the final flush)
        return 141  # as a shell reports SIGPIPE


def _main(argv: Optional[List[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="pyreg", description="Fused L1 / L2 / elastic-net regularization for PyTorch.",
        epilog="Run 'pyreg COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"pyreg {_version()}")
    parser.add_argument("command", choices=sorted(_COMMANDS),
                        help="; ".join(f"{k}: {v}" for k, v in _COMMANDS.items()))
    if not argv or argv[0] not in _COMMANDS:
        parser.parse_args(argv[:1])  # prints usage, the version or an error, and exits
    command, rest = argv[0], argv[1:]
    if command == "info":
        argparse.ArgumentParser(prog="pyreg info", description=_COMMANDS["info"]).parse_args(rest)
        from .info import main as info_main

        return info_main()
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    from .bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
