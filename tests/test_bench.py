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


def _run(out_dir, device, extra=()):
    argv = ["--quick", "--shapes", "mlp", "--device", device, "--repeats", "1", "--out", str(out_dir),
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
    assert stem.endswith("-quick-smoke") and os.path.basename(stem).startswith(device + "-")
    meta = res["meta"]
    assert meta["device"] == device and meta["quick"] and meta["torch"] == torch.__version__
    assert meta["threads"] >= 1 and meta["dtype"] == "float32"
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(ALL_OPS)
    for op in ALL_OPS:
        got = {r["peer"] for r in rows if r["op"] == op}
        want = set(peers.OPS[op].peers) | ({"roofline", "copy"} if op != "adamw_step" else set())
        assert got == want, (op, got)
    for r in rows:
        if r["peer"] in ("roofline", "copy") or (r["op"] == "adamw_step" and r["peer"] == "bare"):
            assert r["check"] == "n/a"
        else:  # every peer, the compiled loop included, ran and matched pyreg
            assert r["check"] == "pass", r
        assert r["ms"] is not None and r["ms"] > 0 and math.isfinite(r["ms"]), r
        if r["op"] != "adamw_step":
            assert r["gbps"] > 0 and r["pct_copy"] > 0
        if r["peer"] not in ("roofline", "copy"):
            assert r["peak_extra_mb"] is not None and r["peak_extra_mb"] >= 0, r
    compiled = [r for r in rows if r["peer"] == "compile"]
    assert compiled and all(r["compile_s"] is not None for r in compiled)
    assert [r["peer"] for r in rows if r["op"] == "prox_" and r["pct_roofline"] == 100.0] == ["roofline"]
    with open(stem + ".md") as f:
        md = f.read()
    for word in ALL_OPS + ["pyreg", "loop", "foreach", "compile", "roofline", "copy", "% roofline"]:
        assert word in md
    assert "FAIL" not in md
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


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
    # Every peer, the roofline and the copy captured and replayed; the checks
    # (eager, before capture) all pass; the optimizer step is left out.
    stem, res = _run(tmp_path, "cuda", ["--cuda-graphs"])
    assert stem.endswith("-quick-cuda-graphs-smoke") and res["meta"]["cuda_graphs"]
    rows = res["rows"]
    assert {r["op"] for r in rows} == set(ALL_OPS) - {"adamw_step"}
    for r in rows:
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["check"] in ("pass", "n/a"), r
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
    assert args.shapes == shapes.ORDER and args.ops == peers.OP_ORDER


def test_cli_routes_to_bench(capsys):
    from pyreg import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
