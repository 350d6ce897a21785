"""Output: markdown tables, JSON, and a PNG plot."""
from __future__ import annotations

import json
from typing import Dict, List, Optional

PEERS_VS = ("loop", "foreach", "compile", "regularized", "bare")
PEER_LABELS = {"bare": "vs bare AdamW", "regularized": "vs Regularized(AdamW)"}


def _f(x: Optional[float], fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def header(res: dict) -> str:
    m = res["meta"]
    omp = f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else ""
    lines = [f"**{m['name']}** ({m['device']}, {m['threads']} threads{omp}, pyreg `{m['backend']}` backend), "
             f"torch {m['torch']}, pyreg {m['pyreg']}, {m['dtype']}, "
             f"{'quick' if m['quick'] else 'full'} run{' of CUDA-graph replays' if m.get('cuda_graphs') else ''} "
             f"of {m['date']} ({m['wall_s']} s)."]
    sets = res.get("shape_sets", {})
    if sets:
        lines.append("Shape sets: " + "; ".join(
            f"{k} = {v['description']} ({v['tensors']} tensors, {v['numel'] / 1e6:.2f}M elements"
            + (f", {v['rotation']} rotated copies" if v["rotation"] > 1 else "")
            + (f"; group ops: the {v['group_ops']['tensors']} tensors of 2+ dims, "
               f"{v['group_ops']['numel'] / 1e6:.2f}M elements"
               + (f", {v['group_ops']['rotation']} rotated copies" if v["group_ops"]["rotation"] > 1 else "")
               if v.get("group_ops") else "")
            + ")" for k, v in sets.items()) + ".")
    if m.get("compile_startup_s") is not None:
        lines.append(f"torch.compile one-time start-up: {m['compile_startup_s']:.1f} s (not in the per-op compile times).")
    for n in res.get("notes", []):
        lines.append(f"Note: {n}.")
    return "\n\n".join(lines)


def summary_table(res: dict) -> str:
    """One line per shape set and op: pyreg's figures and its speedup against each peer."""
    rows = res["rows"]
    out = ["| shapes | op | pyreg ms | GB/s | % roofline | % copy BW | vs loop | vs foreach | vs compile "
           "| compile s | vs Regularized | vs bare AdamW | checks | pyreg peak extra MB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    keys = []
    for r in rows:
        if (r["shapes"], r["op"]) not in keys:
            keys.append((r["shapes"], r["op"]))
    for shapes, op in keys:
        rs = {r["peer"]: r for r in rows if r["shapes"] == shapes and r["op"] == op}
        p = rs.get("pyreg", {})

        def sp(peer):
            r = rs.get(peer)
            if r is None or r.get("speedup") is None:
                return "–"
            return f"{r['speedup']:.2f}x"

        checks = [r["check"] for r in rs.values() if r["check"] not in ("n/a",)]
        fails = [k for k, r in rs.items() if r["check"] == "FAIL"]
        inexact = [k for k, r in rs.items() if r["check"] == "inexact"]
        check = ("FAIL: " + ", ".join(fails)) if fails else \
            ("pass" if checks and all(c in ("pass", "skipped", "inexact") for c in checks) else "–")
        if inexact:
            check += " (inexact peers: " + ", ".join(inexact) + ")"
        comp = rs.get("compile", {})
        out.append(f"| {shapes} | {op} | {_ms(p.get('ms'))} | {_f(p.get('gbps'), '.1f')} "
                   f"| {_f(p.get('pct_roofline'), '.0f')} | {_f(p.get('pct_copy'), '.0f')} | {sp('loop')} "
                   f"| {sp('foreach')} | {sp('compile')} | {_f(comp.get('compile_s'), '.1f')} | {sp('regularized')} | {sp('bare')} "
                   f"| {check} | {_f(p.get('peak_extra_mb'), '.1f')} |")
    return "\n".join(out)


def full_table(res: dict) -> str:
    out = ["| shapes | op | peer | what | ms | host ms | GB/s | % roofline | % copy BW | pyreg speedup vs this "
           "| check | peak extra MB (torch) | peak RSS growth MB | compile s |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in res["rows"]:
        check = r["check"] if r["check"] != "FAIL" else "**FAIL**"
        if r.get("check_detail"):
            check += f" ({r['check_detail']})"
        out.append(f"| {r['shapes']} | {r['op']} | {r['peer']} | {r['what']} | {_ms(r['ms'])} "
                   f"| {_ms(r.get('host_ms'))} | {_f(r['gbps'], '.1f')} | {_f(r['pct_roofline'], '.0f')} | {_f(r['pct_copy'], '.0f')} "
                   f"| {_f(r['speedup'], '.2f')} | {check} | {_f(r['peak_extra_mb'], '.1f')} "
                   f"| {_f(r['rss_peak_extra_mb'], '.1f')} | {_f(r['compile_s'], '.1f')} |")
    return "\n".join(out)


def markdown(res: dict, png_name: Optional[str] = None) -> str:
    parts = [f"# pyreg bench: {res['meta']['name']}", header(res), "## Summary", summary_table(res)]
    if png_name:
        parts.append(f"![speedup and % of roofline]({png_name})")
    parts += ["## All peers", full_table(res),
              "Columns: ms = median time of one call (CUDA: device time between two events around it); host ms = "
              "median host time in the call without waiting for the device (CPU: the same as ms); GB/s = the op's minimal traffic (4/12/8/12/12/28 bytes per fp32 "
              "element for weight_stats/add_penalty_grad_/prox_/group_prox_/max_norm_/step) over the time; % roofline = time of the "
              "same-traffic flat-buffer op / time; % copy BW = GB/s over the flat copy's GB/s; pyreg speedup = "
              "this peer's time / pyreg's time (below 1: pyreg is slower); peak extra MB: the peak of memory "
              "allocated during one call beyond what was live before it (CPU: torch's allocator; RSS growth also "
              "counts malloc); compile s = first call minus a steady call. See bench/README.md."]
    return "\n\n".join(parts) + "\n"


def write_json(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")


def plot(res: dict, path: str) -> bool:
    """Two panels: pyreg's speedup against each peer, and % of roofline of
    pyreg (and of the compiled loop where it ran), per shape set and op."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = res["rows"]
    keys: List[tuple] = []
    for r in rows:
        if (r["shapes"], r["op"]) not in keys:
            keys.append((r["shapes"], r["op"]))
    by: Dict[tuple, Dict[str, dict]] = {k: {} for k in keys}
    for r in rows:
        by[(r["shapes"], r["op"])][r["peer"]] = r
    labels = [f"{s}\n{o}" for s, o in keys]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(keys) + 3), 9))
    ax = axes[0]
    peers = [p for p in PEERS_VS if any(by[k].get(p, {}).get("speedup") for k in keys)]
    width = 0.8 / max(1, len(peers))
    for j, peer in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(keys))]
        ys = [by[k].get(peer, {}).get("speedup") or 0 for k in keys]
        ax.bar(xs, ys, width, label=PEER_LABELS.get(peer, f"vs {peer}"))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("pyreg speedup (x, log)")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title(f"pyreg speedup: {res['meta']['name']}, torch {res['meta']['torch']}, "
                 f"{res['meta']['dtype']}{' (quick)' if res['meta']['quick'] else ''}")
    ax = axes[1]
    rkeys = [k for k in keys if by[k].get("pyreg", {}).get("pct_roofline") is not None]
    series = [("pyreg", "pyreg"), ("compile", "torch.compile"), ("foreach", "foreach")]
    width = 0.8 / len(series)
    for j, (peer, name) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(rkeys))]
        ys = [by[k].get(peer, {}).get("pct_roofline") or 0 for k in rkeys]
        bars = ax.bar(xs, [min(y, 150.0) for y in ys], width, label=name)
        for bar, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.0f}", (bar.get_x() + bar.get_width() / 2, min(y, 150.0)),
                            ha="center", va="bottom", fontsize=6)
    ax.set_ylim(0, 160)
    ax.axhline(100.0, color="black", lw=0.8)
    ax.axhline(85.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("% of same-traffic roofline (bars cut at 150)")
    ax.set_xticks(range(len(rkeys)))
    ax.set_xticklabels([f"{s}\n{o}" for s, o in rkeys], fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
