"""The compiled backends: ``cpu`` (csrc/cpu), ``cuda`` (csrc/cuda/*.cu
built by nvcc) and ``cuda-emu`` (the same CUDA source built against the CUDA
emulator in csrc/cuda/emu, which runs it on the CPU so that it is tested
without a GPU).

All three go through this one class: the same marshalling (``_marshal``), the
same calls into pyreg._C (``<prefix>_weight_stats`` ...), one binding template
behind them. Only the launch context differs, per device:

- ``cpu``: torch's thread count (the kernels run on pyreg's own pool, with the
  GIL released);
- ``cuda``: a workspace from torch's caching allocator, the tensors' device and
  torch's current stream on it. Nothing synchronizes with the host or copies
  from host memory, so these calls can be captured in a CUDA graph;
- ``cuda-emu``: a workspace from torch's CPU allocator; device 0, no stream
  (each launch completes before the call returns).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._common import DTYPE_CODES, WeightStats, result_dtype
from .._lib import LOAD_ERROR, _C
from . import _marshal as m
from . import torch_ref
from ._marshal import KernelCoef

#: (keep-alive object, workspace pointer, device index, stream, thread count)
LaunchArgs = Tuple[Optional[Tensor], int, int, int, int]
#: Workspace bytes an op needs (asked only by the builds that use a workspace).
WorkspaceBytes = Callable[[], int]


def check_hyper_fields(fields: Optional[Tuple[str, ...]]) -> None:
    """Raises ImportError unless ``fields`` (the compiled module's
    ``hyper_fields()``: the columns of optim_step's hyperparameter table, from
    csrc/common/hyper.h) are torch_ref.HYPER, in the same order: a module built
    from other sources would read the wrong columns."""
    if fields is None or tuple(fields) != tuple(torch_ref.HYPER):
        raise ImportError(
            f"pyreg._C's hyperparameter columns {fields} differ from pyreg's {torch_ref.HYPER} "
            "(csrc/common/hyper.h against pyreg/backends/torch_ref.py): the compiled module was "
            "built from other sources; rebuild it (pip install .)")


if _C is not None:
    check_hyper_fields(tuple(_C.hyper_fields()) if hasattr(_C, "hyper_fields") else None)


def cpu_launch(kernels: "CompiledKernels", device: torch.device, nbytes: WorkspaceBytes) -> LaunchArgs:
    return None, 0, -1, 0, torch.get_num_threads()


def cuda_launch(kernels: "CompiledKernels", device: torch.device, nbytes: WorkspaceBytes) -> LaunchArgs:
    scratch = _workspace(nbytes(), device)
    return scratch, scratch.data_ptr(), device.index, torch.cuda.current_stream(device).cuda_stream, 0


def emulated_cuda_launch(kernels: "CompiledKernels", device: torch.device, nbytes: WorkspaceBytes) -> LaunchArgs:
    scratch = _workspace(nbytes(), device)
    return scratch, scratch.data_ptr(), 0, 0, 0


def _workspace(nbytes: int, device: torch.device) -> Tensor:
    """Scratch for one call (16-byte aligned: torch's allocators give more)."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


class CompiledKernels:
    """One build of pyreg's kernels as a backend.

    name: the backend's name; prefix: its functions' prefix in pyreg._C;
    device_type: the torch device type of the tensors it takes; launch: its
    launch context (one of the ``*_launch`` functions above).
    """

    def __init__(self, name: str, prefix: str, device_type: str,
                 launch: Callable[["CompiledKernels", torch.device, WorkspaceBytes], LaunchArgs]):
        self.NAME = name
        self.device_type = device_type
        self._prefix = prefix
        self._launch = launch
        self._device_errors: Dict[int, str] = {}
        self._fns: Dict[object, Any] = {}  # pyreg._C's functions of this build, by op (and what it has)

    def __repr__(self) -> str:
        return f"<pyreg backend {self.NAME!r}>"

    def _fn(self, what: str):
        fn = self._fns.get(what)
        if fn is None:
            fn = self._fns[what] = getattr(_C, f"{self._prefix}_{what}")
        return fn

    def compiled(self) -> bool:
        return _C is not None and bool(self._fn("compiled")())

    def archs(self) -> str:
        """What the code was built for: the CPU instruction set, the CUDA architectures."""
        return self._fn("archs")() if self.compiled() else ""

    def param_bytes(self) -> int:
        """CUDA builds: the kernel parameter space the tensor lists are batched
        for: 32764 bytes (CUDA 12.1's large kernel parameters: one launch per
        kernel for a model's list) or 4096; 0 on the CPU or when not built."""
        return int(self._fn("param_bytes")()) if self.compiled() else 0

    def unavailable_reason(self, device: Optional[int] = None) -> str:
        """Why the kernels cannot run on device index ``device`` (None: the
        current one), or "" when they can. The first answer per device is
        kept: on CUDA it probes every kernel (no kernel image for this GPU's
        compute capability, a driver older than the runtime...) and loads them."""
        if _C is None:
            return f"pyreg's compiled module is not loaded ({LOAD_ERROR})"
        if not self.compiled():
            return self._fn("runtime_error")()
        if self.device_type == "cuda":  # a GPU: probed per device
            if not torch.cuda.is_available():
                return "torch has no usable CUDA"
            index = torch.cuda.current_device() if device is None else device
        else:
            index = 0
        err = self._device_errors.get(index)
        if err is None:
            err = self._device_errors[index] = self._fn("device_error")(index)
        return err

    def available(self, device: Optional[int] = None) -> bool:
        return not self.unavailable_reason(device)

    def why_not(self, device: torch.device) -> str:
        """Why this backend cannot take tensors on ``device``, or "" if it can."""
        if device.type != self.device_type:
            return f"it takes {self.device_type} tensors"
        return self.unavailable_reason(device.index)

    def _at(self, device: torch.device, numels: List[int]) -> LaunchArgs:
        """Where an element-wise op on tensors of ``numels`` elements runs."""
        return self._launch(self, device, lambda: self._fn("workspace_bytes")(len(numels), sum(numels)))

    # ---- the element-wise ops ------------------------------------------------------
    # Each op has one entry into pyreg._C, ``<op>_ptrs``, which takes the lists
    # already described (data pointers, numels, dtype codes: ``_marshal.describe``)
    # and checked, and runs where ``device`` says (the backend's launch). The
    # ops' eager paths (general and CPU fast path) and Regularized's direct
    # calls all reach the kernels through it. The methods named as the ops
    # take tensors: they make them dense and describe them first.
    def weight_stats(self, tensors: List[Tensor]) -> WeightStats:
        ws = m.dense_list(tensors)
        rd = result_dtype(ws)
        dev = ws[0].device
        n = len(ws)
        l1, l2, linf = (torch.empty(n, dtype=rd, device=dev) for _ in range(3))
        nnz = torch.empty(n, dtype=torch.int64, device=dev)
        out = WeightStats(l1, l2, linf, nnz)
        self.weight_stats_ptrs(*m.describe(ws), out)
        return out

    def weight_stats_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], out: WeightStats) -> None:
        """weight_stats on a list already described and checked, into ``out``
        (l1, l2, linf: float32 or float64, nnz: int64; one entry per tensor,
        on the tensors' device)."""
        keep, *at = self._at(out.nnz.device, numels)
        self._fn("weight_stats")(ptrs, numels, codes, out.l1.data_ptr(), out.l2.data_ptr(), out.linf.data_ptr(),
                                 out.nnz.data_ptr(), DTYPE_CODES[out.l1.dtype], *at)

    def penalty(self, tensors: List[Tensor], l1: KernelCoef, l2: KernelCoef,
                ref: Optional[List[Tensor]] = None) -> Tensor:
        ws = m.dense_list(tensors)
        rs = m.like(ref, ws) if ref is not None else []
        out = torch.empty((), dtype=result_dtype(ws), device=ws[0].device)
        self.penalty_ptrs(*m.describe(ws), l1, l2, out, refs=m.pointers(rs))
        return out

    def penalty_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], l1: KernelCoef,
                     l2: KernelCoef, out: Tensor, refs: Sequence[int] = ()) -> None:
        """penalty on lists already described and checked; the value goes to
        ``out`` (0-dim, on the tensors' device)."""
        dev, n = out.device, len(ptrs)
        keep, *at = self._at(dev, numels)
        self._fn("penalty")(ptrs, numels, codes, list(refs), m.coef(l1, dev, n), m.coef(l2, dev, n),
                            out.data_ptr(), DTYPE_CODES[out.dtype], *at)

    def add_penalty_grad_(self, tensors: List[Tensor], grads: List[Tensor], l1: KernelCoef,
                          l2: KernelCoef, ref: Optional[List[Tensor]] = None) -> Tensor:
        ws, gs = m.paired(tensors, grads)
        rs = m.like(ref, ws) if ref is not None else []
        out = torch.empty((), dtype=result_dtype(ws), device=ws[0].device)
        self.add_penalty_grad_ptrs(*m.describe(ws), m.pointers(gs.work), l1, l2, out, refs=m.pointers(rs))
        gs.commit()
        return out

    def add_penalty_grad_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], gptrs: List[int],
                              l1: KernelCoef, l2: KernelCoef, out: Tensor, refs: Sequence[int] = ()) -> None:
        """add_penalty_grad_ on lists already described and checked (grads at
        ``gptrs``, each like its tensor); the penalty goes to ``out`` (0-dim)."""
        dev, n = out.device, len(ptrs)
        keep, *at = self._at(dev, numels)
        self._fn("add_penalty_grad")(ptrs, numels, codes, list(refs), gptrs, m.coef(l1, dev, n),
                                     m.coef(l2, dev, n), out.data_ptr(), DTYPE_CODES[out.dtype], *at)

    def prox_(self, tensors: List[Tensor], l1: KernelCoef, l2: KernelCoef, lr: KernelCoef,
              ref: Optional[List[Tensor]] = None) -> Tensor:
        ws = m.Writable(tensors)
        rs = m.like(ref, ws.work) if ref is not None else []
        nnz = torch.empty(len(ws.work), dtype=torch.int64, device=ws.work[0].device)
        self.prox_ptrs(*m.describe(ws.work), l1, l2, lr, nnz, refs=m.pointers(rs))
        ws.commit()
        return nnz

    def prox_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], l1: KernelCoef, l2: KernelCoef,
                  lr: KernelCoef, nnz: Tensor, refs: Sequence[int] = ()) -> None:
        """prox_ on a list already described and checked; the counts go to
        ``nnz`` (int64, one per tensor, on the tensors' device)."""
        dev, n = nnz.device, len(ptrs)
        keep, *at = self._at(dev, numels)
        self._fn("prox")(ptrs, numels, codes, list(refs), *(m.coef(c, dev, n) for c in (l1, l2, lr)),
                         nnz.data_ptr(), *at)

    # ---- l2_bound (CPR) --------------------------------------------------------------
    def bounds(self) -> bool:
        """Whether this build has an l2_bound kernel (every compiled build;
        the engine runs the rule in torch ops without one)."""
        return self._has("l2_bound")

    def _has(self, what: str) -> bool:
        """Whether pyreg._C has this build's ``what`` (bound only where the
        build has the kernel); asked once."""
        has = self._fns.get(("has", what))
        if has is None:
            has = self._fns[("has", what)] = _C is not None and hasattr(_C, f"{self._prefix}_{what}")
        return has

    def l2_bound_(self, tensors: List[Tensor], lam: Tensor, kappa: Tensor, steps: Tensor, bound: KernelCoef,
                  mu: KernelCoef, warmup: KernelCoef) -> None:
        """One CPR update after a step, in place (see :meth:`l2_bound_ptrs`)."""
        ws = m.Writable(tensors)
        self.l2_bound_ptrs(*m.describe(ws.work), lam, kappa, steps, bound, mu, warmup)
        ws.commit()

    def l2_bound_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], lam: Tensor, kappa: Tensor,
                      steps: Tensor, bound: KernelCoef, mu: KernelCoef, warmup: KernelCoef) -> None:
        """One CPR update after a step (csrc/common/kernels_api.h) on a list
        already described and checked, in place: the params, their
        multipliers ``lam`` and bounds ``kappa`` (float64) and step counts
        ``steps`` (int64), one entry per tensor, contiguous, on its device."""
        dev, n = lam.device, len(ptrs)
        keep, *at = self._at(dev, numels)
        self._fn("l2_bound")(ptrs, numels, codes, lam.data_ptr(), kappa.data_ptr(), steps.data_ptr(),
                             *(m.coef(c, dev, n) for c in (bound, mu, warmup)), *at)

    # ---- selection ------------------------------------------------------------------
    def selects(self) -> bool:
        """Whether this build has a selection kernel (``kth_abs``; every
        compiled build: without one, ``kth_abs`` runs torch's)."""
        return self._has("kth_abs")

    def kth_abs(self, tensors: List[Tensor], k: List[int], closest: bool = False) -> Tensor:
        if not self.selects():  # torch's selection (kthvalue), on the tensors' device
            return torch_ref.kth_abs(tensors, k, closest)
        ws = m.dense_list(tensors)
        out = torch.empty(len(ws), dtype=torch.float64, device=ws[0].device)
        self.kth_abs_ptrs(*m.describe(ws), k, closest, out)
        return out

    def kth_abs_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], k: List[int], closest: bool,
                     out: Tensor) -> None:
        """kth_abs on a list already described and checked (a build that
        ``selects``), into ``out`` (float64, one per tensor, on the tensors'
        device)."""
        n = len(ptrs)
        keep, *at = self._launch(self, out.device, lambda: self._fn("kth_abs_workspace_bytes")(n))
        self._fn("kth_abs")(ptrs, numels, codes, k, closest, out.data_ptr(), *at)

    def selects_pushes(self) -> bool:
        """Whether this build has :meth:`push_kth` (the CPU build)."""
        return self._has("push_kth")

    def push_kth(self, m_: List[Tensor], v: Optional[List[Tensor]], e: List[float], s: List[float], k: List[int],
                 out: Tensor, w: Optional[List[Tensor]] = None, wd: Optional[List[float]] = None,
                 described: Optional[Tuple[List[int], List[int], List[int]]] = None,
                 dims: Optional[List[int]] = None) -> None:
        """``out[i] <- kth_abs`` (k[i]) of the push of an adaptive step,
        ``m_i / ((sqrt(v_i) + e[i]) * s[i])`` (``m_i / s[i]`` with ``v``
        None), plus ``wd[i] * w_i`` where ``w`` (the weights before the step,
        of a decoupled decay) is given, computed in the tensors' dtype as
        csrc/common/optim_math.h's ``adaptive_push`` and ``decayed_push``,
        without the pushes in memory: the same bits as those torch ops and
        :meth:`kth_abs`. For a build that
        :meth:`selects_pushes`, on plain contiguous CPU tensors of one dtype,
        float32 or float64 (``_validate.plain_cpu``); ``out`` float64, one per
        tensor. ``described``: ``_marshal.plain_list`` of ``m_ + v + w`` (those
        given), where the caller checked them so (their pointers then come
        from it). ``dims`` (group_strength's refresh): each tensor's group
        dimension (normalized); ``out[i]`` is then the k[i]-th smallest L2
        norm of the groups of push i, the same bits as
        :meth:`group_norms` of the pushes, then :meth:`kth_abs`."""
        n = len(m_)
        if described is None:
            (ptrs, numels, codes), vp, wp = (m.plain_description(m_), [] if v is None else m.pointers(v),
                                             [] if w is None else m.pointers(w))
        else:
            every = described[0]
            ptrs, numels, codes = every[:n], described[1][:n], described[2][:n]
            vp = [] if v is None else every[n:2 * n]
            wp = [] if w is None else every[len(every) - n:]
        shapes = ([], [], []) if dims is None else m.group_shapes(m_, dims)
        self._fn("push_kth")(ptrs, numels, codes, vp, e, s, wp, [] if wd is None else wd, k, out.data_ptr(),
                             torch.get_num_threads(), *shapes)

    def fuses_target(self) -> bool:
        """Whether this build has ``target_prox_ptrs`` in one call (the CPU
        build; elsewhere the caller makes the selection and the prox itself)."""
        return self._has("target_prox")

    def target_prox_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int], k: List[int], l1: Tensor,
                         l2: KernelCoef, lr: KernelCoef, nnz: Tensor) -> None:
        """``target_sparsity``'s prox on a list already described and checked
        (a build that ``fuses_target``), in one call: ``l1 <- kth_abs(k,
        closest=True) / lr`` (0 where lr is 0; float64, one per tensor; one ulp
        up where lr * l1 rounds below the selected magnitude, as
        ``pyreg.optim.apply._per_lr``), then the prox with that l1, the counts
        into ``nnz``. The same kernels, and bits, as :meth:`kth_abs_ptrs`, the
        l1 in torch ops and :meth:`prox_ptrs`."""
        dev, n = l1.device, len(ptrs)
        self._fn("target_prox")(ptrs, numels, codes, k, True, l1.data_ptr(), m.coef(l2, dev, n),
                                m.coef(lr, dev, n), nnz.data_ptr(), torch.get_num_threads())

    def fuses_metric_target(self) -> bool:
        """Whether this build has :meth:`metric_target_ptrs` (the CPU build)."""
        return self._has("metric_target")

    def metric_target_ptrs(self, described: Tuple[List[int], List[int], List[int]], n: int, e: List[float],
                           s: List[float], k: List[int], m_: List[float], l2: List[float], l1: Tensor) -> None:
        """``target_sparsity`` in an adaptive optimizer's metric, in one call
        (kernels_api.h's ``metric_target``): ``described`` is
        ``_marshal.plain_list`` of the n params followed by their second
        moments (each of its param's dtype, float32 or float64), checked by
        the caller; per tensor the divisor's ``e`` and ``s``, the count of
        zeros ``k``, the metric's lr ``m_`` and ``l2``; ``l1`` (a plain
        float64 CPU vector) receives each tensor's l1."""
        ptrs, numels, codes = described
        self._fn("metric_target")(ptrs[:n], numels[:n], codes[:n], ptrs[n:], e, s, k, True, m_, l2,
                                  l1.data_ptr(), torch.get_num_threads())

    def per_lrs(self) -> bool:
        """Whether this build has :meth:`per_lr` (the CPU build)."""
        return self._has("per_lr")

    def per_lr(self, tau: Tensor, out: Tensor, lr: KernelCoef) -> None:
        """``out[i] <- l1``, the l1 at which a prox of step size ``lr_i``
        zeroes a weight of magnitude ``tau[i]`` (csrc/common/op_math.h's
        ``per_lr``; the same bits as ``pyreg.optim.apply._per_lr`` in torch
        ops), in one call, for a build that :meth:`per_lrs`: ``tau`` and
        ``out`` contiguous float64 CPU vectors of one size (``out`` may be
        ``tau``), ``lr`` a float or such a vector."""
        n = tau.numel()
        self._fn("per_lr")(tau.data_ptr(), out.data_ptr(), n, m.coef(lr, out.device, n))

    # ---- the group ops -------------------------------------------------------------
    def _group_launch(self, ws: List[Tensor], dims: List[int]):
        """(tensors and their group shapes as pyreg._C takes them, keep-alive,
        where a group op on ``ws`` runs)."""
        desc = (*m.describe(ws), *m.group_shapes(ws, dims))
        keep, *at = self._launch(self, ws[0].device, lambda: self._fn("group_workspace_bytes")(*desc))
        return desc, keep, at

    def group_norms(self, tensors: List[Tensor], dims: List[int]) -> Tensor:
        ws = m.dense_list(tensors)
        rd = result_dtype(ws)
        desc, keep, at = self._group_launch(ws, dims)
        norms = torch.empty(sum(desc[4]), dtype=rd, device=ws[0].device)
        self._fn("group_norms")(*desc, norms.data_ptr(), DTYPE_CODES[rd], *at)
        return norms

    def group_penalty(self, tensors: List[Tensor], dims: List[int], group_l1: KernelCoef) -> Tensor:
        ws = m.dense_list(tensors)
        rd = result_dtype(ws)
        dev, n = ws[0].device, len(ws)
        desc, keep, at = self._group_launch(ws, dims)
        out = torch.empty((), dtype=rd, device=dev)
        self._fn("group_penalty")(*desc, m.coef(group_l1, dev, n), out.data_ptr(), DTYPE_CODES[rd], *at)
        return out

    def add_group_penalty_grad_(self, tensors: List[Tensor], grads: List[Tensor], dims: List[int],
                                group_l1: KernelCoef) -> Tensor:
        ws, gs = m.paired(tensors, grads)
        rd = result_dtype(ws)
        dev, n = ws[0].device, len(ws)
        desc, keep, at = self._group_launch(ws, dims)
        out = torch.empty((), dtype=rd, device=dev)
        self._fn("add_group_penalty_grad")(*desc, m.pointers(gs.work), m.coef(group_l1, dev, n),
                                           out.data_ptr(), DTYPE_CODES[rd], *at)
        gs.commit()
        return out

    def group_prox_(self, tensors: List[Tensor], dims: List[int], l1: KernelCoef, group_l1: KernelCoef,
                    l2: KernelCoef, lr: KernelCoef) -> Tensor:
        ws = m.Writable(tensors)
        dev, n = ws.work[0].device, len(ws.work)
        desc, keep, at = self._group_launch(ws.work, dims)
        nonzero = torch.empty(n, dtype=torch.int64, device=dev)
        self._fn("group_prox")(*desc, *(m.coef(c, dev, n) for c in (l1, group_l1, l2, lr)),
                               nonzero.data_ptr(), *at)
        ws.commit()
        return nonzero

    def group_prox_ptrs(self, ptrs: List[int], numels: List[int], codes: List[int],
                        shapes: Tuple[List[int], List[int], List[int]], l1: KernelCoef, group_l1: KernelCoef,
                        l2: KernelCoef, lr: KernelCoef, nonzero: Tensor) -> None:
        """group_prox_ on a list already described and checked, with its group
        shapes (``_marshal.group_shapes``); the counts go to ``nonzero``
        (int64, one per tensor, on the tensors' device)."""
        dev, n = nonzero.device, len(ptrs)
        desc = (ptrs, numels, codes, *shapes)
        keep, *at = self._launch(self, dev, lambda: self._fn("group_workspace_bytes")(*desc))
        self._fn("group_prox")(*desc, *(m.coef(c, dev, n) for c in (l1, group_l1, l2, lr)), nonzero.data_ptr(), *at)

    def max_norm_(self, tensors: List[Tensor], dims: List[int], max_value: KernelCoef) -> Tensor:
        ws = m.Writable(tensors)
        dev, n = ws.work[0].device, len(ws.work)
        desc, keep, at = self._group_launch(ws.work, dims)
        clipped = torch.empty(n, dtype=torch.int64, device=dev)
        self._fn("max_norm")(*desc, m.coef(max_value, dev, n), clipped.data_ptr(), *at)
        ws.commit()
        return clipped

    # ---- the fused optimizer step ------------------------------------------------
    def optim_step(self, algo: int, params: List[Tensor], grads: List[Tensor], s1: List[Tensor],
                   s2: List[Tensor], s3: List[Tensor], steps: List[Tensor], group: List[int],
                   fresh: List[int], hyper: Tensor, *, decoupled: bool, amsgrad: bool, maximize: bool,
                   nesterov: bool, prox: int, centered: bool = False, grad_scale: Optional[Tensor] = None,
                   found_inf: Optional[Tensor] = None, ticket: Optional[Tensor] = None) -> None:
        """See torch_ref.optim_step. The caller guarantees what the kernels
        assume: every grad and state buffer dense and laid out like its param
        (same dtype and strides), step counters float32 or float64 scalars and
        ``hyper`` a contiguous float64 (groups, len(torch_ref.HYPER)) tensor, all on the params'
        device, and grad_scale/found_inf float32 scalars there.

        ``ticket`` (the CUDA builds; the CPU's ignore it): an int32 tensor of
        one zero on the params' device that the kernel leaves zero, kept by
        the caller across steps (``_marshal.step_ticket``); without one, a zeroed
        one is made for the call.

        Returns False, having done nothing, where a param or grad has no
        memory (a torch ZeroTensor, which autograd may hand over as a grad of
        zeros): the caller steps that list otherwise (the spec). True once
        the kernels ran."""
        desc = m.describe(params)
        gptrs = m.pointers(grads)
        if (0 in gptrs or 0 in desc[0]) and (m.memoryless(grads, gptrs) or m.memoryless(params, desc[0])):
            return False
        step_dtype = DTYPE_CODES[steps[0].dtype] if steps else 0
        keep, *at = self._launch(self, params[0].device, lambda: 0)
        ptr = m.pointers
        if self._launch is cpu_launch:  # the CPU kernels have no ticket
            ticket_ptr = 0
        else:
            if ticket is None:
                ticket = m.step_ticket(params[0].device) if params else None
            ticket_ptr = 0 if ticket is None else ticket.data_ptr()
        self._fn("optim_step")(*desc, gptrs, ptr(s1), ptr(s2), ptr(s3), ptr(steps), group, fresh,
                               hyper.shape[0], hyper.data_ptr(), algo, step_dtype, decoupled, amsgrad,
                               maximize, nesterov, centered, prox,
                               0 if grad_scale is None else grad_scale.data_ptr(),
                               0 if found_inf is None else found_inf.data_ptr(), ticket_ptr, *at)
        return True
