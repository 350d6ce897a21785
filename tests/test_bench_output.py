"""The benchmark suite's output for a user: what --quick runs, results kept when
a run is interrupted or killed, the spread and the flags of every figure, the
plot's legends, and check messages that say what they found. No timing
assertions: the flags are tested on synthetic timings."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyreg import bench
from pyreg.bench import peers, report, shapes, suite


# ---------------------------------------------------------------------------
# --quick's plan
# ---------------------------------------------------------------------------
def test_quick_plan_is_small():
    plan = bench.plan(bench.parser().parse_args(["--quick"]))
    assert plan["shapes"] == ["mlp", "lstm"] and not plan["compile"]
    assert plan["ops"] == peers.OP_ORDER  # every op, every peer but torch.compile
    assert sum(shapes.get(s).numel for s in plan["shapes"]) < 10_000_000
    assert max(shapes.get(s).count for s in plan["shapes"]) <= suite.QUICK_COMPILE_MAX_TENSORS
    # what the user names still runs
    plan = bench.plan(bench.parser().parse_args(["--quick", "--compile", "--shapes", "gpt2"]))
    assert plan == {"shapes": ["gpt2"], "ops": peers.OP_ORDER, "compile": True}
    assert not bench.plan(bench.parser().parse_args(["--no-compile"]))["compile"]
    # fewer rotated copies (clones of one) in --quick; the full run keeps its 4x the cache
    s = suite.Suite(torch.device("cpu"), torch.float32, ["mlp"], ["prox_"], True, False, None)
    assert s.rotation(shapes.get("mlp")) <= suite.QUICK_MAX_ROTATION and s.repeats == 5
    full = suite.Suite(torch.device("cpu"), torch.float32, ["mlp"], ["prox_"], False, False, None)
    assert full.rotation(shapes.get("mlp")) == suite.rotation_count(shapes.get("mlp"), torch.float32,
                                                                    full.info["cache_bytes"])


def test_quick_help_says_what_it_skips(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--quick smoke-sized run" in out and "mlp,lstm only" in out and "no torch.compile peer" in out
    assert "--compile with --quick" in out


def test_compile_and_no_compile_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--compile", "--no-compile", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_a_run_with_nothing_to_measure_is_refused_and_writes_nothing(tmp_path, capsys):
    earlier = tmp_path / "kept.json"
    earlier.write_text("{}")
    with pytest.raises(SystemExit) as e:
        bench.main(["--shapes", "gpt-1.3b", "--device", "cpu", "--no-compile", "--out", str(tmp_path)])
    assert e.value.code == 2 and "nothing to measure on cpu" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["kept.json"]


@pytest.mark.parametrize("extra", [["--dtype", "float64"], ["--ops", "prox_"], ["--repeats", "3"],
                                   ["--shapes", "mlp"], ["--no-compile"]])
def test_compact_refuses_the_options_it_does_not_take(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as e:
        bench.main(["--compact", "--quick", "--device", "cpu", "--out", str(tmp_path), *extra])
    assert e.value.code == 2 and f"not {extra[0]}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_dtype_other_than_float32_names_its_files(tmp_path):
    assert bench.main(["--quick", "--shapes", "mlp", "--ops", "prox_", "--device", "cpu", "--repeats", "1",
                       "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    assert any(f.endswith("-quick-bfloat16-subset.json") for f in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_a_subset_run_does_not_take_the_full_runs_name(tmp_path):
    """A run (not --quick) of fewer shape sets or ops than the full run gets
    '-subset' in its file names (unless --tag names it) and says so in its
    header: it would replace a full run's results and call itself one."""
    argv = ["--shapes", "mlp", "--ops", "weight_stats", "--device", "cpu", "--repeats", "1", "--no-compile",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert bench.main(argv + ["--tag", "mine"]) == 0
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".json"))
    assert len(names) == 2 and names[0].endswith("-mine.json") and names[1].endswith("-subset.json"), names
    with open(os.path.join(tmp_path, names[1][:-5] + ".md")) as f:
        assert "full run of a subset (shape sets mlp; ops weight_stats) of " in f.read()
    with open(os.path.join(tmp_path, names[1])) as f:
        meta = json.load(f)["meta"]
    assert meta["subset"] is True and meta["ops"] == ["weight_stats"]


def test_a_quick_subset_run_does_not_take_the_quick_runs_name(tmp_path):
    """A --quick run of fewer shape sets or ops than --quick's own gets
    '-subset' too: it would replace a --quick run's results silently."""
    assert bench.main(["--quick", "--shapes", "mlp", "--ops", "weight_stats", "--device", "cpu", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    names = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(names) == 1 and names[0].endswith("-quick-subset.json"), names
    with open(os.path.join(tmp_path, names[0][:-5] + ".md")) as f:
        assert "of a subset" in f.read()


# ---------------------------------------------------------------------------
# Results written after each shape set
# ---------------------------------------------------------------------------
ARGV = ["--quick", "--ops", "prox_", "--device", "cpu", "--repeats", "1", "--tag", "partial"]


def _only_json(out_dir):
    files = sorted(os.listdir(out_dir))
    assert not [f for f in files if f.endswith(".tmp")], files  # no half-written file left
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1, files
    return os.path.join(out_dir, js[0][:-5])


def test_ctrl_c_keeps_the_sets_measured(tmp_path, monkeypatch, capsys):
    # Ctrl-C while the second set runs (after its first op): the first set's
    # results are on disk, marked partial, without the second set's half, and
    # the run exits 130 with a message saying what it kept.
    real = suite.Suite.run_op

    def run_op(self, sset, op, k):
        if sset.name == "lstm" and op == "max_norm_":
            raise KeyboardInterrupt
        return real(self, sset, op, k)

    monkeypatch.setattr(suite.Suite, "run_op", run_op)
    try:
        rc = bench.main(ARGV + ["--shapes", "mlp,lstm", "--ops", "prox_,max_norm_", "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped pyreg bench: no exit status, no message")
    assert rc == 130
    assert "interrupted: kept the 1 shape set(s) measured (mlp)" in capsys.readouterr().err
    stem = _only_json(tmp_path)
    with open(stem + ".json") as f:
        res = json.load(f)
    assert res["meta"]["complete"] is False and res["meta"]["sets_done"] == ["mlp"]
    assert res["meta"]["sets_planned"] == ["mlp", "lstm"]
    rows = res["rows"]
    assert {r["shapes"] for r in rows} == {"mlp"} and list(res["shape_sets"]) == ["mlp"]
    assert {(r["op"], r["peer"]) for r in rows} == {(op, peer) for op in ("prox_", "max_norm_") for peer in
                                                     ("pyreg", "loop", "foreach", "compile", "roofline", "copy")}
    assert all(r["ms"] for r in rows if r["peer"] != "compile")
    with open(stem + ".md") as f:
        md = f.read()
    assert "Partial results" in md and "| mlp | prox_ |" in md and "| lstm |" not in md


def test_killed_run_keeps_the_first_set(tmp_path):
    # A run killed (SIGKILL: no clean-up at all) after its first set keeps that
    # set in whole, readable files.
    code = ("import sys; from pyreg.bench import main; "
            f"sys.exit(main({ARGV + ['--shapes', 'mlp,gpt2', '--no-compile', '--out', str(tmp_path)]!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not [f for f in os.listdir(tmp_path) if f.endswith(".json")]:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no results written"
            time.sleep(0.02)
        assert proc.poll() is None  # still running (on gpt2) when killed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    stem = _only_json(tmp_path)
    with open(stem + ".json") as f:
        res = json.load(f)
    assert res["meta"]["sets_done"] == ["mlp"] and not res["meta"]["complete"]
    assert {r["shapes"] for r in res["rows"]} == {"mlp"}
    assert {r["peer"] for r in res["rows"]} == {"pyreg", "loop", "foreach", "compile", "roofline", "copy"}
    with open(stem + ".md") as f:
        assert "| mlp | prox_ |" in f.read()


# ---------------------------------------------------------------------------
# Spread and flags, on synthetic timings
# ---------------------------------------------------------------------------
def _row(peer, ms, lo, hi, pct=None, speedup=None, op="prox_"):
    return {"device": "cpu", "shapes": "mlp", "op": op, "peer": peer, "what": peer, "ms": ms, "min_ms": lo,
            "max_ms": hi, "samples": 5, "host_ms": ms, "gbps": 1.0, "pct_roofline": pct, "pct_copy": 50.0,
            "speedup": speedup, "check": "pass" if peer not in ("roofline", "copy") else "n/a",
            "check_detail": "", "peak_extra_mb": 0.0, "rss_peak_extra_mb": 0.0, "compile_s": None}


def _res(rows):
    return {"meta": {"name": "test cpu", "device": "cpu", "threads": 2, "backend": "cpu", "torch": "x",
                     "pyreg": "y", "dtype": "float32", "quick": True, "date": "today", "wall_s": 1.0},
            "notes": [], "warnings": report.assess(rows), "shape_sets": {}, "rows": rows}


def test_clean_figures_are_not_flagged():
    rows = [_row("pyreg", 1.0, 0.9, 1.2, pct=80.0, speedup=1.0), _row("loop", 2.0, 1.9, 2.5, pct=40.0, speedup=2.0),
            _row("roofline", 0.8, 0.7, 1.0, pct=100.0, speedup=0.8), _row("copy", 0.5, 0.5, 0.6, speedup=0.5)]
    res = _res(rows)
    assert res["warnings"] == [] and all(r["flags"] == [] for r in rows)
    assert rows[0]["spread"] == pytest.approx(1.2 / 0.9)
    table = report.summary_table(res)
    assert "(!)" not in table and "| 1.00 (0.900–1.20) |" in table and "| 2.00x |" in table
    full = report.full_table(res)
    assert "| 1.00 | 0.900 | 1.20 |" in full  # median, min, max


def test_above_roofline_is_flagged_and_explained():
    rows = [_row("pyreg", 0.06, 0.05, 0.07, pct=1666.0, speedup=1.0), _row("loop", 2.0, 1.9, 2.5, pct=50.0, speedup=33.0),
            _row("roofline", 1.0, 0.9, 1.1, pct=100.0), _row("copy", 0.5, 0.5, 0.6)]
    res = _res(rows)
    assert rows[0]["flags"] == ["above roofline"] and rows[1]["flags"] == []
    assert len(res["warnings"]) == 1
    w = res["warnings"][0]
    assert w.startswith("mlp prox_: above 100% of the roofline (pyreg 1666%)") and "implausible" in w
    assert "| 1666 (!) |" in report.summary_table(res) and "pyreg above roofline (1666%)" in report.summary_table(res)
    assert "| 1666 (!) |" in report.full_table(res)
    assert "Warning: mlp prox_: above 100%" in report.markdown(res)


def test_noisy_figures_are_flagged_with_their_spread():
    rows = [_row("pyreg", 1.0, 0.9, 1.1, pct=80.0, speedup=1.0),
            _row("loop", 2.0, 1.0, 9.0, pct=40.0, speedup=2.0),  # 9x spread
            _row("roofline", 0.8, 0.7, 2.0, pct=100.0),  # 2.9x: pyreg's % roofline rests on it
            _row("copy", 0.5, 0.5, 0.6)]
    res = _res(rows)
    assert [r["flags"] for r in rows] == [[], ["noisy"], ["noisy"], []]
    assert len(res["warnings"]) == 1 and "too noisy to trust (loop 9.00x, roofline 2.86x" in res["warnings"][0]
    table = report.summary_table(res)
    assert "| 80 (!) |" in table  # pyreg's % roofline: the roofline's time is noisy
    assert "| 2.00x (!) |" in table  # vs loop: the loop's time is noisy
    assert "| 1.00 (0.900–1.10) |" in table  # pyreg's own time is not
    # just under the threshold: not flagged
    rows = [_row("pyreg", 1.0, 1.0, report.NOISY_SPREAD * 0.99, pct=80.0, speedup=1.0)]
    assert _res(rows)["warnings"] == [] and rows[0]["flags"] == []


def test_cpu_run_rows_carry_their_spread(tmp_path):
    assert bench.main(ARGV + ["--shapes", "mlp", "--repeats", "5", "--out", str(tmp_path)]) == 0
    with open(_only_json(tmp_path) + ".json") as f:
        res = json.load(f)
    assert res["meta"]["complete"] is True and res["meta"]["sets_done"] == ["mlp"]
    timed = [r for r in res["rows"] if r["ms"] is not None]
    assert timed
    for r in timed:
        assert r["min_ms"] <= r["ms"] <= r["max_ms"] and r["spread"] == pytest.approx(r["max_ms"] / r["min_ms"])
        assert isinstance(r["flags"], list)
    assert all(r["samples"] >= 5 for r in timed)
    # real timings of several calls differ: the spread is measured, not a copy of the median
    assert any(r["max_ms"] > r["ms"] for r in timed) and any(r["min_ms"] < r["ms"] for r in timed)
    assert any("--quick" in n and "torch.compile" in n for n in res["notes"])


# ---------------------------------------------------------------------------
# The plot
# ---------------------------------------------------------------------------
def test_plot_legends_list_only_peers_that_ran():
    pytest.importorskip("matplotlib")
    rows = []
    for op in ("prox_", "weight_stats"):
        rows += [_row("pyreg", 1.0, 0.9, 1.1, pct=80.0, speedup=1.0, op=op),
                 _row("loop", 2.0, 1.9, 2.1, pct=40.0, speedup=2.0, op=op),
                 _row("foreach", 3.0, 2.9, 3.1, pct=27.0, speedup=3.0, op=op),
                 _row("compile", None, None, None, op=op),  # skipped
                 _row("roofline", 0.8, 0.7, 0.9, pct=100.0, speedup=0.8, op=op)]
    fig = report.figure(_res(rows))
    try:
        speed, roof = fig.axes
        assert speed.get_legend_handles_labels()[1] == ["vs loop", "vs foreach"]
        assert roof.get_legend_handles_labels()[1] == ["pyreg", "foreach"]
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


# ---------------------------------------------------------------------------
# Check messages
# ---------------------------------------------------------------------------
def test_check_messages_say_what_they_found():
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(300, 4, generator=g), torch.randn(7, generator=g)]
    ref[0][0] = 0.0
    ok, detail = peers.compare("prox_", ref, [t.clone() for t in ref], torch.float32)
    assert ok and detail == "within rtol 1.3e-06, atol 1e-08, same zero pattern (1,207 elements)"
    got = [t.clone() for t in ref]
    got[0][0, 0] = 1.0
    ok, detail = peers.compare("prox_", ref, got, torch.float32)
    assert not ok and "off by up to 1.0e+00 beyond" in detail and "zero pattern differs at 1 of 1,207 elements" in detail


# ---------------------------------------------------------------------------
# torch.compile after an in-process run
# ---------------------------------------------------------------------------
_COMPILE_AFTER = "import torch; f = torch.compile(lambda x: (x * 3).relu().sum()); f(torch.randn(17))"


def test_compile_after_an_in_process_run(tmp_path):
    # pyreg bench times torch.compile cold, in a fresh inductor cache of its own.
    # A process that goes on to compile must not leave entries in the user's
    # cache that name files of that directory (removed at exit): the next
    # process would load them and fail to build.
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)  # torch's default cache, and the run's own, go under tmp_path
    out = tmp_path / "out"
    code = ("import sys; from pyreg.bench import main; "
            f"assert main({ARGV + ['--shapes', 'mlp', '--compile', '--out', str(out)]!r}) == 0; "
            + _COMPILE_AFTER)
    for step in (code, _COMPILE_AFTER):  # the bench and a compile, then a compile in a new process
        proc = subprocess.run([sys.executable, "-c", step], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)  # not the repository root: the installed pyreg
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("pyreg-bench-inductor-")]
    default = [p for p in os.listdir(tmp_path) if p.startswith("torchinductor_")]
    assert default, "torch's default inductor cache was not under TMPDIR"
    dangling = []
    for root, _, files in os.walk(tmp_path / default[0]):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if b"pyreg-bench-inductor-" in f.read():
                    dangling.append(os.path.join(root, name))
    assert not dangling, f"entries of the user's inductor cache name the run's removed cache: {dangling[:3]}"


def test_a_result_file_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    """A write that fails after a measurement (here a folder where the
    markdown goes; a full disk alike) ends the run with a one-line error and
    exit code 1, leaving no temporary file."""
    argv = ["--quick", "--shapes", "mlp", "--ops", "weight_stats", "--device", "cpu", "--no-compile",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    md = [f for f in os.listdir(tmp_path) if f.endswith(".md")][0]
    os.remove(tmp_path / md)
    os.mkdir(tmp_path / md)
    capsys.readouterr()
    assert bench.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pyreg bench: cannot write {tmp_path / md}: ") and "Traceback" not in "".join(err)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
