"""``pyreg bench --compact``: the variants are checked against the original
before they are timed, pyreg.compact's model is the size Torch-Pruning's is
on the same zeros, and the CLI writes its two files."""
from __future__ import annotations

import json

import pytest

from pyreg.bench import compact


def test_rows_and_sizes():
    res = compact.run("cpu", rounds=3, log=lambda s: None)
    rows = {r["peer"]: r for r in res["rows"]}
    assert {"original", "pyreg.compact", "pyreg.compact(drop_inputs)"} <= set(rows)
    full, small = rows["original"]["params"], rows["pyreg.compact"]["params"]
    assert small == full - 32 * (128 - compact.KEPT)  # exactly the zero columns of the input layer
    assert rows["pyreg.compact(drop_inputs)"]["params"] == small
    for r in rows.values():
        assert r["min_ms"] <= r["ms"] <= r["max_ms"]
    if "torch_pruning" in rows:
        assert rows["torch_pruning"]["params"] == small
    else:
        assert any("torch_pruning" in n for n in res["notes"])


def test_a_wrong_variant_is_refused(monkeypatch):
    import pyreg

    real = pyreg.compact

    def broken(model, x, **kw):
        out = real(model, x, **kw)
        with __import__("torch").no_grad():
            next(out.model.parameters()).add_(1.0)
        return out

    monkeypatch.setattr(pyreg, "compact", broken)
    with pytest.raises(RuntimeError, match="differs from the original"):
        compact.run("cpu", rounds=1, log=lambda s: None)


def test_cli_writes_its_files(tmp_path):
    from pyreg import cli

    assert cli.main(["bench", "--compact", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*-compact-quick.json")  # (not the full run's name)
    (md,) = tmp_path.glob("*-compact-quick.md")
    data = json.loads(js.read_text())
    assert data["rows"] and "pyreg.compact" in md.read_text()
