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
"""
import argparse
import json
import platform
import sys
from typing import Callable, Dict, List

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


def run(dev: torch.device, shapes_name: str, graphs: bool, repeats: int, min_total_s: float) -> Dict:
    sset = S.get(shapes_name)
    n = sset.numel
    weights = tensors(sset.shapes, dev, 1, 0.02)
    grads = tensors(sset.shapes, dev, 2, 1e-3)
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    rows = []
    for name, pcls, tcls, kw, nstate in ALGOS:
        steps: Dict[str, Callable[[int], object]] = {}
        what: Dict[str, str] = {}
        errors: Dict[str, str] = {}
        peers = [("pyreg", pcls, [{"l1": L1}])] + [("torch", tcls, torch_variants(dev))]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="gpt2", choices=list(S.ORDER))
    p.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (CUDA only)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-total-s", type=float, default=0.3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.graphs and dev.type != "cuda":
        p.error("--graphs needs --device cuda")
    res = run(dev, args.shapes, args.graphs, args.repeats, args.min_total_s)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
