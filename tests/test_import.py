"""``import pyreg`` stays light: torch's heavy submodules (dynamo, the
distributed tensor) are not imported until something needs them (torch's
own optimizers import dynamo when built), and the import costs little more
than ``import torch`` (measured in fresh processes, alternating, with
generous slack for a loaded machine)."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

HEAVY = ("torch._dynamo", "torch.distributed.tensor", "torch._inductor")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_pyreg_loads_no_heavy_torch_module():
    out = _run("import sys, pyreg; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,))
    assert out.strip() == "[]", out


def _seconds(module: str) -> float:
    t0 = time.perf_counter()
    _run(f"import {module}")
    return time.perf_counter() - t0


def test_import_costs_little_more_than_torch():
    torch_s, pyreg_s = [], []
    for _ in range(3):
        torch_s.append(_seconds("torch"))
        pyreg_s.append(_seconds("pyreg"))
    extra = statistics.median(pyreg_s) - statistics.median(torch_s)
    # Target 0.3 s on a quiet machine; the slack covers a loaded one.
    assert extra <= max(0.6, 0.5 * statistics.median(torch_s)), (torch_s, pyreg_s)


def test_dir_shows_the_public_api_only():
    import pyreg

    names = dir(pyreg)
    assert "annotations" not in names and "Regularized" in names and "optim" in names
    assert not [n for n in names if n.startswith("_") and n != "__version__"]
    assert set(pyreg.__all__) <= set(names)


def test_version_on_the_command_line(capsys):
    import pytest

    import pyreg
    from pyreg import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyreg {pyreg.__version__}"
