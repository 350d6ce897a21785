"""The benchmark run: for each device, shape set and op, check then time every peer."""
from __future__ import annotations

import copy
import datetime
import gc
import glob
import math
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import pyreg

from . import peers as P
from . import report
from . import shapes as S
from .timing import cuda_graphed, peak_extra_bytes, sync, time_interleaved

# --quick is a smoke-sized run (about a minute on 2 CPU cores): the two small
# shape sets of few tensors only (unless --shapes names others; vit-tiny's 152
# tensors took over half of a quick run on a busy 2-core machine), no torch.compile peer (its start-up
# alone takes 15-55 s on a 2-core CPU; --compile brings it back, then only for
# sets of at most QUICK_COMPILE_MAX_TENSORS tensors: compiling a loop over 150
# tensors takes 25-50 s per op), fewer calls, and fewer rotated copies.
QUICK_SHAPES = ("mlp", "lstm")
QUICK_COMPILE_MAX_TENSORS = 16
CACHE_FACTOR = 4     # rotated buffers span at least this many times the last-level cache
MAX_ROTATION = 64
# --quick: the rotated copies span about the last-level cache once (at most 4
# copies): filling 4x a large cache with fresh data took most of a quick run.
QUICK_CACHE_FACTOR = 1
QUICK_MAX_ROTATION = 4
QUICK_SPEC_MAX_NUMEL = 10_000_000  # --quick: pyreg's float64 spec check only for sets up to this size


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# Device facts
# ---------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_llc_bytes() -> int:
    """Total last-level cache (sum over distinct L3 instances), 32 MiB if unknown."""
    seen, total = set(), 0
    for idx in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*"):
        try:
            with open(os.path.join(idx, "level")) as f:
                if f.read().strip() != "3":
                    continue
            with open(os.path.join(idx, "shared_cpu_list")) as f:
                key = f.read().strip()
            with open(os.path.join(idx, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if key in seen:
            continue
        seen.add(key)
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1].upper(), 1)
        total += int(size.rstrip("KkMmGg")) * mult
    return total or 32 * 1024 ** 2


def device_info(dev: torch.device) -> Dict[str, object]:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = torch.cuda.get_device_name(dev)
        cache = int(getattr(props, "L2_cache_size", 50 * 1024 ** 2))
        extra = {"cuda": torch.version.cuda, "memory_gib": round(props.total_memory / 1024 ** 3, 1)}
    else:
        # OMP_WAIT_POLICY changes the CPU figures: with torch's OpenMP threads
        # spinning after each torch op, pyreg's own pool loses a core for a while.
        name, cache = cpu_name(), cpu_llc_bytes()
        extra = {"cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{dev.type}-{name}".lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    return {"device": dev.type, "name": name, "slug": slug.strip("-"), "cache_bytes": cache,
            "threads": torch.get_num_threads(), "backend": pyreg.backend_name(dev), **extra}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
class Gen:
    def __init__(self, dev: torch.device, dtype: torch.dtype, seed: int):
        self.dev, self.dtype = dev, dtype
        self.g = torch.Generator(device=dev).manual_seed(seed)

    def randn(self, shape, scale: float) -> torch.Tensor:
        t = torch.randn(shape, generator=self.g, device=self.dev, dtype=torch.float32).mul_(scale)
        return t if self.dtype == torch.float32 else t.to(self.dtype)

    def tensors(self, sset: S.ShapeSet, scale: float) -> List[torch.Tensor]:
        return [self.randn(s, scale) for _, s in sset.shapes]


def is_subset(sets: Sequence[str], ops: Sequence[str], quick: bool) -> bool:
    """Whether a run measures fewer shape sets or ops than a full run (a
    ``--quick`` one: than a ``--quick`` run of its default shape sets): its
    files get their own name, and its header says so."""
    return list(sets) != list(QUICK_SHAPES if quick else S.ORDER) or list(ops) != list(P.OP_ORDER)


def rotation_count(sset: S.ShapeSet, dtype: torch.dtype, cache: int, buffers: int = 1,
                   factor: int = CACHE_FACTOR, most: int = MAX_ROTATION) -> int:
    """Copies of the set (each ``buffers`` tensors of its size) that together
    span ``factor`` times the last-level cache, at most ``most``."""
    nbytes = max(1, buffers * sset.numel * torch.tensor([], dtype=dtype).element_size())
    return int(min(most, max(1, math.ceil(factor * cache / nbytes))))


#: The share of a GPU's free memory the step's side-by-side copies may take
#: (the rest for the allocator's rounding and CUDA graphs' pools).
STEP_MEMORY_FRACTION = 0.9


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------
class Suite:
    def __init__(self, dev: torch.device, dtype: torch.dtype, sets: List[str], ops: List[str],
                 quick: bool, compile_: bool, repeats: Optional[int], graphs: bool = False,
                 on_set_done: Optional[Callable[[dict], None]] = None):
        if graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.dev, self.dtype, self.sets, self.ops = dev, dtype, sets, ops
        self.graphs = graphs  # time replays of captured calls (see timing.cuda_graphed)
        self.quick, self.compile = quick, compile_
        self.warmup = 1 if quick else 3
        self.repeats = repeats if repeats is not None else (5 if quick else 15)
        self.min_total_s = 0.05 if quick else 0.5
        self.elsize = torch.tensor([], dtype=dtype).element_size()
        self.info = device_info(dev)
        self.rows: List[dict] = []
        self.notes: List[str] = []
        self.warnings: List[str] = []
        self.sets_done: List[str] = []
        self.on_set_done = on_set_done  # called with result() after each shape set (incremental output)
        self.t_start: Optional[float] = None
        self.sets_meta: Dict[str, dict] = {}
        self.compile_startup_s: Optional[float] = None

    # -- helpers ---------------------------------------------------------------
    def timeit_side_by_side(self, fns: Dict[str, Callable[[int], object]]) -> Dict[str, dict]:
        return time_interleaved(fns, self.dev, self.warmup, self.repeats, self.min_total_s)

    def rotation(self, sset: S.ShapeSet, buffers: int = 1) -> int:
        if self.quick:
            return rotation_count(sset, self.dtype, self.info["cache_bytes"], buffers,
                                  QUICK_CACHE_FACTOR, QUICK_MAX_ROTATION)
        return rotation_count(sset, self.dtype, self.info["cache_bytes"], buffers)

    def copies(self, make: Callable[[], Any], k: int) -> List[Any]:
        """k rotated copies of ``make()`` (tensor lists, or a dict of them):
        each fresh random data, or in --quick clones of the first (distinct
        memory all the same, and cheaper to make)."""
        if not self.quick:
            return [make() for _ in range(k)]
        first = make()

        def clone(x):
            if isinstance(x, dict):
                return {key: clone(v) for key, v in x.items()}
            return [t.clone() for t in x]
        return [first] + [clone(first) for _ in range(k - 1)]

    def memory(self, fn: Callable[[], object]) -> dict:
        try:
            return peak_extra_bytes(fn, self.dev)
        except Exception as e:  # memory is informative; never fail the run on it
            return {"torch_bytes": None, "rss_bytes": None, "error": repr(e)}

    def row(self, sset, op, peer, what, ms=None, **kw) -> dict:
        r = {"device": self.dev.type, "shapes": sset.name, "op": op, "peer": peer, "what": what,
             "ms": ms, "min_ms": None, "max_ms": None, "samples": None, "host_ms": None, "gbps": None, "pct_roofline": None, "pct_copy": None,
             "speedup": None, "check": "n/a", "check_detail": "", "peak_extra_mb": None,
             "rss_peak_extra_mb": None, "compile_s": None}
        r.update(kw)
        self.rows.append(r)
        return r

    def note_once(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def compile_enabled(self, sset: S.ShapeSet) -> bool:
        return self.compile and (not self.quick or sset.count <= QUICK_COMPILE_MAX_TENSORS)

    def warm_compiler(self) -> None:
        """Pay torch.compile's one-time start-up cost (imports, worker pool)
        outside the per-op compile times; reported separately."""
        t0 = time.perf_counter()
        f = torch.compile(lambda x: (x.sin() + 1).sum(), dynamic=False)
        f(torch.ones(8, device=self.dev))
        sync(self.dev)
        self.compile_startup_s = time.perf_counter() - t0
        log(f"  torch.compile start-up (one-time, not counted in the per-op compile times): "
            f"{self.compile_startup_s:.1f} s")

    # -- the run ---------------------------------------------------------------
    def run(self) -> dict:
        self.t_start = time.perf_counter()
        if self.compile:
            if self.quick:
                big = [s for s in self.sets if S.get(s).count > QUICK_COMPILE_MAX_TENSORS]
                if big:
                    self.notes.append(f"--quick: torch.compile peer skipped for {', '.join(big)} "
                                      f"(more than {QUICK_COMPILE_MAX_TENSORS} tensors; compiling takes "
                                      "25-50 s per op); run without --quick for it")
            if any(self.compile_enabled(S.get(s)) for s in self.sets):
                self.warm_compiler()
        elif self.quick:
            self.notes.append("--quick: torch.compile peer skipped (its start-up alone takes 15-55 s on a "
                              "2-core CPU); add --compile for it")
        else:
            self.notes.append("--no-compile: torch.compile peer skipped")
        if self.info["backend"] == "torch":
            msg = ("pyreg's compiled module is not loaded here: the pyreg figures are its float64 "
                   "specification in torch ops, not its kernels (install pyreg, or build it in place)")
            log("  WARNING: " + msg)
            self.notes.append(msg)
        if self.quick:
            self.notes.append(f"--quick: {self.warmup} warm-up call (the optimizer step: 1 step first), median of >= {self.repeats} calls; rotated "
                              f"copies span about the last-level cache once (at most {QUICK_MAX_ROTATION}; "
                              f"the full run: {CACHE_FACTOR}x, at most {MAX_ROTATION}) and are clones of one "
                              f"random copy, so small sets may be partly cache-resident")
        if self.graphs:
            self.notes.append("--cuda-graphs: every timed call (each peer, roofline and copy) is the replay of "
                              "a CUDA graph that captured it: device time only, no host launch overhead")
            if "step" in self.ops:
                self.notes.append("--cuda-graphs: the optimizer step is captured after warm-up steps (its "
                                  "state exists), checked eagerly before")
        for name in self.sets:
            sset = S.get(name)
            if sset.gpu_only and self.dev.type != "cuda":
                self.notes.append(f"{name}: GPU only, skipped on {self.dev.type}")
                continue
            k = self.rotation(sset)
            self.sets_meta[name] = {"description": sset.description, "tensors": sset.count,
                                    "numel": sset.numel, "rotation": k,
                                    "bytes_per_copy": sset.numel * self.elsize}
            if any(P.OPS[op].matrices_only for op in self.ops):
                msub = S.matrices(sset)
                self.sets_meta[name]["group_ops"] = {
                    "tensors": msub.count, "numel": msub.numel,
                    "rotation": self.rotation(msub)}
            log(f"[{self.dev.type}] {name} ({self.sets.index(name) + 1} of {len(self.sets)}): {sset.count} "
                f"tensors, {sset.numel / 1e6:.1f}M elements, {k} rotated cop{'y' if k == 1 else 'ies'}")
            first_row = len(self.rows)
            for op in self.ops:
                t0 = time.perf_counter()
                try:
                    if op == "step":
                        self.run_step(sset)
                    else:
                        self.run_op(sset, op, k)
                finally:
                    free(self.dev)
                log(f"    {op}: done in {time.perf_counter() - t0:.1f} s")
            for w in report.assess(self.rows[first_row:]):
                log("  WARNING: " + w)
                self.warnings.append(w)
            self.sets_done.append(name)
            if self.on_set_done is not None:
                self.on_set_done(self.result())
        return self.result(complete=True)

    def result(self, complete: bool = False) -> dict:
        """The results so far (``complete``: the run finished)."""
        t_start = self.t_start if self.t_start is not None else time.perf_counter()
        return {
            "meta": {**self.info, "torch": torch.__version__, "pyreg": pyreg.__version__,
                     "python": platform.python_version(), "dtype": str(self.dtype).replace("torch.", ""),
                     "quick": self.quick, "compile": self.compile, "warmup": self.warmup,
                     "repeats": self.repeats, "min_total_s": self.min_total_s,
                     "compile_startup_s": self.compile_startup_s, "cuda_graphs": self.graphs,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "wall_s": round(time.perf_counter() - t_start, 1),
                     "complete": complete, "sets_planned": list(self.sets), "sets_done": list(self.sets_done),
                     "ops": list(self.ops), "subset": is_subset(self.sets, self.ops, self.quick),
                     "noisy_spread": report.NOISY_SPREAD, "roofline_limit_pct": report.ROOFLINE_LIMIT},
            # a snapshot: the run goes on adding rows and sets after an incremental write
            "notes": list(self.notes), "warnings": list(self.warnings),
            "shape_sets": copy.deepcopy(self.sets_meta), "rows": copy.deepcopy(self.rows),
        }

    # -- one op ------------------------------------------------------------------
    def run_op(self, sset: S.ShapeSet, op: str, k: int) -> None:
        spec = P.OPS[op]
        if spec.matrices_only:  # the group ops: the set's tensors of 2+ dims
            sset = S.matrices(sset)
            k = self.rotation(sset)
            self.note_once("group_prox_ and max_norm_ run on each set's tensors of 2 or more dimensions "
                           "(1-D biases and norm scales left out; tensor and element counts in the JSON)")
            log(f"      {op}: {sset.count} tensors of 2+ dims, {sset.numel / 1e6:.2f}M elements, "
                f"{k} rotated cop{'y' if k == 1 else 'ies'}")
        c = P.Coefs(sset.count, self.dev, [s for _, s in sset.shapes] if spec.matrices_only else ())
        gen = Gen(self.dev, self.dtype, seed=1000 + P.OP_ORDER.index(op))
        gen_ref = Gen(self.dev, self.dtype, seed=7)
        # Each copy's tensors and its flat buffers for the roofline and copy ops
        # are made together, so that both lie in memory of the same kind: a
        # process's first allocations can land in fragmented memory, which
        # streams slower (bench/layout.py shows it).
        both = self.copies(lambda: {"ws": gen.tensors(sset, P.W_SCALE),
                                    "gs": gen.tensors(sset, P.G_SCALE) if op == "add_penalty_grad_" else [],
                                    "flat": [gen_ref.randn((sset.numel,), P.W_SCALE),
                                             gen_ref.randn((sset.numel,), P.W_SCALE)]}, k)
        data = [{"ws": d["ws"], "gs": d["gs"]} for d in both]
        bufs = [tuple(d["flat"]) for d in both]
        del both

        def fresh():  # a copy of rotation 0 (still pristine: checks run before any timing)
            return {key: ([t.clone() for t in v] if key in spec.mutates else v) for key, v in data[0].items()}

        def result(d, out):
            if op == "weight_stats":
                return out
            return d[spec.mutates[0]]

        nbytes = spec.bytes_per_elem * self.elsize * sset.numel

        # 1. pyreg's result on fresh data, and pyreg against its float64 spec
        t_check = time.perf_counter()
        d = fresh()
        pyreg_fn = P.op_fn(op, "pyreg", c)
        ref = result(d, pyreg_fn(d))
        spec_cache: Dict[str, Any] = {}

        def spec_result():  # pyreg's float64 spec (torch backend) on fresh data, computed once
            if "out" not in spec_cache:
                d2 = fresh()
                with pyreg.use_backend("torch"):
                    spec_cache["out"] = result(d2, pyreg_fn(d2))
            return spec_cache["out"]

        if self.quick and sset.numel > QUICK_SPEC_MAX_NUMEL:
            checks = {"pyreg": (True, "float64 spec check skipped in --quick (large set); peers checked vs pyreg")}
            self.note_once(f"--quick: pyreg's own check against its float64 spec skipped for sets over "
                           f"{QUICK_SPEC_MAX_NUMEL // 10**6}M elements (peers are still checked against pyreg, "
                           f"and against the spec where they differ from pyreg)")
        else:
            ok, detail = P.compare(op, spec_result(), ref, self.dtype)
            checks = {"pyreg": (ok, "vs float64 spec: " + detail)}
        if "skipped" in checks["pyreg"][1]:
            log(f"      pyreg on fresh data ({checks['pyreg'][1]}): {time.perf_counter() - t_check:.1f} s")
        else:
            log(f"      pyreg {'matches' if checks['pyreg'][0] else 'DOES NOT MATCH'} its float64 spec "
                f"({checks['pyreg'][1][len('vs float64 spec: '):]}): {time.perf_counter() - t_check:.1f} s")

        # 2. the peers' results against pyreg's (compile happens here)
        fns: Dict[str, Optional[Callable]] = {"pyreg": pyreg_fn}
        first_call: Dict[str, float] = {}
        for peer in spec.peers[1:]:
            if peer == "compile" and not self.compile_enabled(sset):
                fns[peer] = None
                continue
            try:
                compiled = torch.compile(P.loop_of(op), dynamic=False) if peer == "compile" else None
                fn = P.op_fn(op, peer, c, compiled)
                d = fresh()
                t0 = time.perf_counter()
                out = fn(d)
                sync(self.dev)
                first_call[peer] = time.perf_counter() - t0
                if peer == "compile":
                    log(f"      compile: first call (compiling) took {first_call[peer]:.1f} s")
                checks[peer] = P.compare(op, ref, result(d, out), self.dtype)
                if not checks[peer][0] and "vs float64 spec" not in checks["pyreg"][1]:
                    # --quick skipped pyreg's own spec check: a disagreement needs it now
                    ok, detail = P.compare(op, spec_result(), ref, self.dtype)
                    checks["pyreg"] = (ok, "vs float64 spec: " + detail)
                if not checks[peer][0] and checks["pyreg"][0]:
                    # The peer differs from pyreg, and pyreg matches the float64
                    # spec: is the peer itself off the spec (e.g. fp32 sums)?
                    ok_spec, vs_spec = P.compare(op, spec_result(), result(d, out), self.dtype)
                    if not ok_spec:
                        checks[peer] = ("inexact", f"peer off the float64 spec ({vs_spec}); "
                                                   f"vs pyreg: {checks[peer][1]}")
                fns[peer] = fn
                del d, out
            except Exception as e:  # a peer that fails is a visible row, not a crash
                checks[peer] = (False, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                fns[peer] = None
        ref = spec_cache = None  # (rebound, not deleted: closures above refer to them)
        outcome = {True: "matches", False: "FAILS", "inexact": "inexact (off the float64 spec itself)"}
        log("      checks against pyreg: " + "; ".join(
            f"{peer} {outcome.get(checks[peer][0], checks[peer][0])}" if peer in checks else f"{peer} skipped (see notes)"
            for peer in spec.peers[1:]))

        # 3. timing, side by side: pyreg, the peers and the flat-buffer
        # roofline and copy ops (rotated buffers) take turns call by call.
        calls: Dict[str, Callable[[int], object]] = {}
        for peer in spec.peers:
            if fns.get(peer) is not None:
                calls[peer] = lambda i, fn=fns[peer]: fn(data[i % k])
        for kind in (spec.roofline, "copy"):
            flat = [P.roofline_fn(kind, a, b) for a, b in bufs]
            calls[kind] = lambda i, flat=flat: flat[i % k]()
        if self.graphs:
            t0 = time.perf_counter()
            for name in list(calls):
                try:
                    calls[name] = cuda_graphed(calls[name], k, self.dev)
                except Exception as e:
                    if name not in spec.peers:  # the roofline and copy ops must capture
                        raise
                    checks[name] = (False, f"CUDA graph capture failed: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:200]}")
                    del calls[name]
            log(f"      CUDA graph capture: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        times = self.timeit_side_by_side(calls)
        log(f"      timing side by side: {time.perf_counter() - t0:.1f} s")
        del bufs, calls
        refs = {}
        for kind in (spec.roofline, "copy"):
            units, what = P.ROOFLINE[kind]
            t = times[kind]
            refs[kind] = {**t, "what": what, "gbps": units * self.elsize * sset.numel / (t["ms"] * 1e6)}
        roof, copy = refs[spec.roofline], refs["copy"]
        # then peak extra memory, one call per peer
        timed: Dict[str, dict] = {}
        for peer in spec.peers:
            if peer not in times:
                continue
            t = times[peer]
            timed[peer] = {**t, **self.memory(lambda: fns[peer](data[0]))}
            host = f", host {t['host_ms']:.3f} ms" if self.dev.type == "cuda" else ""
            log(f"      {peer:8s} {t['ms']:9.3f} ms (median of {t['samples']} calls; "
                f"min {t['min_ms']:.3f}, max {t['max_ms']:.3f}{host})")

        # 4. rows
        base = timed.get("pyreg", {}).get("ms")
        for peer in spec.peers:
            what = {"pyreg": f"pyreg.{op} ({self.info['backend']} backend)", "loop": "Python loop of torch ops",
                    "foreach": spec.foreach_what, "compile": "torch.compile(loop)"}[peer]
            if peer not in timed:
                ok_detail = checks.get(peer)
                status = "skipped" if ok_detail is None else "FAIL"
                detail = "not run (see notes)" if ok_detail is None else ok_detail[1]
                self.row(sset, op, peer, what, check=status, check_detail=detail)
                continue
            t = timed[peer]
            ok, detail = checks[peer]
            status = ok if isinstance(ok, str) else ("pass" if ok else "FAIL")
            r = self.row(sset, op, peer, what, ms=t["ms"], min_ms=t["min_ms"], max_ms=t["max_ms"],
                         samples=t["samples"],
                         host_ms=t.get("host_ms"), gbps=nbytes / (t["ms"] * 1e6), pct_roofline=100.0 * roof["ms"] / t["ms"],
                         pct_copy=100.0 * (nbytes / t["ms"]) / (copy["gbps"] * 1e6),
                         speedup=(t["ms"] / base) if base else None,
                         check=status, check_detail=detail,
                         peak_extra_mb=_mb(t.get("torch_bytes")), rss_peak_extra_mb=_mb(t.get("rss_bytes")))
            if peer == "compile":
                r["compile_s"] = max(0.0, first_call["compile"] - t["ms"] / 1e3)
        for kind in (spec.roofline, "copy"):
            ref_t = refs[kind]
            units = P.ROOFLINE[kind][0]
            self.row(sset, op, "roofline" if kind == spec.roofline else "copy",
                     f"{ref_t['what']} over one flat buffer ({units * self.elsize} B/elem)",
                     ms=ref_t["ms"], min_ms=ref_t["min_ms"], max_ms=ref_t["max_ms"], samples=ref_t["samples"],
                     gbps=ref_t["gbps"],
                     pct_roofline=100.0 * roof["ms"] / ref_t["ms"] if kind == spec.roofline else None,
                     pct_copy=100.0 * ref_t["gbps"] / copy["gbps"],
                     speedup=(ref_t["ms"] / base) if base else None)
        data = None

    # -- the optimizer step --------------------------------------------------------
    def torch_adamw_impl(self) -> str:
        """``"fused"`` where torch's fused AdamW runs for this device and dtype
        (CUDA; CPU from torch 2.4), else ``"foreach"`` (noted)."""
        try:
            p = torch.nn.Parameter(torch.zeros(4, device=self.dev, dtype=self.dtype))
            p.grad = torch.ones_like(p)
            torch.optim.AdamW([p], lr=P.LR, fused=True).step()
            return "fused"
        except Exception as e:
            self.note_once(f"torch's fused AdamW is unavailable for {self.dev.type} {self.dtype} "
                           f"({type(e).__name__}); the torch peers of the step use foreach=True")
            return "foreach"

    def run_step(self, sset: S.ShapeSet) -> None:
        """One whole AdamW step with L1 (grads already set), each peer on its own
        copy of the same fresh weights and state; eager, and on CUDA also as
        CUDA-graph replays (or only those, with --cuda-graphs)."""
        dev, dtype = self.dev, self.dtype
        lr, wd, l1 = P.LR, P.STEP_WEIGHT_DECAY, P.STEP_L1
        # p, g, m and v are all touched: rotate as many copies as that traffic needs
        k = self.rotation(sset, buffers=4)
        self.sets_meta[sset.name]["step_rotation"] = k
        log(f"      step: {k} rotated cop{'y' if k == 1 else 'ies'} of (p, g, m, v)")
        impl = self.torch_adamw_impl()
        gen = Gen(dev, dtype, seed=2000)
        weights = self.copies(lambda: gen.tensors(sset, P.W_SCALE), k)
        grads = self.copies(lambda: gen.tensors(sset, P.G_SCALE), k)
        thresholds, scales = [lr * l1] * sset.count, [1.0] * sset.count  # the loop prox, l2 = 0

        def params(i: int) -> List[torch.nn.Parameter]:
            ps = [torch.nn.Parameter(w.clone()) for w in weights[i]]
            for p, g in zip(ps, grads[i]):  # grads are read only: shared by the peers
                p.grad = g
            return ps

        def build(peer: str, ps, capturable: bool = False) -> Callable[[], object]:
            kw = {"capturable": True} if capturable else {}
            if peer == "pyreg":
                o = pyreg.optim.AdamW(ps, lr=lr, weight_decay=wd, l1=l1, **kw)
                return o.step
            torch_opt = torch.optim.AdamW(ps, lr=lr, weight_decay=wd, **{impl: True}, **kw)
            if peer == "regularized":
                o = pyreg.Regularized(torch_opt, l1=l1, mode="proximal")
                return o.step
            if peer == "bare":
                return torch_opt.step
            plist = [p.data for p in ps]

            def step():
                torch_opt.step()
                P.prox_loop(plist, thresholds, scales)
            return step

        whats = {"pyreg": f"pyreg.optim.AdamW(lr, weight_decay={wd}, l1={l1:g}): one fused pass",
                 "regularized": f"Regularized(torch AdamW({impl}, weight_decay={wd}), l1={l1:g}, proximal)",
                 "bare": f"torch AdamW({impl}=True, weight_decay={wd}), no L1",
                 "loop": f"torch AdamW({impl}, weight_decay={wd}) + Python-loop prox"}

        # 1. checks: one step of each peer from the same fresh start, against pyreg
        checks: Dict[str, tuple] = {}
        results: Dict[str, list] = {}
        for peer in ("pyreg", "regularized", "loop"):
            try:
                ps = params(0)
                build(peer, ps)()
                sync(dev)
                results[peer] = [p.detach() for p in ps]
            except Exception as e:
                checks[peer] = (False, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        # a weight within rounding of the threshold may land on either side
        slack = 16 * torch.finfo(dtype).eps * lr
        ref_name = "Regularized(torch AdamW)"
        if "pyreg" in results:
            for peer in ("regularized", "loop"):
                if peer in results:
                    checks[peer] = P.compare_params(results["pyreg"], results[peer], dtype, slack)
            if "regularized" in results:
                ok, detail = checks["regularized"]
                checks["pyreg"] = (ok, f"vs {ref_name}: {detail}")
            zeros = sum(int((p == 0).sum()) for p in results["pyreg"])
            log(f"      check after one step (pyreg's step made {zeros:,} exact zeros): "
                + "; ".join(f"{peer} {'matches' if checks[peer][0] else 'FAILS'} ({checks[peer][1]})"
                            for peer in ("regularized", "loop") if peer in checks))
        for peer in ("pyreg", "regularized", "loop"):
            if peer in checks and not checks[peer][0]:
                msg = (f"{sset.name} step: CHECK FAILED for {peer} ({checks[peer][1]}): pyreg's fused "
                       f"AdamW must equal {ref_name} after one step")
                log("      " + msg)
                self.note_once(msg)
        checks["bare"] = ("n/a", "different math (weight decay, no L1): not compared")
        del results
        free(dev)

        passes = []
        if not self.graphs:
            passes.append(("step", False))
        if dev.type == "cuda":
            passes.append(("step" if self.graphs else "step-graph", True))
        for op_name, graphed in passes:
            self.step_pass(sset, op_name, graphed, k, impl, params, build, whats, checks)
            free(dev)
        weights = grads = None  # free before the next op (params() refers to them)

    def step_peers_that_do_not_fit(self, sset: S.ShapeSet, k: int) -> Dict[str, str]:
        """On a GPU, the step's peers left out so that the rest fit in its
        free memory, each with the reason; the others run. Side by side, each
        peer holds its own weights and two state buffers per rotated copy,
        and the references four flat buffers: (3 peers + 4) buffers of the
        set's size per copy. The peers are left out in the order of
        ``P.STEP_DROP_ORDER`` (pyreg and torch's bare step, the comparison
        that matters, last); none on the CPU."""
        if self.dev.type != "cuda":
            return {}
        free_b, _ = torch.cuda.mem_get_info(self.dev)
        free_b += torch.cuda.memory_reserved(self.dev) - torch.cuda.memory_allocated(self.dev)
        buf = k * sset.numel * self.elsize
        peers = list(P.STEP_PEERS)
        for peer in P.STEP_DROP_ORDER:
            if buf * (3 * len(peers) + 4) <= STEP_MEMORY_FRACTION * free_b or len(peers) <= 2:
                break
            peers.remove(peer)
        why = (f"the {len(P.STEP_PEERS)} peers side by side need "
               f"{buf * (3 * len(P.STEP_PEERS) + 4) / 2**30:.1f} GiB, {free_b / 2**30:.1f} GiB free on this GPU")
        out = {peer: f"not run: {why}" for peer in P.STEP_PEERS if peer not in peers}
        if out:
            msg = f"{sset.name} step: {', '.join(out)} left out ({why})"
            log("      " + msg)
            self.note_once(msg)
        return out

    def step_pass(self, sset, op_name, graphed, k, impl, params, build, whats, checks) -> None:
        """Time the step's peers side by side (eager, or CUDA-graph replays),
        with the flat-buffer AdamW step and the copy as references; add rows."""
        dev, dtype = self.dev, self.dtype
        steps: Dict[str, list] = {}
        errors: Dict[str, str] = {}
        skipped = self.step_peers_that_do_not_fit(sset, k)
        for peer in P.STEP_PEERS:
            if peer in skipped:
                continue
            try:
                steps[peer] = [build(peer, params(i), capturable=graphed) for i in range(k)]
                for s in steps[peer]:  # a few steps first: the state exists, as in training
                    for _ in range(1 if self.quick else 2):
                        s()
                sync(dev)
            except Exception as e:
                errors[peer] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                steps.pop(peer, None)
                free(dev)
        # the references: torch's AdamW over one flat parameter of the set's
        # element count (the same traffic, no per-tensor work), and a flat copy
        gen_ref = Gen(dev, dtype, seed=7)
        flat_steps, copies = [], []
        flat = self.copies(lambda: [gen_ref.randn((sset.numel,), P.W_SCALE), gen_ref.randn((sset.numel,), P.G_SCALE),
                                    gen_ref.randn((sset.numel,), P.W_SCALE), gen_ref.randn((sset.numel,), P.W_SCALE)], k)
        for w0, g0, a, b in flat:
            p = torch.nn.Parameter(w0)
            p.grad = g0
            o = torch.optim.AdamW([p], lr=P.LR, weight_decay=P.STEP_WEIGHT_DECAY, **{impl: True},
                                  **({"capturable": True} if graphed else {}))
            o.step()
            flat_steps.append(o.step)
            copies.append(lambda a=a, b=b: b.copy_(a))
        del flat
        sync(dev)
        calls: Dict[str, Callable[[int], object]] = {
            peer: (lambda i, s=s: s[i % k]()) for peer, s in steps.items()}
        calls["roofline"] = lambda i: flat_steps[i % k]()
        calls["copy"] = lambda i: copies[i % k]()
        if graphed:
            t0 = time.perf_counter()
            for name in list(calls):
                try:
                    calls[name] = cuda_graphed(calls[name], k, dev)
                except Exception as e:
                    if name not in P.STEP_PEERS:
                        raise
                    errors[name] = (f"CUDA graph capture failed: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]}")
                    del calls[name]
            log(f"      CUDA graph capture: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        times = self.timeit_side_by_side(calls)
        log(f"      {op_name} timing side by side: {time.perf_counter() - t0:.1f} s")
        timed = {}
        for peer in P.STEP_PEERS:
            if peer in times:
                t = times[peer]
                timed[peer] = {**t, **self.memory(lambda: calls[peer](0))}
                host = f", host {t['host_ms']:.3f} ms" if dev.type == "cuda" else ""
                log(f"      {peer:12s} {t['ms']:9.3f} ms (median of {t['samples']} calls; "
                    f"min {t['min_ms']:.3f}, max {t['max_ms']:.3f}{host})")
        steps = calls = flat_steps = copies = None  # free the optimizers' state
        nbytes = P.OPS["step"].bytes_per_elem * self.elsize * sset.numel
        roof, copy = times["roofline"], times["copy"]
        copy_gbps = 2 * self.elsize * sset.numel / (copy["ms"] * 1e6)
        base = timed.get("pyreg", {}).get("ms")
        suffix = " (CUDA graph replay)" if graphed else ""
        for peer in P.STEP_PEERS:
            ok, detail = checks.get(peer, (None, "not checked"))
            if peer in skipped:
                self.row(sset, op_name, peer, whats[peer] + suffix, check="skipped",
                         check_detail=skipped[peer], adamw_impl=impl)
                continue
            if peer not in timed:
                self.row(sset, op_name, peer, whats[peer] + suffix, check="FAIL",
                         check_detail=errors.get(peer, detail), adamw_impl=impl)
                continue
            t = timed[peer]
            if graphed and ok is not None and ok != "n/a":
                detail = "eager check: " + detail
            status = ok if isinstance(ok, str) else ("pass" if ok else "FAIL")
            self.row(sset, op_name, peer, whats[peer] + suffix, ms=t["ms"], min_ms=t["min_ms"],
                     max_ms=t["max_ms"], samples=t["samples"], host_ms=t.get("host_ms"), gbps=nbytes / (t["ms"] * 1e6),
                     pct_roofline=100.0 * roof["ms"] / t["ms"],
                     pct_copy=100.0 * (nbytes / t["ms"]) / (copy_gbps * 1e6),
                     speedup=(t["ms"] / base) if base else None, check=status, check_detail=detail,
                     peak_extra_mb=_mb(t.get("torch_bytes")), rss_peak_extra_mb=_mb(t.get("rss_bytes")),
                     adamw_impl=impl)
        for kind, t in (("roofline", roof), ("copy", copy)):
            units, what = P.ROOFLINE["adamw_flat" if kind == "roofline" else "copy"]
            what = what if kind == "roofline" else f"{what} over one flat buffer"
            self.row(sset, op_name, kind, f"{what} ({units * self.elsize} B/elem){suffix}", ms=t["ms"],
                     min_ms=t["min_ms"], max_ms=t["max_ms"], samples=t["samples"], host_ms=t.get("host_ms"),
                     gbps=units * self.elsize * sset.numel / (t["ms"] * 1e6),
                     pct_roofline=100.0 * roof["ms"] / t["ms"] if kind == "roofline" else None,
                     pct_copy=100.0 * (units * self.elsize * sset.numel / (t["ms"] * 1e6)) / copy_gbps,
                     speedup=(t["ms"] / base) if base else None, adamw_impl=impl)


def _mb(b: Optional[int]) -> Optional[float]:
    return None if b is None else b / 2 ** 20
