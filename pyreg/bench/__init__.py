"""pyreg's benchmark suite (``pyreg bench`` or ``python bench/run.py``).

Times ``weight_stats``, ``add_penalty_grad_``, ``prox_``, the group ops
``group_prox_`` and ``max_norm_`` on the parameter shapes of real models,
against a Python loop of torch ops, ``torch._foreach_*``, ``torch.compile`` of the loop,
and the same-traffic roofline op over one flat buffer; and a whole AdamW
step with L1 (``step``): ``pyreg.optim.AdamW`` against ``Regularized`` around
torch's fused AdamW, torch's AdamW alone and torch's AdamW plus a Python-loop
prox. Checks every peer's output against pyreg's before timing it. Writes a markdown table, JSON and a
PNG per device. Method: bench/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from typing import List, Optional

import torch

from .._argtypes import choice_list, int_in
from . import peers as P
from . import report
from . import shapes as S

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def _tag(text: str) -> str:
    if not text or not all(ch.isalnum() or ch == "-" for ch in text) or text.startswith("-"):
        raise argparse.ArgumentTypeError(f"--tag must be letters, digits and '-', not {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyreg bench",
        description="Benchmark pyreg's ops against a Python loop, torch._foreach, torch.compile and the "
                    "same-traffic bandwidth roofline, on the parameter shapes of real models.")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats; torch.compile only for shape sets of at most "
                        "16 tensors (the run says what it skipped)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cpu, plus cuda when available")
    p.add_argument("--shapes", type=choice_list(S.ORDER, "shape sets"), default=S.ORDER,
                   help=f"comma list of {', '.join(S.ORDER)} (default: all; gpt-1.3b runs on GPU only)")
    p.add_argument("--ops", type=choice_list(P.OP_ORDER, "ops"), default=P.OP_ORDER,
                   help=f"comma list of {', '.join(P.OP_ORDER)} (default: all)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results when it exists here, else ./bench-results)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--tag", type=_tag, default=None,
                   help="suffix for the output file names (letters, digits, '-'), e.g. omp-passive")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: time every call as the replay of a CUDA graph that captured it "
                        "(device time without host launch overhead: the steady state of a captured "
                        "training step); output files get '-cuda-graphs'")
    p.add_argument("--repeats", type=int_in(1), default=None,
                   help="timed calls per measurement, at least (default 15, --quick 5)")
    return p


def _is_default_cache(path: str) -> bool:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return False
    return os.path.abspath(path) == os.path.abspath(default_cache_dir())


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if args.cuda_graphs:
        if args.device in ("cpu", "all"):
            p.error(f"--cuda-graphs times CUDA graphs: it needs --device cuda, not --device {args.device}")
        devices = ["cuda"]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error(f"{'--cuda-graphs' if args.cuda_graphs else '--device cuda'}: torch has no usable CUDA "
                "device here")
    out = args.out or ("bench/results" if os.path.isdir("bench/results") else "bench-results")
    os.makedirs(out, exist_ok=True)

    from .suite import Suite

    # Cold compile times: a fresh inductor cache for this run (unless the user set one).
    # (torch sets the variable to its default itself on import: only a different value is the user's.)
    own_cache, previous = None, os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not args.no_compile and (previous is None or _is_default_cache(previous)):
        own_cache = tempfile.mkdtemp(prefix="pyreg-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = own_cache
    try:
        for dev in devices:
            t0 = time.perf_counter()
            print(f"== pyreg bench on {dev}: shapes {','.join(args.shapes)}; ops {','.join(args.ops)}; "
                  f"{args.dtype}; {'quick' if args.quick else 'full'}; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads", flush=True)
            suite = Suite(torch.device(dev), DTYPES[args.dtype], args.shapes, args.ops, args.quick,
                          not args.no_compile, args.repeats, graphs=args.cuda_graphs)
            res = suite.run()
            if own_cache is None and any(r["peer"] == "compile" and r["ms"] for r in res["rows"]):
                res["notes"].append("TORCHINDUCTOR_CACHE_DIR was set: compile times may be warm-cache times")
            stem = os.path.join(out, res["meta"]["slug"] + ("-quick" if args.quick else "")
                                + ("-cuda-graphs" if args.cuda_graphs else "")
                                + (f"-{args.tag}" if args.tag else ""))
            png = stem + ".png"
            have_png = report.plot(res, png)
            res["files"] = {"json": stem + ".json", "markdown": stem + ".md", "png": png if have_png else None}
            report.write_json(res, stem + ".json")
            md = report.markdown(res, os.path.basename(png) if have_png else None)
            with open(stem + ".md", "w") as f:
                f.write(md)
            print()
            print(report.header(res))
            print()
            print(report.summary_table(res))
            print()
            print(report.full_table(res))
            print(f"\nwrote {stem}.json, {stem}.md" + (f", {png}" if have_png else " (no matplotlib: no plot)")
                  + f" in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if own_cache is not None:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            # Removed at exit, not now: torch keeps paths into its cache (compiled
            # headers, kernels) for the rest of the process, which may compile again.
            atexit.register(shutil.rmtree, own_cache, ignore_errors=True)
    return 0
