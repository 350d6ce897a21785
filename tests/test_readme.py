"""The README is the front door: short, its quick start runs and does what it
says, its links resolve, and its demo results are those of the committed run
(docs/assets/demo/, written into it by docs/update_readme.py)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not README.exists(), reason="needs the source tree")


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 150


def test_quick_start_runs_and_selects_the_informative_inputs(tmp_path):
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 22
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    assert "inputs used: [0, 1, 2, 3]" in out, out
    zeros = int(re.search(r"exact zeros: (\d+)%", out).group(1))
    assert zeros >= 50, out


def test_relative_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), target


def test_demo_results_match_the_committed_run():
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "update_readme.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
