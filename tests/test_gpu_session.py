"""bench/gpu_session.sh, the one command of a GPU session, in its dry run: the
plan, then every stage's logic on the CPU with the emulated CUDA build and
tiny sizes. It must finish, run every stage, keep within 6 files in $OUT, and
its stage budgets must add up to under 8 minutes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import needs_emu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ["env", "build", "test", "memcheck", "racecheck", "initcheck", "profile", "bench"]


def test_stage_budgets_fit_in_8_minutes():
    text = SCRIPT.read_text()
    m = re.search(r"^B_ENV=.*$", text, re.M)
    assert m, "no stage budgets"
    budgets = dict(re.findall(r"B_(\w+)=(\d+)", m.group(0)))
    assert {k.lower() for k in budgets} == set(STAGES)
    assert sum(int(v) for v in budgets.values()) <= 8 * 60 - 15  # and the tarball


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
