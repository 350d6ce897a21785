"""``pyreg bench --compact``: inference of a model whose inputs group lasso
zeroed, as trained (every input read), after ``pyreg.compact`` (gathering the
kept inputs itself, or fed only those), and after Torch-Pruning's removal of
the same zero columns (when ``torch_pruning`` is installed), side by side.

The model is the demo's MLP (128 inputs -> 32 -> 32 -> 2, ReLU) with its
input layer's columns 8..127 exactly zero, as the demo's group-lasso winner
has them, and random other weights. Every variant's output is checked against
the original's before it is timed; calls are interleaved (one of each variant
per round) and each figure is the median of the rounds, with its min and max.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn

import pyreg

BATCH = 4096
KEPT = 8  # the informative inputs: the first 8


def model_with_zero_inputs(seed: int = 0) -> nn.Module:
    from ..demo.study import MLP

    torch.manual_seed(seed)
    model = MLP(128, 2)
    with torch.no_grad():
        model[0].weight[:, KEPT:] = 0
    return model.eval()


def _torch_pruning(model: nn.Module, x: torch.Tensor):
    """Torch-Pruning's model with the same zero columns removed, or None."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    import copy

    theirs = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    dg.get_pruning_group(theirs[0], tp.prune_linear_in_channels, idxs=list(range(KEPT, 128))).prune()
    return theirs.eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run(device: str = "cpu", rounds: int = 25, seed: int = 0, log: Callable[[str], None] = print) -> Dict:
    """The rows (one per variant) and notes of the compact benchmark."""
    dev = torch.device(device)
    model = model_with_zero_inputs(seed).to(dev)
    x = torch.randn(BATCH, 128, generator=torch.Generator().manual_seed(seed)).to(dev)
    kept = x[:, :KEPT].contiguous()
    gathered = pyreg.compact(model, x, measure=False).model
    dropped = pyreg.compact(model, x, drop_inputs=True, measure=False).model
    variants: Dict[str, tuple] = {
        "original": (model, x, "the model as trained: every input read"),
        "pyreg.compact": (gathered, x, "pyreg.compact: same inputs, the kept ones gathered inside"),
        "pyreg.compact(drop_inputs)": (dropped, kept, "pyreg.compact(drop_inputs=True): fed the kept inputs"),
    }
    notes: List[str] = []
    theirs = _torch_pruning(model.cpu(), x.cpu())
    if theirs is None:
        notes.append("torch_pruning is not installed: its row is skipped")
    else:
        variants["torch_pruning"] = (theirs.to(dev), kept, "Torch-Pruning's model, same zero columns removed, "
                                                          "fed the kept inputs")
    model.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        ref = model(x)
        scale = float(ref.abs().max())
        for name, (m, inp, _) in variants.items():
            err = float((m(inp) - ref).abs().max())
            if not err <= 1e-5 * max(scale, 1.0):
                raise RuntimeError(f"{name}: output differs from the original's by {err:.3g}")
        times: Dict[str, List[float]] = {name: [] for name in variants}
        for _ in range(3):  # warm-up
            for m, inp, _ in variants.values():
                m(inp)
        sync()
        for _ in range(rounds):
            for name, (m, inp, _) in variants.items():
                sync()
                t0 = time.perf_counter()
                m(inp)
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["original"])
    rows = []
    for name, (m, _, what) in variants.items():
        t = times[name]
        med = statistics.median(t)
        rows.append({"peer": name, "what": what, "params": _params(m), "ms": med, "min_ms": min(t),
                     "max_ms": max(t), "speedup": base / med if med > 0 else None})
        log(f"   {name:28s} {med:8.4f} ms (min {min(t):.4f}, max {max(t):.4f})  {_params(m):6,} params")
    return {"device": device, "batch": BATCH, "rounds": rounds, "inputs": 128, "kept": KEPT,
            "model": "MLP 128-32-32-2 (ReLU), input columns 8..127 exactly zero", "rows": rows, "notes": notes}


def markdown(res: Dict) -> str:
    out = [f"# pyreg bench --compact ({res['device']})", "",
           f"{res['model']}; inference of a batch of {res['batch']}, median of {res['rounds']} interleaved "
           "rounds (min, max); every variant's output checked against the original's first.", "",
           "| variant | what | params | ms | min ms | max ms | speedup vs original |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        out.append(f"| {r['peer']} | {r['what']} | {r['params']:,} | {r['ms']:.4f} | {r['min_ms']:.4f} | "
                   f"{r['max_ms']:.4f} | {sp} |")
    out += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"
