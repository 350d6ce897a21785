"""``pyreg demo``: the CLI end to end in --quick mode, the claims it shows, and
its argument checks. The quick study runs once per module (shared fixture)."""
from __future__ import annotations

import csv
import json
import os

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from pyreg import cli  # noqa: E402
from pyreg.demo import QUICK_ALPHAS  # noqa: E402
from pyreg.demo.study import METHODS, plan_runs  # noqa: E402

FILES = ["results.csv", "results.json", "regularization_path.png", "layer_norms.png", "input_weights.png"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc = cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--seed", "0"])
    assert rc == 0
    with open(out / "results.json") as f:
        data = json.load(f)
    return out, data


def _run(data, task, method, alpha=None):
    rs = [r for r in data["results"] if r["task"] == task and r["method"] == method
          and (alpha is None or r["alpha"] == alpha)]
    assert rs, (task, method, alpha)
    return rs


def test_files_written(quick):
    out, _ = quick
    for name in FILES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in FILES:
        if name.endswith(".png"):
            with open(out / name, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table_rows(quick, capsys):
    out, data = quick
    expected = [(t, m, a) for t in ("mlp", "lstm") for m, a in plan_runs(METHODS, QUICK_ALPHAS)]
    assert len(expected) == 2 * (1 + 4 * len(QUICK_ALPHAS))
    got = [(r["task"], r["method"], r["alpha"]) for r in data["results"]]
    assert got == expected
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["method"], float(r["alpha"])) for r in rows] == expected
    # one grid-search winner per (task, method)
    assert sorted((w["task"], w["method"]) for w in data["winners"]) == sorted(
        (t, m) for t in ("mlp", "lstm") for m in METHODS)


def test_printed_table(tmp_path, capsys):
    """The terminal table: a header and one line per run (a reduced run)."""
    out = tmp_path / "small"
    rc = cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--methods", "none,l1",
                   "--alphas", "0.3"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = [ln.split() for ln in text.splitlines()]
    rows = [ln[:3] for ln in lines if len(ln) > 3 and ln[0] in ("mlp", "lstm")]
    # the results table, then the winners table (same runs: one alpha per method)
    assert rows == [["mlp", "none", "-"], ["mlp", "l1", "0.3"], ["lstm", "none", "-"], ["lstm", "l1", "0.3"]] * 2
    assert "Grid-search winner" in text and os.path.abspath(out) in text
    assert sorted(os.listdir(out)) == sorted(FILES)


def test_l1_selects_informative_inputs(quick):
    """The claim: proximal L1 zeroes most noise inputs of the first layer
    exactly and keeps every informative one; no penalty keeps all inputs."""
    _, data = quick
    none = _run(data, "mlp", "none")[0]
    l1 = _run(data, "mlp", "l1", max(QUICK_ALPHAS))[0]
    msg = (f"L1 alpha={l1['alpha']}: precision {l1['precision']:.3f}, recall {l1['recall']:.3f}, "
           f"noise zeroed {l1['noise_zeroed']}/{l1['num_noise']}, inputs used {l1['inputs_used']}; "
           f"none: precision {none['precision']:.3f}")
    assert l1["recall"] == 1.0, msg
    assert l1["noise_zeroed"] >= 0.6 * l1["num_noise"], msg
    assert l1["precision"] >= 2.5 * none["precision"], msg
    assert none["noise_zeroed"] == 0 and none["inputs_used"] == none["num_informative"] + none["num_noise"], msg


def test_l1_zeros_l2_shrinks(quick):
    _, data = quick
    none = _run(data, "mlp", "none")[0]
    assert none["sparsity"] == 0.0
    for r in _run(data, "mlp", "l1"):
        assert r["sparsity"] > 0.2, (r["alpha"], r["sparsity"])
        assert any(v["nonzero"] < v["numel"] for v in r["layers"].values())
    weights = [n for n in none["layers"] if n.endswith("weight")]
    for r in _run(data, "mlp", "l2"):
        assert r["sparsity"] == 0.0
        for n in weights:  # smooth shrinkage: smaller norms, no zeros
            assert r["layers"][n]["l2_norm"] < none["layers"][n]["l2_norm"], (r["alpha"], n)
    strongest = _run(data, "mlp", "l2", max(QUICK_ALPHAS))[0]
    total = lambda r: sum(r["layers"][n]["l2_norm"] ** 2 for n in weights)  # noqa: E731
    assert total(strongest) < 0.8 * total(none)


def test_regularization_reduces_overfitting(quick):
    _, data = quick
    for task in ("mlp", "lstm"):
        none = _run(data, task, "none")[0]
        best = max((w for w in data["winners"] if w["task"] == task and w["method"] != "none"),
                   key=lambda w: w["val_acc"])
        assert best["val_acc"] > none["val_acc"], (task, best, none["val_acc"])
        assert none["train_acc"] - none["val_acc"] > 0.05, (task, none)


def test_reproducible(quick, tmp_path):
    """Same seed, same numbers (a reduced rerun compared with the fixture's runs)."""
    _, data = quick
    out = tmp_path / "again"
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--seed", "0",
                     "--methods", "l1", "--alphas", str(max(QUICK_ALPHAS))]) == 0
    with open(out / "results.json") as f:
        again = json.load(f)["results"]
    first = [r for r in data["results"] if r["method"] == "l1" and r["alpha"] == max(QUICK_ALPHAS)]
    assert again == first


@pytest.mark.parametrize("args, needle", [
    (["--methods", "l1,lasso"], "--methods"),
    (["--alphas", "0.1,-1"], "--alphas"),
    (["--alphas", "nan"], "--alphas"),
    (["--seed", "1.5"], "--seed"),
    (["--device", "tpu"], "--device"),
])
def test_bad_arguments(tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(out)] + args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_cuda_unavailable(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--device", "cuda", "--out", str(out)])
    assert e.value.code == 2
    assert "--device" in capsys.readouterr().err and not out.exists()


def test_progress_on_a_terminal_and_in_a_log():
    import io

    from pyreg.demo.report import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    result = {"val_acc": 0.5}
    tty = Tty()
    p = Progress(tty, mininterval=0)  # every update drawn
    assert p.wants_loss
    p.start(10)
    p.advance(4, "mlp l1 0.1", 0.25)
    p.advance(6, "mlp l1 0.1", 0.125)
    p.run_done("mlp l1 0.1", result, 1.0)
    p.finish()
    out = tty.getvalue()
    assert "mlp l1 0.1" in out and "10/10" in out and "step/s" in out and "loss=0.125" in out  # tqdm's bar
    log = io.StringIO()  # not a terminal: one line per finished run, no bar
    p = Progress(log)
    assert not p.wants_loss
    p.start(10)
    p.advance(10, "mlp l1 0.1", None)
    p.run_done("mlp l1 0.1", result, 1.0)
    p.finish()
    assert log.getvalue() == "[100%] mlp l1 0.1: val acc 0.500 (1.0 s)\n"
