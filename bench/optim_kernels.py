"""Every fused optimizer's step at a model's shapes, against torch's own step
of the same optimizer and the device's copy bandwidth.

    python bench/optim_kernels.py --device cuda --shapes gpt2 --graphs --out optim.json

For each algorithm (SGD with momentum, Adam, AdamW, Adagrad, RMSprop), one
step of ``pyreg.optim``'s version with L1 against torch's fastest step of the
same optimizer without L1 (fused where torch has it for the device, else
foreach), each on its own copy of the same weights, grads and state, after two
warm-up steps (the state exists), timed side by side in rounds
(``pyreg.bench.timing.time_interleaved``); on CUDA as CUDA-graph replays with
``--graphs`` (device time only), else eager. ``b.copy_(a)`` over one flat
buffer of the set's element count is timed in the same rounds.

GB/s counts the minimal traffic of a step: each of param, grad and state
buffer read once, param and state written once (float32: SGD with momentum,
Adagrad and RMSprop 20 bytes per element, Adam and AdamW 28); "% copy" is that
rate over the copy's. ``pyreg bench --ops step`` times AdamW against more
peers; this script covers the other kernels.

On CUDA each algorithm runs in a process of its own (``--isolate``, the
default there): a kernel fault (an illegal address) ends the CUDA context
of its process, and so would end every later algorithm's timing too. Where
an algorithm's process fails, each of its peers runs alone, in a process of
its own, captured and replayed as in the timing (``--check-peer``): the
result names the peer that fails and keeps its error.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional

import torch

import pyreg
from pyreg.bench import shapes as S
from pyreg.bench.timing import cuda_graphed, sync, time_interleaved

LR, L1 = 1e-3, 1e-3
#: (name, pyreg class, torch class, keyword arguments, state buffers per element)
ALGOS = [
    ("sgd-momentum", pyreg.optim.SGD, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}, 1),
    ("adam", pyreg.optim.Adam, torch.optim.Adam, {"lr": LR}, 2),
    ("adamw", pyreg.optim.AdamW, torch.optim.AdamW, {"lr": LR, "weight_decay": 0.01}, 2),
    ("adagrad", pyreg.optim.Adagrad, torch.optim.Adagrad, {"lr": LR}, 1),
    ("rmsprop", pyreg.optim.RMSprop, torch.optim.RMSprop, {"lr": LR}, 1),
]


def tensors(shapes, dev, seed, scale):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(s, generator=g, device=dev) * scale for _, s in shapes]


def make_opt(cls, ps, kw, graphs: bool, extra: Dict) -> torch.optim.Optimizer:
    """cls(ps, **kw, **extra), capturable when timing graphs (where the class has it)."""
    if graphs:
        try:
            return cls(ps, **kw, **extra, capturable=True)
        except TypeError:  # no capturable argument (SGD, Adagrad)
            pass
    return cls(ps, **kw, **extra)


def torch_variants(dev: torch.device) -> List[Dict]:
    return [{"fused": True}, {"foreach": True}] if dev.type == "cuda" else [{"foreach": True}, {}]


def run(dev: torch.device, shapes_name: str, graphs: bool, repeats: int, min_total_s: float,
        algos: Optional[List[str]] = None, peers_only: Optional[List[str]] = None,
        replays: int = 0) -> Dict:
    """The timings of ``algos`` (default: every one) in this process.
    ``peers_only``: only those peers. ``replays``: no timing; each peer's
    step (captured, with ``graphs``) is run that many times, the device
    synchronized after each (a fault surfaces at its own call)."""
    sset = S.get(shapes_name)
    n = sset.numel
    weights = tensors(sset.shapes, dev, 1, 0.02)
    grads = tensors(sset.shapes, dev, 2, 1e-3)
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    rows = []
    for name, pcls, tcls, kw, nstate in ALGOS:
        if algos is not None and name not in algos:
            continue
        steps: Dict[str, Callable[[int], object]] = {}
        what: Dict[str, str] = {}
        errors: Dict[str, str] = {}
        peers = [("pyreg", pcls, [{"l1": L1}])] + [("torch", tcls, torch_variants(dev))]
        peers = [x for x in peers if peers_only is None or x[0] in peers_only]
        for peer, cls, variants in peers:
            for extra in variants:
                ps = [torch.nn.Parameter(w.clone()) for w in weights]
                for p, g in zip(ps, grads):
                    p.grad = g  # read only: shared
                try:
                    opt = make_opt(cls, ps, kw, graphs, extra)
                    for _ in range(2):
                        opt.step()
                    sync(dev)
                    fn = (lambda i, o=opt: o.step())
                    steps[peer] = cuda_graphed(fn, 1, dev) if graphs else fn
                    what[peer] = f"{cls.__module__}.{cls.__name__}({', '.join(f'{k}={v}' for k, v in extra.items())})"
                    errors.pop(peer, None)
                    break
                except Exception as e:  # the next variant, or report
                    errors[peer] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if replays:
            for peer, fn in steps.items():
                for i in range(replays):
                    fn(i)
                    sync(dev)
                print(f"{name} {peer}: {replays} {'replays' if graphs else 'steps'}, synchronized after each: ok",
                      flush=True)
            rows.append({"algo": name, "checked": sorted(steps), "errors": errors})
            continue
        steps["copy"] = cuda_graphed(lambda i: b.copy_(a), 1, dev) if graphs else (lambda i: b.copy_(a))
        times = time_interleaved(steps, dev, warmup=3, repeats=repeats, min_total_s=min_total_s)
        bytes_step = (3 + 2 * nstate) * 4 * n
        copy_gbps = 8 * n / (times["copy"]["ms"] * 1e6)
        row = {"algo": name, "bytes_per_elem": 4 * (3 + 2 * nstate), "copy_ms": times["copy"]["ms"],
               "copy_gbps": round(copy_gbps, 1), "errors": errors}
        for peer in ("pyreg", "torch"):
            if peer in times:
                t = times[peer]
                gbps = bytes_step / (t["ms"] * 1e6)
                row[peer] = {"what": what[peer], "ms": t["ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                             "gbps": round(gbps, 1), "pct_copy": round(100 * gbps / copy_gbps, 1)}
        if "pyreg" in row and "torch" in row:
            row["torch_over_pyreg"] = round(row["torch"]["ms"] / row["pyreg"]["ms"], 3)
        rows.append(row)
        print(f"{name:13s} " + "  ".join(
            f"{peer} {row[peer]['ms']:.3f} ms {row[peer]['pct_copy']:.0f}% copy" for peer in ("pyreg", "torch")
            if peer in row) + (f"  torch/pyreg {row.get('torch_over_pyreg')}" if "torch_over_pyreg" in row else "")
            + (f"  errors {errors}" if errors else ""), flush=True)
        del steps
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(dev), "name": gpu, "torch": torch.__version__, "pyreg": pyreg.__version__,
            "shapes": shapes_name, "tensors": sset.count, "numel": n, "graphs": graphs, "l1": L1,
            "repeats": repeats, "rows": rows}


def isolated(args, dev: torch.device, algos: Optional[List[str]]) -> Dict:
    """``run`` with each algorithm in a child process (see the module's
    docstring): the rows of those that finished, and for one whose process
    failed, a row naming each peer's outcome alone."""
    rows, meta = [], None
    base = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--shapes", args.shapes,
            "--repeats", str(args.repeats), "--min-total-s", str(args.min_total_s), "--no-isolate"]
    base += ["--graphs"] if args.graphs else []
    for name in [a[0] for a in ALGOS if algos is None or a[0] in algos]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            p = subprocess.run(base + ["--algos", name, "--out", out], capture_output=True, text=True)
            sys.stdout.write(p.stdout)
            if p.returncode == 0:
                with open(out) as f:
                    res = json.load(f)
                rows += res["rows"]
                meta = meta or res
                continue
        row = {"algo": name, "failed": _outcome(p), "peers": {}}
        for peer in ("pyreg", "torch"):
            q = subprocess.run(base + ["--algos", name, "--check-peer", peer], capture_output=True, text=True)
            sys.stdout.write(q.stdout)
            row["peers"][peer] = "ok" if q.returncode == 0 else _outcome(q)
        print(f"{name:13s} FAILED ({row['failed']}); alone: "
              + "; ".join(f"{k} {v}" for k, v in row["peers"].items()), flush=True)
        rows.append(row)
    sset = S.get(args.shapes)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(dev), "name": gpu, "torch": torch.__version__, "pyreg": pyreg.__version__,
            "shapes": args.shapes, "tensors": sset.count, "numel": sset.numel, "graphs": args.graphs, "l1": L1,
            "repeats": args.repeats, "isolated": True, "rows": rows}


def _outcome(p: subprocess.CompletedProcess) -> str:
    """A failed child's exit (or signal) and its last error line."""
    how = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
    return f"{how}: {_last_error(p.stderr)}"


def _last_error(stderr: str) -> str:
    """The last line of a child's stderr that names an error (else its last line)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln or "error" in ln]
    return ((named or lines or ["no output"])[-1])[:300]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="gpt2", choices=list(S.ORDER))
    p.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (CUDA only)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-total-s", type=float, default=0.3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--algos", default=None, help="comma-separated: only these algorithms")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="each algorithm in a process of its own (the default on CUDA)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="every algorithm in this process")
    p.add_argument("--check-peer", choices=["pyreg", "torch"], default=None,
                   help="no timing: run this peer's step (captured, with --graphs) 5 times, synchronizing after each")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.graphs and dev.type != "cuda":
        p.error("--graphs needs --device cuda")
    algos = None if args.algos is None else args.algos.split(",")
    unknown = sorted(set(algos or []) - {a[0] for a in ALGOS})
    if unknown:
        p.error(f"unknown algorithms {unknown}; choose from {[a[0] for a in ALGOS]}")
    isolate = dev.type == "cuda" if args.isolate is None else args.isolate
    if args.check_peer is not None:
        res = run(dev, args.shapes, args.graphs, 1, 0.0, algos, [args.check_peer], replays=5)
    elif isolate:
        res = isolated(args, dev, algos)
    else:
        res = run(dev, args.shapes, args.graphs, args.repeats, args.min_total_s, algos)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    if args.check_peer is not None:
        errors = [f"{r['algo']} {peer}: {e}" for r in res["rows"] for peer, e in r["errors"].items()]
        for e in errors:
            print(e, file=sys.stderr)
        return 1 if errors else 0
    return 1 if any("failed" in r for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
