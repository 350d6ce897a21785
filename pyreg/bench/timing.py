"""Timing and memory measurement.

* CPU: ``time.perf_counter`` around each call (the ops are synchronous).
* CUDA: a pair of CUDA events around each call on the current stream, then
  one synchronize; the time between the events is the device time (for a
  small tensor list, mostly the host's time to launch the work). ``host_ms``
  is the host's time in the call, without waiting for the device: in a
  training step that time overlaps the GPU's queued work, so a call whose
  host_ms is under its device ms does not slow a GPU-bound step.
* Each sample is one call; the reported figure is the median of the samples,
  after warm-up calls, with their minimum and maximum (the spread). Calls that take under ~1 ms get more samples.
  ``time_interleaved`` times several functions round robin (the suite's way).
* Peak extra memory: see :func:`peak_extra_bytes`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int,
               min_total_s: float = 0.05, max_samples: int = 200,
               before: Optional[Callable[[int], None]] = None) -> Dict[str, object]:
    """Median time in ms of ``fn(i)`` (i counts calls, for rotating buffers).

    ``before(i)``, when given, runs before call i outside the timed region.
    At least ``repeats`` samples; more (up to ``max_samples``) while the total
    timed time is under ``min_total_s``.
    """
    i = 0
    for _ in range(warmup):
        if before is not None:
            before(i)
        fn(i)
        i += 1
    sync(device)
    samples: List[float] = []
    host: List[float] = []
    total = 0.0
    while len(samples) < repeats or (total < min_total_s and len(samples) < max_samples):
        if before is not None:
            before(i)
        ms, host_ms = _one_call(fn, i, device)
        samples.append(ms)
        host.append(host_ms)
        total += ms / 1e3
        i += 1
    return _summary(samples, host)


def _summary(samples: List[float], host: List[float]) -> Dict[str, object]:
    return {"ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "samples": len(samples), "host_ms": statistics.median(host)}


def time_interleaved(fns: Dict[str, Callable[[int], object]], device: torch.device, warmup: int,
                     repeats: int, min_total_s: float = 0.05, max_rounds: int = 200) -> Dict[str, Dict[str, object]]:
    """``time_calls`` for several functions side by side: each round calls every
    function once, in turn, so a slow spell of a shared machine slows them all
    alike and the ratios of the medians stay honest. At least ``repeats``
    rounds; more (up to ``max_rounds``) while the slowest function's total
    timed time is under ``min_total_s``."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    host: Dict[str, List[float]] = {name: [] for name in fns}
    i = warmup
    while True:
        for name, fn in fns.items():
            ms, host_ms = _one_call(fn, i, device)
            samples[name].append(ms)
            host[name].append(host_ms)
        i += 1
        rounds = i - warmup
        slowest = max(sum(v) for v in samples.values()) / 1e3
        if rounds >= max_rounds or (rounds >= repeats and slowest >= min_total_s):
            break
    return {name: _summary(samples[name], host[name]) for name in fns}


def _one_call(fn: Callable[[int], object], i: int, device: torch.device) -> Tuple[float, float]:
    """(ms, host_ms) of one call: equal on CPU; on CUDA the device time
    between two events and the host's time in the call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn(i)
        host_ms = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host_ms
    t0 = time.perf_counter()
    fn(i)
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms


def cuda_graphed(fn: Callable[[int], object], k: int, device: torch.device) -> Callable[[int], object]:
    """``fn(0) .. fn(k-1)`` each captured in a CUDA graph (after warm-up calls on
    a side stream, as ``torch.cuda.graph`` asks: compiles, workspaces, kernel
    loading); returns ``g(i)``, which replays graph ``i % k``. A replay launches
    the captured kernels with no host work: timing it measures the device's
    time alone, the steady state of a training step that is itself captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for j in range(k):
            fn(j)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for j in range(k):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn(j)
        graphs.append(g)
    torch.cuda.synchronize(device)
    return lambda i: graphs[i % k].replay()


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------
def _torch_cpu_peak(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) through torch's CPU allocator
    during ``fn()``, from the profiler's allocation events (it records every
    allocation and free of c10's CPU allocator, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines, which its C++ side writes to fd 2."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _rss_peak(fn: Callable[[], object]) -> Optional[int]:
    """Growth of the process's peak resident set during ``fn()``: free heap
    memory is first returned to the OS (malloc_trim) and the high-water mark
    reset (/proc/self/clear_refs), so memory the call touches shows up even
    when it comes from malloc rather than torch. Linux/glibc only, else None.
    An upper bound of sorts: heap fragmentation can count freed-and-not-reused
    blocks, and other threads' allocations count too."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        fn()
        return max(0, _proc_status()["VmHWM"] - before)
    except (OSError, KeyError, AttributeError):
        return None


#: Whether this process has used torch's profiler (see :func:`peak_extra_bytes`).
_profiler_started = False


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Dict[str, Optional[int]]:
    """Peak memory a call allocates beyond what is live before it.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before
    (torch's caching allocator; reset_peak_memory_stats first).
    CPU: ``torch_bytes``: the peak of torch's CPU allocator (profiler
    allocation events), which sees every tensor the call creates, including
    torch.compile's buffers but not malloc inside pyreg's C++ kernels;
    ``rss_bytes``: peak resident-set growth (see :func:`_rss_peak`), which sees
    those too (and the profiler's own event buffers, small). Both come from
    the same single call. The table shows ``torch_bytes``; both are in the JSON.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"torch_bytes": torch.cuda.max_memory_allocated(device) - base, "rss_bytes": None}
    global _profiler_started
    if not _profiler_started:  # its first use loads the profiler (about 70 MB): not the call's
        _torch_cpu_peak(lambda: None)
        _profiler_started = True
    box = {}

    def profiled():
        box["torch_bytes"] = _torch_cpu_peak(fn)

    rss = _rss_peak(profiled)  # one call: the RSS window contains the profiled call
    if "torch_bytes" not in box:  # no /proc or glibc: profile on its own
        profiled()
    return {"torch_bytes": box["torch_bytes"], "rss_bytes": rss}
