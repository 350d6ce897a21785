"""Output: markdown tables, JSON, and a PNG plot."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

PEERS_VS = ("loop", "foreach", "compile", "regularized", "bare")
PEER_LABELS = {"bare": "vs bare AdamW", "regularized": "vs Regularized(AdamW)"}

# A figure is flagged (marked "(!)" in the tables, listed in "flags", and a
# WARNING line printed) when it cannot be read at face value:
# * above the roofline: a peer faster than the flat-buffer op that moves the
#   same bytes. Either the reference op was slowed (a busy machine; torch's
#   OpenMP threads competing) or the op moved fewer bytes than counted; either
#   way the % is not a bandwidth figure.
ROOFLINE_LIMIT = 100.0
# * noisy: its calls' times spread by more than this factor (max / min over
#   the timed calls). Calls of one function on the same data take the same
#   time up to cache and scheduler effects, which on a quiet machine stay
#   within about 1.5x for these ops (bench/README.md); a 2x spread means some
#   calls were slowed by half or more (the machine was busy, or the timed work
#   too short for the timer), so the median, and the ratios built on it, may
#   be off by up to that much.
NOISY_SPREAD = 2.0
REFERENCE_PEERS = ("roofline", "copy")


def assess(rows: List[dict]) -> List[str]:
    """Add ``spread`` (max/min) and ``flags`` to each row; return one warning
    line per shape set and op with a flagged figure, saying why."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["shapes"], r["op"]), []).append(r)
        r["flags"] = []
        lo, hi = r.get("min_ms"), r.get("max_ms")
        r["spread"] = (hi / lo) if (lo and hi) else None
        if r["spread"] is not None and r["spread"] > NOISY_SPREAD:
            r["flags"].append("noisy")
        pct = r.get("pct_roofline")
        if r["peer"] not in REFERENCE_PEERS and pct is not None and pct > ROOFLINE_LIMIT:
            r["flags"].append("above roofline")
    warnings: List[str] = []
    for (shapes, op), rs in groups.items():
        above = [f"{r['peer']} {r['pct_roofline']:.0f}%" for r in rs if "above roofline" in r["flags"]]
        noisy = [f"{r['peer']} {_x(r['spread'])}" for r in rs if "noisy" in r["flags"]]
        parts = []
        if above:
            parts.append(f"above {ROOFLINE_LIMIT:.0f}% of the roofline ({', '.join(above)}), which is implausible: "
                         "faster than the flat-buffer op that moves the same bytes, so that reference was slowed "
                         "(a busy machine) or the op moved fewer bytes than counted")
        if noisy:
            parts.append(f"too noisy to trust ({', '.join(noisy)}: slowest call / fastest call over "
                         f"{NOISY_SPREAD:g}x; most likely a busy machine)")
        if parts:
            warnings.append(f"{shapes} {op}: " + "; ".join(parts))
    return warnings


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def _flagged(rs: Dict[str, dict], *peers: str) -> bool:
    return any(rs.get(p, {}).get("flags") for p in peers)


def _mark(cell: str, flagged: bool) -> str:
    return cell + " (!)" if flagged and cell != "–" else cell


def _spread(r: dict) -> str:
    """median (min–max), in ms."""
    if r.get("ms") is None:
        return "–"
    if r.get("min_ms") is None or r.get("max_ms") is None:
        return _ms(r["ms"])
    return f"{_ms(r['ms'])} ({_ms(r['min_ms'])}–{_ms(r['max_ms'])})"


def _flag_text(rs: Dict[str, dict]) -> str:
    parts = []
    for peer, r in rs.items():
        for flag in r.get("flags") or []:
            if flag == "noisy":
                parts.append(f"{peer} noisy ({_x(r['spread'])})")
            else:
                parts.append(f"{peer} above roofline ({r['pct_roofline']:.0f}%)")
    return "; ".join(parts) or "–"


def _f(x: Optional[float], fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def header(res: dict) -> str:
    m = res["meta"]
    omp = f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else ""
    lines = [f"**{m['name']}** ({m['device']}, {m['threads']} thread{'' if m['threads'] == 1 else 's'}{omp}, pyreg `{m['backend']}` backend), "
             f"torch {m['torch']}, pyreg {m['pyreg']}, {m['dtype']}, "
             f"{'quick' if m['quick'] else 'full'} run{' of CUDA-graph replays' if m.get('cuda_graphs') else ''} "
             + (f"of a subset (shape sets {', '.join(m['sets_planned'])}; ops {', '.join(m['ops'])}) "
                if m.get("subset") else "")
             + f"of {m['date']} ({m['wall_s']} s)."]
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
    if m.get("complete") is False:
        done = ", ".join(m.get("sets_done") or []) or "none"
        lines.append(f"**Partial results**: the run stopped before it finished; shape sets measured: {done} "
                     f"(of {', '.join(m.get('sets_planned') or [])}).")
    for n in res.get("notes", []):
        lines.append(f"Note: {n}.")
    for w in res.get("warnings", []):
        lines.append(f"Warning: {w}.")
    return "\n\n".join(lines)


def summary_table(res: dict) -> str:
    """One line per shape set and op: pyreg's figures and its speedup against each peer."""
    rows = res["rows"]
    out = ["| shapes | op | pyreg ms (min–max) | GB/s | % roofline | % copy BW | vs loop | vs foreach | vs compile "
           "| compile s | vs Regularized | vs bare AdamW | checks | pyreg peak extra MB | flags |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
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
            return _mark(f"{r['speedup']:.2f}x", _flagged(rs, "pyreg", peer))

        checks = [r["check"] for r in rs.values() if r["check"] not in ("n/a",)]
        fails = [k for k, r in rs.items() if r["check"] == "FAIL"]
        inexact = [k for k, r in rs.items() if r["check"] == "inexact"]
        check = ("FAIL: " + ", ".join(fails)) if fails else \
            ("pass" if checks and all(c in ("pass", "skipped", "inexact") for c in checks) else "–")
        if inexact:
            check += " (inexact peers: " + ", ".join(inexact) + ")"
        comp = rs.get("compile", {})
        pct = _mark(_f(p.get("pct_roofline"), ".0f"), _flagged(rs, "pyreg", "roofline"))
        out.append(f"| {shapes} | {op} | {_mark(_spread(p), _flagged(rs, 'pyreg'))} | {_f(p.get('gbps'), '.1f')} "
                   f"| {pct} | {_f(p.get('pct_copy'), '.0f')} | {sp('loop')} "
                   f"| {sp('foreach')} | {sp('compile')} | {_f(comp.get('compile_s'), '.1f')} | {sp('regularized')} | {sp('bare')} "
                   f"| {check} | {_f(p.get('peak_extra_mb'), '.1f')} | {_flag_text(rs)} |")
    return "\n".join(out)


def full_table(res: dict) -> str:
    out = ["| shapes | op | peer | what | ms | min ms | max ms | host ms | GB/s | % roofline | % copy BW "
           "| pyreg speedup vs this | check | peak extra MB (torch) | peak RSS growth MB | compile s | flags |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        flags = r.get("flags") or []
        check = r["check"] if r["check"] != "FAIL" else "**FAIL**"
        if r.get("check_detail"):
            check += f" ({r['check_detail']})"
        flag_text = "; ".join(f"noisy ({_x(r['spread'])})" if f == "noisy" else f for f in flags) or "–"
        out.append(f"| {r['shapes']} | {r['op']} | {r['peer']} | {r['what']} | {_mark(_ms(r['ms']), 'noisy' in flags)} "
                   f"| {_ms(r.get('min_ms'))} | {_ms(r.get('max_ms'))} "
                   f"| {_ms(r.get('host_ms'))} | {_f(r['gbps'], '.1f')} "
                   f"| {_mark(_f(r['pct_roofline'], '.0f'), 'above roofline' in flags)} | {_f(r['pct_copy'], '.0f')} "
                   f"| {_f(r['speedup'], '.2f')} | {check} | {_f(r['peak_extra_mb'], '.1f')} "
                   f"| {_f(r['rss_peak_extra_mb'], '.1f')} | {_f(r['compile_s'], '.1f')} | {flag_text} |")
    return "\n".join(out)


def markdown(res: dict, png_name: Optional[str] = None) -> str:
    parts = [f"# pyreg bench: {res['meta']['name']}", header(res), "## Summary", summary_table(res)]
    if png_name:
        parts.append(f"![speedup and % of roofline]({png_name})")
    parts += ["## All peers", full_table(res),
              "Columns: ms = median time of one call (CUDA: device time between two events around it), "
              "with the fastest and slowest call (min–max); host ms = "
              "median host time in the call without waiting for the device (CPU: the same as ms); GB/s = the op's minimal traffic (4/12/8/12/12/28 bytes per fp32 "
              "element for weight_stats/add_penalty_grad_/prox_/group_prox_/max_norm_/step) over the time; % roofline = time of the "
              "same-traffic flat-buffer op / time; % copy BW = GB/s over the flat copy's GB/s; pyreg speedup = "
              "this peer's time / pyreg's time (below 1: pyreg is slower); peak extra MB: the peak of memory "
              "allocated during one call beyond what was live before it (CPU: torch's allocator; RSS growth also "
              "counts malloc); compile s = first call minus a steady call. (!) = flagged, see flags: "
              f"noisy = the calls' times spread more than {NOISY_SPREAD:g}x (max/min), above roofline = over "
              f"{ROOFLINE_LIMIT:.0f}% of the same-traffic flat-buffer op (implausible). See bench/README.md."]
    return "\n\n".join(parts) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a
    reader (or a run killed mid-write) sees the old file or the new one,
    never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.isfile(tmp):  # (no half-written file left behind)
            os.remove(tmp)
        raise


def write_json(res: dict, path: str) -> None:
    write_atomic(path, json.dumps(res, indent=1) + "\n")


def plot(res: dict, path: str) -> bool:
    """Save :func:`figure` as a PNG (through a temporary file); False without matplotlib."""
    fig = figure(res)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def figure(res: dict):
    """Two panels: pyreg's speedup against each peer, and % of roofline of
    pyreg (and of the compiled loop and foreach where they ran), per shape set
    and op. Peers that did not run (skipped, failed) have no bars and no legend
    entry. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
    if peers:
        ax.legend(fontsize=8)
    ax.set_title(f"pyreg speedup: {res['meta']['name']}, torch {res['meta']['torch']}, "
                 f"{res['meta']['dtype']}{' (quick)' if res['meta']['quick'] else ''}")
    ax = axes[1]
    rkeys = [k for k in keys if by[k].get("pyreg", {}).get("pct_roofline") is not None]
    series = [(peer, name) for peer, name in (("pyreg", "pyreg"), ("compile", "torch.compile"),
                                              ("foreach", "foreach"))
              if any(by[k].get(peer, {}).get("pct_roofline") for k in rkeys)]
    width = 0.8 / max(1, len(series))
    for j, (peer, name) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rkeys))]
        ys = [by[k].get(peer, {}).get("pct_roofline") or 0 for k in rkeys]
        flagged = [bool(by[k].get(peer, {}).get("flags")) for k in rkeys]
        bars = ax.bar(xs, [min(y, 150.0) for y in ys], width, label=name)
        for bar, y, f in zip(bars, ys, flagged):
            if y:
                ax.annotate(f"{y:.0f}" + ("!" if f else ""), (bar.get_x() + bar.get_width() / 2, min(y, 150.0)),
                            ha="center", va="bottom", fontsize=6)
    ax.set_ylim(0, 160)
    ax.axhline(100.0, color="black", lw=0.8)
    ax.axhline(85.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("% of same-traffic roofline (bars cut at 150; ! = flagged)")
    ax.set_xticks(range(len(rkeys)))
    ax.set_xticklabels([f"{s}\n{o}" for s, o in rkeys], fontsize=7)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
