"""Smoke test of the benchmark suite (``pyreg bench``): it runs end to end in
its smallest mode and writes complete, correct output. No timing assertions."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pyreg import bench
from pyreg.bench import peers, shapes

ALL_OPS = list(peers.OP_ORDER)
GROUP_OPS = [op for op in ALL_OPS if peers.OPS[op].matrices_only]


def _run(out_dir, device, extra=()):
    argv = ["--quick", "--compile", "--shapes", "mlp", "--device", device, "--repeats", "1", "--out", str(out_dir),
            "--tag", "smoke", *extra]
    assert bench.main(argv) == 0
    stems = [f[:-5] for f in os.listdir(out_dir) if f.endswith(".json")]
    assert len(stems) == 1, os.listdir(out_dir)
    stem = os.path.join(out_dir, stems[0])
    with open(stem + ".json") as f:
        return stem, json.load(f)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench"), "cpu")


def _check_result(stem, res, device):
    # on CUDA the optimizer step is also timed as CUDA-graph replays ("step-graph")
    ops = ALL_OPS + (["step-graph"] if device == "cuda" else [])
    assert stem.endswith("-quick-smoke") and os.path.basename(stem).startswith(device + "-")
    meta = res["meta"]
    assert meta["device"] == device and meta["quick"] and meta["torch"] == torch.__version__
    assert meta["threads"] >= 1 and meta["dtype"] == "float32"
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(ops)
    for op in ops:
        got = {r["peer"] for r in rows if r["op"] == op}
        want = set(peers.OPS[op.replace("-graph", "")].peers) | {"roofline", "copy"}
        assert got == want, (op, got)
    for r in rows:
        if r["peer"] in ("roofline", "copy") or (r["op"].startswith("step") and r["peer"] == "bare"):
            assert r["check"] == "n/a"
        else:  # every peer, the compiled loop included, ran and matched pyreg
            assert r["check"] == "pass", r
        assert r["ms"] is not None and r["ms"] > 0 and math.isfinite(r["ms"]), r
        assert r["gbps"] > 0 and r["pct_copy"] > 0
        if r["peer"] not in ("roofline", "copy"):
            assert r["peak_extra_mb"] is not None and r["peak_extra_mb"] >= 0, r
    compiled = [r for r in rows if r["peer"] == "compile"]
    assert compiled and all(r["compile_s"] is not None for r in compiled)
    assert [r["peer"] for r in rows if r["op"] == "prox_" and r["pct_roofline"] == 100.0] == ["roofline"]
    # the group ops: 12 bytes per fp32 element (2 reads, 1 write), the two-pass roofline,
    # over the set's tensors of 2+ dims only
    assert GROUP_OPS == ["group_prox_", "max_norm_"]
    group_meta = res["shape_sets"]["mlp"]["group_ops"]
    assert group_meta["tensors"] == 3 and group_meta["numel"] == 784 * 512 + 512 * 512 + 512 * 10
    for op in GROUP_OPS:
        roof = [r for r in rows if r["op"] == op and r["peer"] == "roofline"]
        assert len(roof) == 1 and "a.sum(), then a.mul_(c)" in roof[0]["what"] and "12 B/elem" in roof[0]["what"]
        p = next(r for r in rows if r["op"] == op and r["peer"] == "pyreg")
        assert p["gbps"] == pytest.approx(12 * group_meta["numel"] / (p["ms"] * 1e6))
    _check_step_rows(res, ops)
    with open(stem + ".md") as f:
        md = f.read()
    for word in ALL_OPS + ["pyreg", "loop", "foreach", "compile", "roofline", "copy", "% roofline"]:
        assert word in md
    assert "FAIL" not in md
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_step_rows(res, ops):
    # The optimizer step: 28 bytes per fp32 element (read p, g, m, v; write p,
    # m, v), the flat-buffer AdamW step as its roofline, pyreg's speedup against
    # every peer, and the check: pyreg's fused AdamW equals Regularized(torch
    # AdamW) after one step, with the same exact zeros (and some zeros to compare).
    numel = res["shape_sets"]["mlp"]["numel"]
    assert res["shape_sets"]["mlp"]["step_rotation"] >= 1
    for op in [o for o in ops if o.startswith("step")]:
        rs = {r["peer"]: r for r in res["rows"] if r["op"] == op}
        assert set(rs) == set(peers.STEP_PEERS) | {"roofline", "copy"}
        assert "28 B/elem" in rs["roofline"]["what"] and "flat" in rs["roofline"]["what"]
        assert rs["roofline"]["pct_roofline"] == 100.0
        p = rs["pyreg"]
        assert p["gbps"] == pytest.approx(28 * numel / (p["ms"] * 1e6))
        assert p["speedup"] == 1.0
        for peer in ("regularized", "bare", "loop", "roofline", "copy"):
            assert rs[peer]["speedup"] == pytest.approx(rs[peer]["ms"] / p["ms"])
        for peer in ("pyreg", "regularized", "loop"):
            detail = rs[peer]["check_detail"]
            assert "same zero pattern" in detail and "differs" not in detail, detail
            assert int(detail.split(" exact zeros")[0].split()[-1].replace(",", "")) > 0, detail
        assert "Regularized" in p["check_detail"] and "pyreg.optim.AdamW" in p["what"]
        assert "fused" in rs["regularized"]["what"] and "no L1" in rs["bare"]["what"]


def test_step_check_catches_a_wrong_result():
    # The step's check: the optimizer tolerance, and the same exact zeros except
    # where the other value is within rounding of the threshold (zero_slack).
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(50, 20, generator=g).mul_(0.02), torch.randn(20, generator=g).mul_(0.02)]
    ref[0][0, :5] = 0.0
    ok, detail = peers.compare_params(ref, [t.clone() for t in ref], torch.float32, 1e-9)
    assert ok and "5 exact zeros, same zero pattern" in detail
    near = [t.clone() for t in ref]
    near[0][0, 0] = 1e-10  # within rounding of the threshold: a zero on the other side is allowed
    assert peers.compare_params(ref, near, torch.float32, 1e-9)[0]
    for bad in ([t.clone() for t in ref], [t.mul(1.001) for t in ref]):
        bad[0][0, 1] = 1e-6  # a zero missed: a weight left above rounding
        ok, detail = peers.compare_params(ref, bad, torch.float32, 1e-9)
        assert not ok and "beyond rounding" in detail, detail
    off = [t.mul(1.001) for t in ref]  # no zero differs, values off by 1e-3 relative
    assert not peers.compare_params(ref, off, torch.float32, 1e-9)[0]


def test_quick_cpu_run_writes_complete_checked_output(cpu_run):
    stem, res = cpu_run
    _check_result(stem, res, "cpu")


def test_quick_run_says_what_it_skipped(cpu_run):
    _, res = cpu_run
    assert any("--quick" in n for n in res["notes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_cuda_run(tmp_path):
    stem, res = _run(tmp_path, "cuda")
    _check_result(stem, res, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_cuda_graphs_run(tmp_path):
    # Every peer, the roofline and the copy captured and replayed (the optimizer
    # steps after warm-up steps); the checks (eager, before capture) all pass.
    stem, res = _run(tmp_path, "cuda", ["--cuda-graphs"])
    assert stem.endswith("-quick-cuda-graphs-smoke") and res["meta"]["cuda_graphs"]
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(ALL_OPS)
    for r in rows:
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["check"] in ("pass", "n/a"), r
    _check_step_rows(res, ["step"])
    assert any("--cuda-graphs" in n for n in res["notes"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_graphs_without_cuda_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--cuda-graphs", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--cuda-graphs: torch has no usable CUDA device" in capsys.readouterr().err


def test_shape_sets_match_the_models():
    assert shapes.get("mlp").numel == 669_706
    assert shapes.get("resnet50").numel == 25_557_032 and shapes.get("resnet50").count == 161
    vit = shapes.get("vit-tiny")  # timm vit_tiny_patch16_224: 5,717,416 parameters
    assert vit.numel == 5_717_416 and vit.count == 152
    assert dict(vit.shapes)["blocks.11.mlp.fc1.weight"] == (768, 192)
    gpt2 = shapes.get("gpt2")
    assert gpt2.numel == 124_439_808 and gpt2.count == 148
    assert dict(gpt2.shapes)["transformer.wte.weight"] == (50257, 768)
    assert dict(gpt2.shapes)["transformer.wpe.weight"] == (1024, 768)
    assert 1.2e9 < shapes.get("gpt-1.3b").numel < 1.4e9 and shapes.get("gpt-1.3b").gpu_only
    # the LSTM and MLP sets are what torch.nn builds
    lstm = torch.nn.LSTM(256, 512, num_layers=2, device="meta")
    want = [(n, tuple(p.shape)) for n, p in lstm.named_parameters()]
    assert [(n.split(".", 1)[1], s) for n, s in shapes.get("lstm").shapes if n.startswith("rnn.")] == want


def _group_data(name, dtype=torch.float32):
    """The group ops' tensors of a shape set, every dimension capped at 96 (the
    set's layouts, dims and tensor count, small enough for a test), as the
    suite makes them: N(0, 0.02^2)."""
    sset = shapes.matrices(shapes.get(name))
    shp = [tuple(min(n, 96) for n in s) for _, s in sset.shapes]
    g = torch.Generator().manual_seed(3)
    return shp, [torch.randn(s, generator=g, dtype=dtype).mul_(peers.W_SCALE) for s in shp]


def _coefs(shp, strong):
    """The suite's coefficients; ``strong``: group_prox_'s threshold lr*l1 at the
    median group norm along dim 1, so that about half of the groups are zeroed
    (a stricter test of the peers' formulas than the realistic step's tiny
    threshold; run in float64, since near the threshold the factor 1 - t/n
    magnifies the float32 rounding of a peer's norm)."""
    c = peers.Coefs(len(shp), torch.device("cpu"), shp)
    if strong:
        c.l1 = [peers.median_group_norm(s, peers.GROUP_DIM["group_prox_"]) / peers.LR for s in shp]
        c.thresholds = [peers.LR * a for a in c.l1]
        c.l1_t = torch.tensor(c.l1, dtype=torch.float64)
    return c


def _run_peer(op, peer, c, ws):
    d = {"ws": [w.clone() for w in ws]}
    out = peers.op_fn(op, peer, c)(d)
    return d["ws"], out


@pytest.mark.parametrize("strong", [False, True], ids=["bench-fp32", "strong-fp64"])
@pytest.mark.parametrize("op", ["group_prox_", "max_norm_"])
@pytest.mark.parametrize("name", shapes.ORDER)
def test_group_op_peers_agree_with_pyreg_on_every_shape_set(name, op, strong):
    # Every shape set has rows for the group ops (its tensors of 2+ dims), and
    # the loop and foreach peers compute pyreg's result on that set's layouts:
    # group_prox_ along dim 1, max_norm_ along dim 0.
    dtype = torch.float64 if strong else torch.float32
    shp, ws = _group_data(name, dtype)
    assert ws and all(len(s) >= 2 for s in shp)
    c = _coefs(shp, strong)
    ref, counts = _run_peer(op, "pyreg", c, ws)
    dim = peers.GROUP_DIM[op]
    groups = sum(s[dim] for s in shp)
    zero_groups = sum(int((torch.movedim(w, dim, 0).flatten(1) == 0).all(1).sum()) for w in ref)
    if op == "max_norm_":  # max_value = the median group norm: about half of the groups are clipped
        assert 0.3 * groups < int(counts.sum()) < 0.7 * groups, (int(counts.sum()), groups)
    elif strong:  # about half of the groups zeroed, and counted
        assert 0.3 * groups < zero_groups < 0.7 * groups and int(counts.sum()) == groups - zero_groups
    else:  # the step's threshold lr*l1 is far below the init group norms: no group is zeroed
        assert zero_groups == 0 and int(counts.sum()) == groups
    # the op changed every tensor of more than a few groups
    assert all(not torch.equal(a, b) for a, b, s in zip(ref, ws, shp) if s[dim] > 8)
    for peer in ("loop", "foreach"):
        got, _ = _run_peer(op, peer, c, ws)
        ok, detail = peers.compare(op, ref, got, dtype)
        assert ok, (peer, detail)
        if op == "group_prox_":
            assert f"same zero pattern ({sum(w.numel() for w in ws):,} elements)" in detail, detail


@pytest.mark.parametrize("op", ["group_prox_", "max_norm_"])
def test_group_op_check_catches_a_wrong_peer(op):
    # The check the suite runs on every peer fails for a peer that groups along
    # the other dimension.
    shp, ws = _group_data("mlp", torch.float64)
    c = _coefs(shp, strong=True)
    ref, _ = _run_peer(op, "pyreg", c, ws)
    wrong = [w.clone() for w in ws]
    peers.loop_of(op)(wrong, [1 - peers.GROUP_DIM[op]] * len(wrong),
                      c.thresholds if op == "group_prox_" else c.max_values)
    assert not peers.compare(op, ref, wrong, torch.float64)[0]


@pytest.mark.parametrize("argv", [["--shapes", "nope"], ["--ops", "prox_,nope"], ["--repeats", "0"],
                                  ["--dtype", "int8"], ["--device", "tpu"], ["--shapes", ""],
                                  ["--tag", "../x"], ["--tag", ""], ["--cuda-graphs", "--device", "cpu"],
                                  ["--cuda-graphs", "--device", "all"]])
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_defaults_parse():
    # argparse runs a string default through its type: a default --tag of ""
    # once made every run without --tag exit with an error.
    args = bench.parser().parse_args([])
    assert args.tag is None and not args.cuda_graphs and not args.quick
    assert bench.plan(args) == {"shapes": shapes.ORDER, "ops": peers.OP_ORDER, "compile": True}


def test_cli_routes_to_bench(capsys):
    from pyreg import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("group", [None, "--group", "--preconditioned"], ids=["", "group", "preconditioned"])
def test_host_step_script_writes_every_row_with_its_base(tmp_path, group):
    """bench/host_step.py (the host cost per step of each new key over the
    same step without it) runs and writes its table: every row, and the
    difference to its base where it has one (``--group``: the group-lasso
    rows; ``--preconditioned``: the prox in Adam's metric)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "host_step.py"
    out = tmp_path / "host"
    subprocess.run([sys.executable, str(script), "--cpu-time", "--rounds", "2", "--steps", "3", "--out", str(out)]
                   + ([group] if group else []), check=True, timeout=300, capture_output=True)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in (tmp_path / "host.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0][0] == "optimizer"
    names = [r[0] for r in rows[1:]]
    want = {None: ("pyreg.optim.AdamW(l1_strength)", 9), "--group": ("Regularized(torch Adam, group_strength)", 5),
            "--preconditioned": ("pyreg.optim.AdamW(target_sparsity, preconditioned)", 3)}[group]
    assert names[0] == "torch Adam" and want[0] in names and len(names) == want[1]
    for i, r in enumerate(rows[1:]):
        assert len(r) == 7 and all(float(x) > 0 for x in r[1:5])
        assert (r[5] in names[:i]) == bool(r[5]) == bool(r[6])  # a base is a row above it
        if r[5]:
            float(r[6])  # its difference, in µs


def test_step_peers_left_out_where_the_gpu_cannot_hold_them(monkeypatch):
    """On a GPU too small for every step peer side by side ((3 per peer + 4)
    buffers of the set's size per rotated copy), the loop, then Regularized,
    are left out, each with the reason, and noted; pyreg and torch's bare
    step always run; nothing is left out where all fit, or on the CPU."""
    from types import SimpleNamespace

    from pyreg.bench.suite import STEP_MEMORY_FRACTION, Suite

    sset = shapes.get("gpt-1.3b")
    buf = sset.numel * 4
    notes = []
    fake = SimpleNamespace(dev=torch.device("cuda"), elsize=4, note_once=notes.append)
    free = {"b": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free["b"], 10 * free["b"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 0)
    fits = lambda n: int(buf * (3 * n + 4) / STEP_MEMORY_FRACTION) + 1  # noqa: E731
    for free_b, left_out in [(fits(4), []), (fits(4) - 2, ["loop"]), (fits(3), ["loop"]),
                             (fits(3) - 2, ["loop", "regularized"]), (fits(2), ["loop", "regularized"]),
                             (buf, ["loop", "regularized"])]:
        free["b"] = free_b
        out = Suite.step_peers_that_do_not_fit(fake, sset, 1)
        assert sorted(out) == sorted(left_out), (free_b, out)
        assert all(v.startswith("not run: the 4 peers side by side need ") and "GiB free on this GPU" in v
                   for v in out.values())
    assert len(notes) == 5 and all("left out" in n for n in notes)
    # two rotated copies need twice the memory
    free["b"] = fits(4)
    assert sorted(Suite.step_peers_that_do_not_fit(fake, sset, 2)) == ["loop", "regularized"]
    fake.dev = torch.device("cpu")
    assert Suite.step_peers_that_do_not_fit(fake, sset, 1) == {}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
def test_the_first_memory_measurement_does_not_count_the_profilers_start():
    """The CPU memory columns come from torch's profiler and the resident
    set around it: the profiler's first use in a process (about 70 MB) is
    not charged to the first call measured. In a fresh process."""
    import subprocess
    import sys

    code = ("import torch\nfrom pyreg.bench.timing import peak_extra_bytes\n"
            "print(peak_extra_bytes(lambda: None, torch.device('cpu'))['rss_bytes'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.split()[-1]) < 8 * 2 ** 20
