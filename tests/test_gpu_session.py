"""bench/gpu_session.sh, the one command of a GPU session, in its dry run: the
plan, then every stage's logic on the CPU with the emulated CUDA build and
tiny sizes. It must finish, run every stage, keep within 6 files in $OUT, and
its stage budgets must add up to under 9 minutes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import json
import tarfile
from pathlib import Path

import pytest

from conftest import needs_emu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ["env", "build", "test", "memcheck", "racecheck", "initcheck", "profile", "bench", "optim"]


def test_stage_budgets_fit_in_9_minutes():
    text = SCRIPT.read_text()
    m = re.search(r"^B_ENV=.*$", text, re.M)
    assert m, "no stage budgets"
    budgets = dict(re.findall(r"B_(\w+)=(\d+)", m.group(0)))
    assert {k.lower() for k in budgets} == set(STAGES)
    assert sum(int(v) for v in budgets.values()) <= 9 * 60 - 10  # and the tarball


@needs_emu
@pytest.mark.skipif(shutil.which("timeout") is None, reason="no timeout(1)")
def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:] + (out / "session.log").read_text()[-4000:]
    files = sorted(f.name for f in out.iterdir())
    assert files == ["bench-results.tar.gz", "session.log", "summary.txt"] and len(files) <= 6
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert re.search(rf"^{stage} +exit +0 ", summary, re.M), (stage, summary)
    assert "torch " in summary and "gpu: " in summary
    log = (out / "session.log").read_text()
    assert len(re.findall(r"selected: [1-9]\d* tests", log)) == 1  # the test stage selects tests
    assert len(re.findall(r"^sanitize_ops: .*: ok$", log, re.M)) == 3  # each sanitizer's workload ran
    with tarfile.open(out / "bench-results.tar.gz") as tar:
        names = tar.getnames()
    # the bench's files and every optimizer's step, named by driver and torch
    assert any(re.fullmatch(r"results/.*-driver-none-torch-[0-9-]+\.json", n) for n in names), names
    assert any(re.fullmatch(r"results/optim-kernels-driver-none-torch-[0-9-]+\.json", n) for n in names), names


def _optim_kernels():
    import importlib.util

    spec = importlib.util.spec_from_file_location("optim_kernels", ROOT / "bench" / "optim_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_optim_kernels_isolates_each_algorithm_and_names_the_failing_peer(tmp_path, monkeypatch, capsys):
    """bench/optim_kernels.py --isolate: each algorithm in a child process; one
    whose child dies (a kernel fault ends its process's CUDA context) leaves
    the others' rows, is run again peer by peer to name the one that fails,
    and makes the script exit 1; the JSON keeps every outcome."""
    ok = _optim_kernels()
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kw):
        if "--algos" not in cmd:  # (not the script's child: platform's, say)
            return real_run(cmd, **kw)
        calls.append(cmd)
        algo = cmd[cmd.index("--algos") + 1]
        peer = cmd[cmd.index("--check-peer") + 1] if "--check-peer" in cmd else None
        if algo == "adam" and peer in (None, "pyreg"):
            return subprocess.CompletedProcess(cmd, -11, "", "x\nRuntimeError: CUDA error: an illegal memory access\n")
        if peer is None:
            out = cmd[cmd.index("--out") + 1]
            Path(out).write_text(json.dumps({"rows": [{"algo": algo, "errors": {}}]}))
        return subprocess.CompletedProcess(cmd, 0, f"{algo} ran\n", "")

    monkeypatch.setattr(ok.subprocess, "run", fake_run)
    out = tmp_path / "o.json"
    rc = ok.main(["--device", "cpu", "--shapes", "mlp", "--isolate", "--out", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())
    assert [r["algo"] for r in res["rows"]] == [a[0] for a in ok.ALGOS]
    (adam,) = [r for r in res["rows"] if r["algo"] == "adam"]
    assert adam["failed"] == "killed by signal 11: RuntimeError: CUDA error: an illegal memory access"
    assert adam["peers"] == {"pyreg": adam["failed"], "torch": "ok"}
    assert all("failed" not in r for r in res["rows"] if r["algo"] != "adam")
    assert sum("--check-peer" in c for c in calls) == 2 and all("--no-isolate" in c for c in calls)
    assert "adam          FAILED" in capsys.readouterr().out
    # every algorithm ran: exit 0
    monkeypatch.setattr(ok.subprocess, "run", lambda cmd, **kw: fake_run(cmd, **kw) if "adam" not in cmd
                        else subprocess.CompletedProcess(cmd, 0, "", "") if "--check-peer" in cmd
                        else (Path(cmd[cmd.index("--out") + 1]).write_text('{"rows": [{"algo": "adam"}]}'),
                              subprocess.CompletedProcess(cmd, 0, "", ""))[1])
    assert ok.main(["--device", "cpu", "--shapes", "mlp", "--isolate", "--out", str(out)]) == 0


def test_optim_kernels_check_peer_runs_one_peer_and_reports_its_errors(capsys):
    """--check-peer: no timing, the peer's step run 5 times (synchronized
    after each), exit 0; a peer whose step raises exits 1 naming it."""
    ok = _optim_kernels()
    assert ok.main(["--device", "cpu", "--shapes", "mlp", "--algos", "sgd-momentum", "--check-peer", "pyreg"]) == 0
    assert "sgd-momentum pyreg: 5 steps, synchronized after each: ok" in capsys.readouterr().out
    bad = [(n, p, t, dict(kw, lr=-1.0), s) for n, p, t, kw, s in ok.ALGOS]  # refused by both optimizers
    ok.ALGOS[:] = bad
    assert ok.main(["--device", "cpu", "--shapes", "mlp", "--algos", "adam", "--check-peer", "torch"]) == 1
    assert "adam torch: ValueError" in capsys.readouterr().err
