"""The benchmark run: for each device, shape set and op, check then time every peer."""
from __future__ import annotations

import datetime
import gc
import glob
import math
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional

import torch

import pyreg

from . import peers as P
from . import shapes as S
from .timing import cuda_graphed, peak_extra_bytes, sync, time_calls, time_interleaved

# In --quick mode torch.compile runs only for shape sets with at most this many
# tensors: compiling a loop over 150 tensors takes 25-50 s per op on a 2-core CPU.
QUICK_COMPILE_MAX_TENSORS = 16
CACHE_FACTOR = 4     # rotated buffers span at least this many times the last-level cache
MAX_ROTATION = 64
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


def rotation_count(sset: S.ShapeSet, dtype: torch.dtype, cache: int) -> int:
    nbytes = max(1, sset.numel * torch.tensor([], dtype=dtype).element_size())
    return int(min(MAX_ROTATION, max(1, math.ceil(CACHE_FACTOR * cache / nbytes))))


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------
class Suite:
    def __init__(self, dev: torch.device, dtype: torch.dtype, sets: List[str], ops: List[str],
                 quick: bool, compile_: bool, repeats: Optional[int], graphs: bool = False):
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
        self.sets_meta: Dict[str, dict] = {}
        self.compile_startup_s: Optional[float] = None

    # -- helpers ---------------------------------------------------------------
    def timeit_side_by_side(self, fns: Dict[str, Callable[[int], object]]) -> Dict[str, dict]:
        return time_interleaved(fns, self.dev, self.warmup, self.repeats, self.min_total_s)

    def memory(self, fn: Callable[[], object]) -> dict:
        try:
            return peak_extra_bytes(fn, self.dev)
        except Exception as e:  # memory is informative; never fail the run on it
            return {"torch_bytes": None, "rss_bytes": None, "error": repr(e)}

    def row(self, sset, op, peer, what, ms=None, **kw) -> dict:
        r = {"device": self.dev.type, "shapes": sset.name, "op": op, "peer": peer, "what": what,
             "ms": ms, "min_ms": None, "samples": None, "host_ms": None, "gbps": None, "pct_roofline": None, "pct_copy": None,
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
        log(f"  torch.compile start-up (one-time, not in per-op compile times): {self.compile_startup_s:.1f} s")

    # -- the run ---------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.perf_counter()
        if self.compile:
            if self.quick:
                big = [s for s in self.sets if S.get(s).count > QUICK_COMPILE_MAX_TENSORS]
                if big:
                    self.notes.append(f"--quick: torch.compile peer skipped for {', '.join(big)} "
                                      f"(more than {QUICK_COMPILE_MAX_TENSORS} tensors; compiling takes "
                                      "25-50 s per op); run without --quick for it")
            if any(self.compile_enabled(S.get(s)) for s in self.sets):
                self.warm_compiler()
        else:
            self.notes.append("--no-compile: torch.compile peer skipped")
        if self.quick:
            self.notes.append(f"--quick: {self.warmup} warm-up call, median of >= {self.repeats} calls")
        if self.graphs:
            self.notes.append("--cuda-graphs: every timed call (each peer, roofline and copy) is the replay of "
                              "a CUDA graph that captured it: device time only, no host launch overhead")
            if "adamw_step" in self.ops:
                self.notes.append("--cuda-graphs: the optimizer-step comparison is not run (it times "
                                  "eager steps)")
                self.ops = [op for op in self.ops if op != "adamw_step"]
        for name in self.sets:
            sset = S.get(name)
            if sset.gpu_only and self.dev.type != "cuda":
                self.notes.append(f"{name}: GPU only, skipped on {self.dev.type}")
                continue
            k = rotation_count(sset, self.dtype, self.info["cache_bytes"])
            self.sets_meta[name] = {"description": sset.description, "tensors": sset.count,
                                    "numel": sset.numel, "rotation": k,
                                    "bytes_per_copy": sset.numel * self.elsize}
            if any(P.OPS[op].matrices_only for op in self.ops):
                msub = S.matrices(sset)
                self.sets_meta[name]["group_ops"] = {
                    "tensors": msub.count, "numel": msub.numel,
                    "rotation": rotation_count(msub, self.dtype, self.info["cache_bytes"])}
            log(f"[{self.dev.type}] {name}: {sset.count} tensors, {sset.numel / 1e6:.1f}M elements, "
                f"{k} rotated cop{'y' if k == 1 else 'ies'}")
            for op in self.ops:
                t0 = time.perf_counter()
                try:
                    if op == "adamw_step":
                        self.run_step(sset, k)
                    else:
                        self.run_op(sset, op, k)
                finally:
                    free(self.dev)
                log(f"    {op}: {time.perf_counter() - t0:.1f} s")
        return {
            "meta": {**self.info, "torch": torch.__version__, "pyreg": pyreg.__version__,
                     "python": platform.python_version(), "dtype": str(self.dtype).replace("torch.", ""),
                     "quick": self.quick, "compile": self.compile, "warmup": self.warmup,
                     "repeats": self.repeats, "min_total_s": self.min_total_s,
                     "compile_startup_s": self.compile_startup_s, "cuda_graphs": self.graphs,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "wall_s": round(time.perf_counter() - t_start, 1)},
            "notes": self.notes, "shape_sets": self.sets_meta, "rows": self.rows,
        }

    # -- one op ------------------------------------------------------------------
    def run_op(self, sset: S.ShapeSet, op: str, k: int) -> None:
        spec = P.OPS[op]
        if spec.matrices_only:  # the group ops: the set's tensors of 2+ dims
            sset = S.matrices(sset)
            k = rotation_count(sset, self.dtype, self.info["cache_bytes"])
            self.note_once("group_prox_ and max_norm_ run on each set's tensors of 2 or more dimensions "
                           "(1-D biases and norm scales left out; tensor and element counts in the JSON)")
            log(f"      {op}: {sset.count} tensors of 2+ dims, {sset.numel / 1e6:.2f}M elements, "
                f"{k} rotated cop{'y' if k == 1 else 'ies'}")
        c = P.Coefs(sset.count, self.dev, [s for _, s in sset.shapes] if spec.matrices_only else ())
        gen = Gen(self.dev, self.dtype, seed=1000 + P.OP_ORDER.index(op))
        data = [{"ws": gen.tensors(sset, P.W_SCALE),
                 "gs": gen.tensors(sset, P.G_SCALE) if op == "add_penalty_grad_" else []} for _ in range(k)]

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
        log(f"      pyreg result (and spec check) on fresh data: {time.perf_counter() - t_check:.1f} s")

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
                    log(f"      compile  first call (compiles) {first_call[peer]:.1f} s")
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
        del ref, spec_cache

        # 3. timing, side by side: pyreg, the peers and the flat-buffer
        # roofline and copy ops (rotated buffers) take turns call by call.
        gen_ref = Gen(self.dev, self.dtype, seed=7)
        bufs = [(gen_ref.randn((sset.numel,), P.W_SCALE), gen_ref.randn((sset.numel,), P.W_SCALE))
                for _ in range(k)]
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
            log(f"      {peer:8s} {t['ms']:9.3f} ms (median of {t['samples']}{host})")

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
            r = self.row(sset, op, peer, what, ms=t["ms"], min_ms=t["min_ms"], samples=t["samples"],
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
                     ms=ref_t["ms"], min_ms=ref_t["min_ms"], samples=ref_t["samples"], gbps=ref_t["gbps"],
                     pct_roofline=100.0 * roof["ms"] / ref_t["ms"] if kind == spec.roofline else None,
                     pct_copy=100.0 * ref_t["gbps"] / copy["gbps"],
                     speedup=(ref_t["ms"] / base) if base else None)
        del data

    # -- the optimizer step --------------------------------------------------------
    def run_step(self, sset: S.ShapeSet, k: int) -> None:
        gen = Gen(self.dev, self.dtype, seed=2000)
        l1, l2, lr = 1e-3, 1e-4, P.LR
        params = [[torch.nn.Parameter(t) for t in gen.tensors(sset, P.W_SCALE)] for _ in range(k)]
        for ps in params:
            for p, g in zip(ps, gen.tensors(sset, P.G_SCALE)):
                p.grad = g
        pristine = [p.detach().clone() for p in params[0]]

        def adamw(ps, wd, impl):
            return torch.optim.AdamW(ps, lr=lr, weight_decay=wd, **{impl: True})

        # pick the faster AdamW implementation for the bare step (and the wrapped one)
        impl_ms = {}
        for impl in ("foreach", "fused"):
            try:
                opts = [adamw(ps, 0.01, impl) for ps in params]
                t = time_calls(lambda i: opts[i % k].step(), self.dev, k, 3, 0.02)
                impl_ms[impl] = t["ms"]
            except Exception as e:
                impl_ms[impl] = None
                self.notes.append(f"{sset.name}: AdamW({impl}=True) unavailable: {type(e).__name__}")
            finally:
                opts = None
                free(self.dev)
        impl = min((m, i) for i, m in impl_ms.items() if m is not None)[1]
        shrink_t, shrink_s = [lr * l1] * sset.count, [1.0 / (1.0 + 2.0 * lr * l2)] * sset.count

        def build(peer, ps):
            if peer == "bare":
                o = adamw(ps, 0.01, impl)
                return lambda: o.step()
            if peer == "pyreg":
                o = pyreg.Regularized(adamw(ps, 0.0, impl), l1=l1, l2=l2, mode="proximal")
                return lambda: o.step()
            o = adamw(ps, 0.0, impl)
            prox = P.prox_loop if peer == "loop" else P.prox_foreach
            plist = [p.data for p in ps]

            def step():
                o.step()
                prox(plist, shrink_t, shrink_s)
            return step

        # checks: one step from the same start, each peer against pyreg
        results = {}
        for peer in ("pyreg", "loop", "foreach"):
            ps = [torch.nn.Parameter(w.clone()) for w in pristine]
            for p, q in zip(ps, params[0]):
                p.grad = q.grad
            build(peer, ps)()
            results[peer] = [p.detach() for p in ps]
        checks = {peer: P.compare_params(results["pyreg"], results[peer], self.dtype) for peer in ("loop", "foreach")}
        checks["pyreg"] = (True, "reference (Regularized is tested against the spec in tests/)")
        del results
        free(self.dev)

        # side by side: the peers' steps take turns call by call
        steps = {peer: [build(peer, ps) for ps in params] for peer in P.OPS["adamw_step"].peers}
        for per_rotation in steps.values():
            for step in per_rotation:  # the first step of each rotated optimizer allocates its state
                step()
        t0 = time.perf_counter()
        times = self.timeit_side_by_side({peer: (lambda i, s=s: s[i % k]()) for peer, s in steps.items()})
        log(f"      timing side by side: {time.perf_counter() - t0:.1f} s")
        timed = {}
        for peer, t in times.items():
            timed[peer] = {**t, **self.memory(lambda: steps[peer][0]())}
            log(f"      {peer:8s} {t['ms']:9.3f} ms (median of {t['samples']})")
        steps = None
        free(self.dev)
        base = timed["pyreg"]["ms"]
        whats = {"pyreg": f"Regularized(AdamW({impl}), l1, l2, proximal)",
                 "bare": f"AdamW({impl}=True, weight_decay=0.01), no L1",
                 "loop": f"AdamW({impl}) + Python-loop prox", "foreach": f"AdamW({impl}) + _foreach prox"}
        for peer, t in timed.items():
            ok, detail = checks.get(peer, (None, "different math (weight decay, no L1): not compared"))
            if peer == "bare":
                detail += f"; AdamW step ms: " + ", ".join(f"{i} {m:.2f}" if m is not None else f"{i} n/a"
                                                         for i, m in impl_ms.items())
            self.row(sset, "adamw_step", peer, whats[peer], ms=t["ms"], min_ms=t["min_ms"],
                     samples=t["samples"], speedup=t["ms"] / base,
                     check="n/a" if ok is None else ("pass" if ok else "FAIL"), check_detail=detail,
                     peak_extra_mb=_mb(t.get("torch_bytes")), rss_peak_extra_mb=_mb(t.get("rss_bytes")),
                     adamw_impl=impl)
        del params, pristine


def _mb(b: Optional[int]) -> Optional[float]:
    return None if b is None else b / 2 ** 20
