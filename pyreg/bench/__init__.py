"""pyreg's benchmark suite (``pyreg bench`` or ``python bench/run.py``).

Times ``weight_stats``, ``add_penalty_grad_``, ``prox_``, the group ops
``group_prox_`` and ``max_norm_`` on the parameter shapes of real models,
against a Python loop of torch ops, ``torch._foreach_*``, ``torch.compile`` of the loop,
and the same-traffic roofline op over one flat buffer; and a whole AdamW
step with L1 (``step``): ``pyreg.optim.AdamW`` against ``Regularized`` around
torch's fused AdamW, torch's AdamW alone and torch's AdamW plus a Python-loop
prox. Checks every peer's output against pyreg's before timing it. Writes a markdown table, JSON and a
PNG per device; the JSON and markdown after each shape set, so an interrupted run keeps what it
measured. Method: bench/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from .._argtypes import OutputError, choice_list, int_in, output_error, output_folder
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
    from .suite import QUICK_COMPILE_MAX_TENSORS, QUICK_SHAPES

    p = argparse.ArgumentParser(
        prog="pyreg bench",
        description="Benchmark pyreg's ops against a Python loop, torch._foreach, torch.compile and the "
                    "same-traffic bandwidth roofline, on the parameter shapes of real models. The full run "
                    "(every shape set and peer) takes long on a small CPU; --quick is a smoke-sized run. "
                    "Results (JSON, markdown) are written after each shape set. Columns: ms, the median time of "
                    "one call (with the fastest and slowest); GB/s, the op's minimal traffic over that time; % "
                    "roofline, the same-traffic op over one flat buffer's time over this peer's; % copy BW, this "
                    "peer's GB/s over a flat copy's; the speedups vs a peer, that peer's time over pyreg's "
                    "(below 1: pyreg is slower). Details: bench/README.md in the source tree.")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-sized run (about a minute on 2 CPU cores): shape sets {','.join(QUICK_SHAPES)} "
                        f"only (unless --shapes), no torch.compile peer (unless --compile), 1 warm-up call and "
                        f"at least 5 timed calls (until 0.05 s, where the full run takes 15 and 0.5 s), fewer rotated copies; the run lists what it skipped")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cpu, plus cuda when available")
    p.add_argument("--shapes", type=choice_list(S.ORDER, "shape sets"), default=None,
                   help=f"comma list of {', '.join(S.ORDER)} (default: all, --quick: {','.join(QUICK_SHAPES)}; "
                        "gpt-1.3b runs on GPU only)")
    p.add_argument("--ops", type=choice_list(P.OP_ORDER, "ops"), default=P.OP_ORDER,
                   help=f"comma list of {', '.join(P.OP_ORDER)} (default: all)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results when it exists here, else ./bench-results)")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    comp.add_argument("--compile", action="store_true",
                      help=f"with --quick: time the torch.compile peer too, on sets of at most "
                           f"{QUICK_COMPILE_MAX_TENSORS} tensors (the full run always does)")
    p.add_argument("--tag", type=_tag, default=None,
                   help="suffix for the output file names (letters, digits, '-'), e.g. omp-passive")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: time every call as the replay of a CUDA graph that captured it "
                        "(device time without host launch overhead: the steady state of a captured "
                        "training step); output files get '-cuda-graphs'")
    p.add_argument("--repeats", type=int_in(1), default=None,
                   help="timed calls per measurement, at least (default 15, --quick 5)")
    p.add_argument("--compact", action="store_true",
                   help="instead of the ops: inference of a model whose inputs group lasso zeroed, as trained, "
                        "after pyreg.compact and after Torch-Pruning's removal of the same zeros "
                        "(files get '-compact', plus '-quick' with --quick; takes --quick, --device, --tag and --out only)")
    return p


def _is_default_cache(path: str) -> bool:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return False
    return os.path.abspath(path) == os.path.abspath(default_cache_dir())


def plan(args: argparse.Namespace) -> Dict[str, object]:
    """What a run with these arguments measures: shape sets, ops, whether the
    torch.compile peer runs."""
    from .suite import QUICK_SHAPES

    shapes = args.shapes if args.shapes is not None else (list(QUICK_SHAPES) if args.quick else list(S.ORDER))
    compile_ = not args.no_compile and (args.compile or not args.quick)
    return {"shapes": shapes, "ops": list(args.ops), "compile": compile_}


def _compact(devices: List[str], out: str, args: argparse.Namespace) -> int:
    """``--compact``: the compact benchmark on each device; a JSON and a markdown file each."""
    import json

    from . import compact
    from .suite import device_info

    for dev in devices:
        info = device_info(torch.device(dev))
        stem = os.path.join(out, info["slug"] + "-compact" + ("-quick" if args.quick else "")
                            + (f"-{args.tag}" if args.tag else ""))
        print(f"== pyreg bench --compact on {dev}: batch {compact.BATCH}, torch {torch.__version__}", flush=True)
        res = compact.run(dev, rounds=9 if args.quick else 25)
        res["machine"] = info
        try:
            report.write_atomic(stem + ".md", compact.markdown(res))
            report.write_atomic(stem + ".json", json.dumps(res, indent=1, default=str) + "\n")
        except OSError as e:
            raise output_error(e) from e
        for note in res["notes"]:
            print(f"   {note}")
        print(f"wrote {stem}.json, {stem}.md", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    what = plan(args)
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
    if args.compact:
        ignored = [flag for flag, given in (("--shapes", args.shapes is not None), ("--ops", args.ops != P.OP_ORDER),
                                            ("--dtype", args.dtype != "float32"), ("--repeats", args.repeats),
                                            ("--compile", args.compile), ("--no-compile", args.no_compile),
                                            ("--cuda-graphs", args.cuda_graphs)) if given]
        if ignored:
            p.error(f"--compact times its own model and takes --quick, --device, --tag and --out only, "
                    f"not {', '.join(ignored)}")
    else:
        for dev in devices:
            if all(S.get(name).gpu_only for name in what["shapes"]) and dev != "cuda":
                p.error(f"nothing to measure on {dev}: shape set(s) {','.join(what['shapes'])} run on a GPU only")
    out = output_folder(p, args.out or ("bench/results" if os.path.isdir("bench/results") else "bench-results"))
    if args.compact:
        try:
            return _compact(devices, out, args)
        except OutputError as e:
            print(f"pyreg bench: {e}", file=sys.stderr, flush=True)
            return 1

    from .suite import Suite, device_info, is_subset

    # Cold compile times: a fresh inductor cache for this run (unless the user set one).
    # (torch sets the variable to its default itself on import: only a different value is the user's.)
    own_cache, previous = None, os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if what["compile"] and (previous is None or _is_default_cache(previous)):
        own_cache = tempfile.mkdtemp(prefix="pyreg-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = own_cache
    def write(res: dict, stem: str, with_png: bool) -> bool:
        """The run's files so far: JSON and markdown (and, at the end, the PNG),
        each written whole (a temporary file, then a rename)."""
        if own_cache is None and any(r["peer"] == "compile" and r["ms"] for r in res["rows"]):
            note = "TORCHINDUCTOR_CACHE_DIR was set: compile times may be warm-cache times"
            if note not in res["notes"]:
                res["notes"].append(note)
        png = stem + ".png"
        have_png = with_png and report.plot(res, png)
        res["files"] = {"json": stem + ".json", "markdown": stem + ".md", "png": png if have_png else None}
        # the markdown first: once the JSON of a set exists, so does its markdown
        try:
            report.write_atomic(stem + ".md", report.markdown(res, os.path.basename(png) if have_png else None))
            report.write_json(res, stem + ".json")
        except OSError as e:
            raise output_error(e) from e
        return have_png

    # fewer sets or ops than a full run: its own file name (unless --tag names it), not the full run's
    subset = is_subset(what["shapes"], what["ops"], args.quick)
    try:
        for dev in devices:
            t0 = time.perf_counter()
            info = device_info(torch.device(dev))
            stem = os.path.join(out, info["slug"] + ("-quick" if args.quick else "")
                                + ("-cuda-graphs" if args.cuda_graphs else "")
                                + ("" if args.dtype == "float32" else f"-{args.dtype}")
                                + (f"-{args.tag}" if args.tag else "-subset" if subset else ""))
            print(f"== pyreg bench on {dev}: shapes {','.join(what['shapes'])}; ops {','.join(what['ops'])}; "
                  f"{args.dtype}; {'quick' if args.quick else 'full'} run"
                  f"{'' if what['compile'] else ', no torch.compile peer'}; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} thread{'' if torch.get_num_threads() == 1 else 's'}", flush=True)
            if args.quick:
                print("   --quick: a smoke-sized run (fewer shape sets and calls"
                      + ("" if what["compile"] else ", no torch.compile peer")
                      + "); run without --quick for the full figures", flush=True)
            print(f"   results go to {stem}.json and .md, updated after each shape set", flush=True)
            last: Dict[str, dict] = {}

            def set_done(res: dict, stem=stem, last=last) -> None:
                write(res, stem, with_png=False)
                last["res"] = res
                print(f"   saved {len(res['meta']['sets_done'])} of {len(res['meta']['sets_planned'])} "
                      f"shape sets to {stem}.json, .md", flush=True)

            suite = Suite(torch.device(dev), DTYPES[args.dtype], what["shapes"], what["ops"], args.quick,
                          what["compile"], args.repeats, graphs=args.cuda_graphs, on_set_done=set_done)
            try:
                res = suite.run()
            except KeyboardInterrupt:
                done = last.get("res")
                if done is not None:
                    have_png = write(done, stem, with_png=True)
                    print(f"\ninterrupted: kept the {len(done['meta']['sets_done'])} shape set(s) measured "
                          f"({', '.join(done['meta']['sets_done'])}) in {stem}.json, {stem}.md"
                          + (f", {stem}.png" if have_png else ""), file=sys.stderr, flush=True)
                else:
                    print("\ninterrupted before the first shape set was measured: nothing written",
                          file=sys.stderr, flush=True)
                return 130
            have_png = write(res, stem, with_png=True)
            print()
            print(report.header(res))
            print()
            print(report.summary_table(res))
            print()
            print(report.full_table(res))
            flagged = sum(1 for r in res["rows"] if r.get("flags"))
            if flagged:
                print(f"\n{flagged} figure(s) flagged (!): see the WARNING lines above and the flags column",
                      flush=True)
            print(f"\nwrote {stem}.json, {stem}.md" + (f", {stem}.png" if have_png else " (no matplotlib: no plot)")
                  + f" in {time.perf_counter() - t0:.0f} s", flush=True)
    except OutputError as e:
        print(f"pyreg bench: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if own_cache is not None:
            # The fresh cache stays this process's inductor cache until exit, and is
            # removed then. Torch keeps paths into it (torch 2.7 caches the path of its
            # compiled C++ prefix header): were the variable restored, a later
            # torch.compile in this process would write entries into the user's cache
            # that name files of this directory, and fail once it is gone.
            atexit.register(shutil.rmtree, own_cache, ignore_errors=True)
    return 0
