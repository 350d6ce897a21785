"""pyreg under torch.distributed: DDP and FSDP2 (DTensor params), on CPU with gloo.

Each test spawns its processes once (imports dominate the cost) and runs all
of its checks inside them; every rank compares against an unsharded
single-process run that it computes itself. Bounded time: a run that does
not finish within TIMEOUT seconds is killed and fails.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pyreg

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

TIMEOUT = 150  # seconds per spawned run
STEPS = 5
BATCH = 12  # divisible by 2 and 3: each rank gets an equal slice
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: only summation order differs


# --------------------------------------------------------------------------
# Shared setup
# --------------------------------------------------------------------------
class Net(nn.Module):
    """a.weight (5, 4): 5 rows split unevenly (3+2 over 2 ranks, 2+2+1 over 3);
    b.weight (2, 5): 2 rows, so over 3 ranks the last rank's shard is empty;
    c.weight (3, 2); biases are left out by param_groups' default rule."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)
        self.c = nn.Linear(2, 3, bias=False)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 4, generator=g, dtype=torch.float64), torch.randn(BATCH, 3, generator=g, dtype=torch.float64)


def _batch(step, rank, world):
    x, y = _data(step)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


VARIANTS = {
    # name: (mode, inner optimizer, l1, l2, use pyreg.penalty in the loss instead)
    "sgd_proximal": ("proximal", lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), 0.05, 0.01, False),
    "adamw_gradient": ("gradient", lambda g: torch.optim.AdamW(g, lr=0.02), 0.02, 0.05, False),
    "loss_penalty": (None, lambda g: torch.optim.SGD(g, lr=0.1), 0.03, 0.02, True),
    # pyreg's fused optimizer: on DTensors it takes torch's own step, then prox_ on the shards
    "fused_adamw": ("fused", lambda g: pyreg.optim.AdamW(g, lr=0.02), 0.02, 0.01, False),
}


def _make(model, variant):
    mode, make_inner, l1, l2, in_loss = VARIANTS[variant]
    groups = pyreg.param_groups(model, l1=l1, l2=l2, overrides={"b": {"l1": 2 * l1}})
    inner = make_inner(groups)
    return inner if in_loss or mode == "fused" else pyreg.Regularized(inner, mode=mode)


def _reg_weights(model):
    return [model.a.weight, model.b.weight, model.c.weight]


def _step(model, opt, x, y, variant):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    if VARIANTS[variant][4]:
        l1, l2 = VARIANTS[variant][2:4]
        loss = loss + pyreg.penalty(_reg_weights(model), l1=[l1, 2 * l1, l1], l2=l2)
    loss.backward()
    opt.step()


def _reference(variant, steps=STEPS):
    model = Net().double()
    opt = _make(model, variant)
    for s in range(steps):
        _step(model, opt, *_data(s), variant)
    return model, opt


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_same_model(model, ref):
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        full = _full(p.detach())
        torch.testing.assert_close(full, r.detach(), **TOL, msg=lambda m: f"{n}: {m}")
        assert torch.equal(full == 0, r.detach() == 0), n


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


_DONE_FILE = None  # in a worker: the file that records that all its checks passed


def _checks_passed():
    """Called by a worker once every check of its rank passed, before its
    teardown (destroy_process_group and freeing DDP/FSDP objects)."""
    open(_DONE_FILE, "w").close()


def _worker_main(rank, fn, world, done_dir, *args):
    global _DONE_FILE
    _DONE_FILE = os.path.join(done_dir, f"rank{rank}")
    fn(rank, world, *args)
    if not os.path.exists(_DONE_FILE):
        raise RuntimeError("the worker returned without recording that its checks passed")


def _spawn(fn, world, *args):
    """Runs fn(rank, world, *args) on `world` processes; fails on any failed
    check, or when they do not finish within TIMEOUT seconds.

    Each worker records that all its checks passed (_checks_passed) before its
    teardown. Once every rank has, a worker that then dies by a signal or hangs
    does not fail the test; it is killed. Both come from torch's gloo teardown,
    after all of the test's work, on a 2-core machine: about one run in seven,
    an abort in the interpreter's teardown ("terminate called without an active
    exception"); now and then, a deadlock when the last reference to the
    process group (held by DDP's Reducer) is dropped with the GIL held while a
    gloo thread still needs the GIL to free a finished work item. Exiting
    early with os._exit instead made the other rank hang now and then (its
    last messages lost)."""
    done_dir = tempfile.mkdtemp(prefix="pyreg-dist-")
    rank_done = lambda r: os.path.exists(os.path.join(done_dir, f"rank{r}"))  # noqa: E731  all its checks passed
    try:
        ctx = mp.start_processes(_worker_main, args=(fn, world, done_dir, *args), nprocs=world,
                                 join=False, start_method="spawn")
        procs = ctx.processes
        deadline = time.monotonic() + TIMEOUT
        # Wait for every process, not just the first to die: a rank that ends
        # (even by a teardown crash) must not get the others killed while they
        # still check. A rank that ends before its checks passed ends the wait
        # (its peers may then block in a collective).
        while any(p.is_alive() for p in procs) and not all(map(rank_done, range(world))):
            if any(not p.is_alive() and not rank_done(r) for r, p in enumerate(procs)):
                break
            if time.monotonic() > deadline:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"distributed run did not finish within {TIMEOUT} s")
            time.sleep(0.1)
        if all(map(rank_done, range(world))):  # every check of every rank passed
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
            return
        ctx.join()  # raises the failed rank's error (and stops the others)
        pytest.fail("distributed workers exited without finishing their checks")
    finally:
        shutil.rmtree(done_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file):
    _init(rank, world, init_file)
    try:
        for variant in ("sgd_proximal", "adamw_gradient"):
            model = nn.parallel.DistributedDataParallel(Net().double())
            opt = _make(model.module, variant)
            for s in range(STEPS):
                _step(model, opt, *_batch(s, rank, world), variant)
            ref, ref_opt = _reference(variant)
            _assert_same_model(model.module, ref)
            torch.testing.assert_close(opt.penalty, ref_opt.penalty, **TOL)
            assert (model.module.a.weight == 0).any() or variant != "sgd_proximal"
        _checks_passed()
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    _spawn(_ddp_worker, 2, str(tmp_path / "init"))


# --------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------
def _shard(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.a)
    fully_shard(model.b)
    fully_shard(model)
    return model


#: The collective pyreg's ops on DTensors make, once per call (torch's newer name where it has it).
_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class _CountCollectives:
    """Counts calls of the collectives pyreg.distributed may use."""

    NAMES = tuple(n for n in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor",
                            "broadcast") if hasattr(dist, n))

    def __enter__(self):
        self.calls = []
        self.saved = {n: getattr(dist, n) for n in self.NAMES}
        for n, f in self.saved.items():
            setattr(dist, n, (lambda n, f: lambda *a, **k: (self.calls.append(n), f(*a, **k))[1])(n, f))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


def _check_ops_global(model, ref):
    """weight_stats / penalty / add_penalty_grad_ / prox_ on the DTensor params
    give the global values, with one collective per call."""
    from torch.distributed.tensor import DTensor

    ws = list(model.parameters())
    rs = list(ref.parameters())
    assert all(isinstance(p, DTensor) for p in ws)
    n = len(ws)
    l1 = torch.linspace(0.1, 0.5, n, dtype=torch.float64)
    with _CountCollectives() as cc:
        st = pyreg.weight_stats(ws)
    assert cc.calls == [_GATHER], cc.calls
    want = pyreg.weight_stats(rs)
    for got, exp in zip(st, want):
        torch.testing.assert_close(got, exp, **TOL)

    with _CountCollectives() as cc:
        pen = pyreg.penalty(ws, l1=l1, l2=0.3)
    assert cc.calls == [_GATHER], cc.calls
    torch.testing.assert_close(pen, pyreg.penalty(rs, l1=l1, l2=0.3), **TOL)

    # Differentiable: grads are DTensors of the params' placements, equal to the
    # shards of the full gradient.
    wcopy = [nn.Parameter(p.detach().clone()) for p in ws]
    rcopy = [nn.Parameter(r.detach().clone()) for r in rs]
    pyreg.penalty(wcopy, l1=l1, l2=0.3).backward()
    pyreg.penalty(rcopy, l1=l1, l2=0.3).backward()
    for w, r in zip(wcopy, rcopy):
        assert isinstance(w.grad, DTensor) and w.grad.placements == w.placements
        torch.testing.assert_close(w.grad.full_tensor(), r.grad, **TOL)

    # add_penalty_grad_: local in place, returns the global penalty.
    gw = [p.detach().clone() for p in ws]
    gr = [r.detach().clone() for r in rs]
    for g in gw:
        g.to_local().zero_()
    for g in gr:
        g.zero_()
    with _CountCollectives() as cc:
        v = pyreg.add_penalty_grad_(ws, gw, l1=l1, l2=0.3)
    assert cc.calls == [_GATHER], cc.calls
    torch.testing.assert_close(v, pyreg.add_penalty_grad_(rs, gr, l1=l1, l2=0.3), **TOL)
    for a, b in zip(gw, gr):
        torch.testing.assert_close(a.full_tensor(), b, **TOL)

    # prox_: local in place, returns the global nonzero counts.
    pw = [p.detach().clone() for p in ws]
    pr = [r.detach().clone() for r in rs]
    with _CountCollectives() as cc:
        nnz = pyreg.prox_(pw, l1=l1, l2=0.3, lr=0.5)
    assert cc.calls == [_GATHER], cc.calls
    assert torch.equal(nnz, pyreg.prox_(pr, l1=l1, l2=0.3, lr=0.5))
    for a, b in zip(pw, pr):
        torch.testing.assert_close(a.full_tensor(), b, **TOL)
    assert nnz.sum() < sum(p.numel() for p in pr)  # some exact zeros


def _check_dcp_round_trip(model, opt, variant, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)

    model2 = _shard(Net(seed=7).double())
    opt2 = _make(model2, variant)
    opt2.param_groups[0]["l1"] = 123.0  # overwritten by the load
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])

    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), n
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        assert (g1["l1"], g1["l2"], g1["lr"]) == (g2["l1"], g2["l2"], g2["lr"])
    for p, q in zip(model.parameters(), model2.parameters()):
        s1, s2 = opt.state[p], opt2.state[q]
        assert s1.keys() == s2.keys()
        for k in s1:
            a, b = (_full(s1[k]), _full(s2[k]))
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), k
    # Training on from the loaded state matches training on from the original.
    x, y = _batch(STEPS, dist.get_rank(), dist.get_world_size())
    _step(model, opt, x, y, variant)
    _step(model2, opt2, x, y, variant)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())


def _fsdp_worker(rank, world, init_file, ckpt_dir):
    _init(rank, world, init_file)
    try:
        for variant in VARIANTS:
            model = _shard(Net().double())
            opt = _make(model, variant)
            for s in range(STEPS):
                _step(model, opt, *_batch(s, rank, world), variant)
            ref, ref_opt = _reference(variant)
            _assert_same_model(model, ref)
            if isinstance(opt, pyreg.Regularized):
                # Observability on sharded params: global values.
                torch.testing.assert_close(opt.penalty, ref_opt.penalty, **TOL)
                with warnings.catch_warnings(record=True) as rec:  # (no deprecated collective)
                    warnings.simplefilter("always")
                    st, rst = opt.stats(), ref_opt.stats()
                assert not [r for r in rec if issubclass(r.category, (FutureWarning, DeprecationWarning))], \
                    [str(r.message) for r in rec]
                assert st.names == rst.names
                for f in ("l1", "l2", "linf", "nnz", "numel"):
                    torch.testing.assert_close(getattr(st, f), getattr(rst, f), **TOL)
                torch.testing.assert_close(opt.sparsity().overall, ref_opt.sparsity().overall)
            if variant == "sgd_proximal":
                assert (ref.a.weight == 0).any()  # L1 made exact zeros, matched above
                _check_ops_global(model, ref)
                _check_dcp_round_trip(model, opt, variant, os.path.join(ckpt_dir, variant))
        # The structured regularizers need full tensors: a clear error at
        # construction, before any step, and from the ops themselves.
        model = _shard(Net().double())
        before = [p.to_local().clone() for p in model.parameters()]
        for extra in ({"group_l1": 0.1}, {"max_norm": 1.0}):
            with pytest.raises(TypeError, match="is a DTensor"):
                pyreg.Regularized(torch.optim.SGD(
                    pyreg.param_groups(model, l1=0.1, overrides={"a": extra}), lr=0.1))
        with pytest.raises(TypeError, match="is a DTensor"):  # (refused at the first step, before)
            pyreg.optim.Adam(pyreg.param_groups(model, l1=0.05), lr=0.01, preconditioned=True)
        with pytest.raises(TypeError, match="does not take DTensors"):
            pyreg.max_norm_([model.a.weight], 1.0)
        with pytest.raises(TypeError, match="does not take DTensors"):
            pyreg.prox_([model.a.weight], 0.1, ref=[model.a.weight.detach()])
        assert all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        # A rank whose shard is empty really exists at world size 3.
        if world == 3:
            model = _shard(Net().double())
            assert model.b.weight.to_local().numel() == (0 if rank == 2 else 5)
        _checks_passed()
    finally:
        dist.destroy_process_group()


def _shard_on_two_meshes(model):
    """a on one device mesh, b on another (the same ranks, a named one), the rest on the first."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    one, other = init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    fully_shard(model.a, mesh=one)
    fully_shard(model.b, mesh=other)
    fully_shard(model, mesh=one)
    return model


def _fsdp_meshes_and_scaler_worker(rank, world, init_file):
    _init(rank, world, init_file)
    try:
        # Parameters sharded on two meshes: the prox runs per mesh (a call takes one mesh's DTensors);
        # gradient mode then checks each bucket's grads apart from its shards before the first writes.
        for variant in ("sgd_proximal", "fused_adamw", "adamw_gradient"):
            model = _shard_on_two_meshes(Net().double())
            opt = _make(model, variant)
            for s in range(STEPS):
                _step(model, opt, *_batch(s, rank, world), variant)
            _assert_same_model(model, _reference(variant)[0])
        # GradScaler: the fused optimizers take its scalars; on DTensors, which take torch's own step,
        # the grads are unscaled and an overflow skips the step, as for torch's optimizers.
        for variant in ("fused_adamw", "sgd_proximal"):
            model = _shard(Net().double())
            opt = _make(model, variant)
            scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
            for s in range(STEPS):
                x, y = _batch(s, rank, world)
                opt.zero_grad()
                scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
                if s == 2:  # an overflow: the step is skipped
                    model.a.weight.grad.to_local().view(-1)[0] = float("inf")
                scaler.step(opt)
                scaler.update()
            ref = Net().double()
            ref_opt = _make(ref, variant)
            for s in range(STEPS):
                if s != 2:
                    _step(ref, ref_opt, *_data(s), variant)
            _assert_same_model(model, ref)
        _checks_passed()
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_two_meshes_and_with_grad_scaler(tmp_path):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("no torch.amp.GradScaler")
    _spawn(_fsdp_meshes_and_scaler_worker, 2, str(tmp_path / "init"))


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_matches_unsharded(world, tmp_path):
    _spawn(_fsdp_worker, world, str(tmp_path / "init"), str(tmp_path / "ckpt"))


@pytest.mark.parametrize("lr", [0.0, torch.tensor(0.0)], ids=["float", "tensor"])
@pytest.mark.parametrize("key", [dict(max_norm=0.1), dict(l2_bound=0.01)], ids=["max_norm", "l2_bound"])
@pytest.mark.parametrize("family", ["fused", "Regularized"])
def test_get_state_dict_before_the_first_step_changes_no_weight(family, key, lr):
    """torch.distributed.checkpoint's get_optimizer_state_dict, on an optimizer
    without state, makes one step with zero grads and every lr set to 0 (as
    torch's optimizers change nothing then): max_norm and l2_bound, which do
    not scale with lr, do not act at such a step (the checkpoint would hold
    a model the save changed, and l2_bound's count one step ahead); a step
    where one group's lr is not 0 applies them."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    m = nn.Linear(3, 7)
    before = m.weight.detach().clone()

    def make(groups):
        if family == "fused":
            return pyreg.optim.AdamW(groups, lr=0.1)
        return pyreg.Regularized(torch.optim.AdamW(groups, lr=0.1))

    opt = make([dict(params=[m.weight], **key)])
    get_optimizer_state_dict(m, opt)
    assert torch.equal(m.weight.detach(), before)
    assert not any(k.startswith("l2_bound") for k in opt.state[m.weight])
    opt.param_groups[0]["lr"] = lr  # by hand: nothing either
    m.weight.grad = torch.zeros_like(m.weight)
    opt.step()
    assert torch.equal(m.weight.detach(), before)
    opt.param_groups[0]["lr"] = 1e-3
    opt.step()
    assert not torch.equal(m.weight.detach(), before)
