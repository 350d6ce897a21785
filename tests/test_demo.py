"""``pyreg demo``: the CLI end to end in --quick mode, the claims it shows, and
its argument checks. The quick study runs once per module (shared fixture)."""
from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from pyreg import cli
from pyreg.demo import (
    CANCER,
    DIGITS,
    FINETUNE_ALPHAS,
    QUICK_ALPHAS,
    VOWELS,
    VOWELS_SKIPPED,
)
from pyreg.demo.study import FINETUNE_METHODS, METHODS, plan_runs

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

FILES = ["results.csv", "results.json", "finetune.csv", "regularization_path.png", "layer_norms.png",
         "input_weights.png", "digits_pixels.png"]
STUDY = ("mlp", "lstm")
def _fake_find_spec(root):
    """importlib.util.find_spec, but "aeon" is the package folder ``root``
    (None: not installed)."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, package=None):
        if name != "aeon":
            return real(name, package)
        if root is None:
            return None
        spec = importlib.machinery.ModuleSpec("aeon", None, is_package=True)
        spec.submodule_search_locations = [str(root)]
        return spec

    return find_spec


def _no_aeon(mp):
    import importlib.util

    mp.setattr(importlib.util, "find_spec", _fake_find_spec(None))


REAL = [(t, m, a) for t in ("cancer-raw", "cancer-std") for m, a in plan_runs(CANCER["methods"], CANCER["alphas"])] + [
    ("digits", m, a) for m, a in plan_runs(DIGITS["methods"], DIGITS["alphas"])]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("error")  # the demo prints no warning of its own
        _no_aeon(mp)  # the same runs whether or not the sequences extra is installed
        rc = cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--seed", "0"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the demo's one-thread setting is restored
    with open(out / "results.json") as f:
        data = json.load(f)
    return out, data


def _planned(task, method, alpha):
    """A result row's (task, method, alpha) as plan_runs gives it (``path``'s row holds the alpha it picked)."""
    return task, method, 0.0 if method == "path" else float(alpha)


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
    assert len(expected) == 2 * (4 + 5 * len(QUICK_ALPHAS))  # none, the 2 strengths and path once, 5 over the grid
    got = [_planned(r["task"], r["method"], r["alpha"]) for r in data["results"]]
    assert got == expected + REAL  # the study's runs, then the real-data tasks' (same with --quick)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [_planned(r["task"], r["method"], r["alpha"]) for r in rows] == expected + REAL
    assert [float(r["alpha"]) for r in rows] == [r["alpha"] for r in data["results"]]
    # one grid-search winner per (task, method)
    assert sorted((w["task"], w["method"]) for w in data["winners"]) == sorted(
        [(t, m) for t in STUDY for m in METHODS] + list({(t, m) for t, m, _ in REAL}))


def test_full_runs_the_per_layer_grid(tmp_path, capsys, monkeypatch):
    """--full: every combination of the per-layer alphas on the mlp's three
    weights (2 alphas here: 8 runs), each weight at its own l1, and the
    table of the three searches with the winners' numbers."""
    import pyreg.demo

    _no_aeon(monkeypatch)
    monkeypatch.setattr(pyreg.demo, "LAYER_GRID_ALPHAS", (0.03, 0.3))
    out = tmp_path / "full"
    rc = cli.main(["demo", "--quick", "--full", "--device", "cpu", "--out", str(out), "--methods", "none,l1,strength",
                   "--alphas", "0.3"])
    assert rc == 0
    text = capsys.readouterr().out
    with open(out / "layer_grid.json") as f:
        grid = json.load(f)
    combos = [tuple(r["layer_alphas"].values()) for r in grid["results"]]
    assert sorted(combos) == sorted((a, b, c) for a in (0.03, 0.3) for b in (0.03, 0.3) for c in (0.03, 0.3))
    assert all(list(r["layer_alphas"]) == ["0.weight", "2.weight", "4.weight"] for r in grid["results"])
    # no one alpha or l1 (each weight has its own), and no l2 (it trained none)
    assert all(r["alpha"] is None and r["l1"] is None and r["l2"] == 0.0 for r in grid["results"])
    # each weight got its own alpha: with 0.3 on the input layer it is sparser than with 0.03
    by = {tuple(r["layer_alphas"].values()): r for r in grid["results"]}
    assert by[(0.3, 0.03, 0.03)]["layers"]["0.weight"]["sparsity"] > by[(0.03, 0.03, 0.03)]["layers"]["0.weight"][
        "sparsity"]
    assert by[(0.03, 0.03, 0.3)]["layers"]["4.weight"]["sparsity"] > by[(0.03, 0.03, 0.03)]["layers"]["4.weight"][
        "sparsity"]
    best = max(grid["results"], key=lambda r: (r["val_acc"], tuple(r["layer_alphas"].values())))
    line = next(ln for ln in text.splitlines() if ln.startswith("L1, alpha per layer"))
    assert line.split()[4:7] == [",".join(f"{a:g}" for a in best["layer_alphas"].values()), "8",
                                 f"{best['val_acc']:.3f}"]
    assert any(ln.startswith("l1_strength") for ln in text.splitlines())


def test_ctrl_c_exits_130_with_a_message(tmp_path, capsys, monkeypatch):
    import pyreg.demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyreg.demo, "_study", interrupted)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 130
    assert "interrupted: the run is incomplete" in capsys.readouterr().err


def test_printed_table(tmp_path, capsys, monkeypatch):
    """The terminal table: a header and one line per run (a reduced run);
    without the sequence data, one line says the vowels task is skipped."""
    out = tmp_path / "small"
    _no_aeon(monkeypatch)
    rc = cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--methods", "none,l1",
                   "--alphas", "0.3"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = [ln.split() for ln in text.splitlines()]
    rows = [ln[:3] for ln in lines if len(ln) > 3 and ln[0] in ("mlp", "lstm")]
    # the results table, then the winners table (same runs: one alpha per method)
    assert rows == [["mlp", "none", "-"], ["mlp", "l1", "0.3"], ["lstm", "none", "-"], ["lstm", "l1", "0.3"]] * 2
    # then the fine-tuning table: the pre-trained model and every run (not limited by --methods / --alphas)
    ft = [ln[:3] for ln in lines if ln and ln[0] == "finetune"]
    assert ft == [["finetune", "pretrained", "-"], ["finetune", "none", "-"]] + [
        ["finetune", m, f"{a:g}"] for m in ("l2", "l2-sp") for a in FINETUNE_ALPHAS]
    assert "Fine-tuning" in text
    assert "Grid-search winner" in text and os.path.abspath(out) in text
    assert sorted(os.listdir(out)) == sorted(FILES)
    skipped = [ln for ln in text.splitlines() if "vowels" in ln]
    assert skipped == [VOWELS_SKIPPED] and 'pip install "pyreg[sequences]"' in VOWELS_SKIPPED
    with open(out / "results.json") as f:
        data = json.load(f)
    assert "vowels" not in data["config"] and not any(r["task"] == "vowels" for r in data["results"])


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


def test_group_lasso_selects_exactly_the_informative_inputs(quick):
    """The claim: group lasso on the input layer's columns (plus ridge) zeroes
    every noise input's whole column and keeps every informative one, at the
    alpha the grid search selects, validating at least as well as L1's winner."""
    _, data = quick
    winner = {w["method"]: w for w in data["winners"] if w["task"] == "mlp"}
    g = _run(data, "mlp", "group", winner["group"]["alpha"])[0]
    l1 = _run(data, "mlp", "l1", winner["l1"]["alpha"])[0]
    msg = (f"group alpha={g['alpha']}: noise zeroed {g['noise_zeroed']}/{g['num_noise']}, kept "
           f"{g['informative_kept']}/{g['num_informative']}, val {g['val_acc']}; l1 alpha={l1['alpha']}: "
           f"val {l1['val_acc']}")
    assert g["noise_zeroed"] == g["num_noise"] and g["informative_kept"] == g["num_informative"], msg
    assert g["precision"] == 1.0 and g["recall"] == 1.0 and g["inputs_used"] == g["num_informative"], msg
    assert g["val_acc"] >= l1["val_acc"], msg
    norms = g["input_weight_norms"]  # whole columns: exactly 0 for noise, not for the informative inputs
    assert all(v == 0.0 for v in norms[g["num_informative"]:]) and all(v > 0 for v in norms[:g["num_informative"]])
    # coefficients: group_l1 = alpha * sqrt(rows of a column), ridge alpha / 2 (from_sklearn(alpha, 0))
    assert g["group_l1"] == pytest.approx(g["alpha"] * 32 ** 0.5) and g["l2"] == pytest.approx(g["alpha"] / 2)
    assert g["l1"] == 0.0
    # a weak group penalty selects nothing: the columns are zeroed by the penalty, not by training
    weak = _run(data, "mlp", "group", min(QUICK_ALPHAS))[0]
    assert weak["noise_zeroed"] < weak["num_noise"] / 2, weak["noise_zeroed"]
    for task in ("mlp", "lstm"):  # every group run reports input selection
        for r in _run(data, task, "group"):
            assert {"inputs_used", "noise_zeroed", "precision", "recall"} <= set(r)


def test_group_param_groups():
    """Group lasso goes on the input weight's columns (group_dim 1) only: not on
    its bias, not on other layers (MLP and LSTM)."""
    import pyreg
    from pyreg.demo.study import MLP, LSTMClassifier, build_groups

    for model in (MLP(128, 4), LSTMClassifier(6, 2, hidden=16)):
        groups = build_groups(model, "group", 0.3)
        with_group = [(n, g["group_l1"], g["group_dim"]) for g in groups if g.get("group_l1")
                      for n in g["param_names"]]
        rows = model.get_parameter(model.input_weight).shape[0]
        assert with_group == [(model.input_weight, pytest.approx(0.3 * rows ** 0.5), 1)], with_group
        for g in groups:
            if g.get("group_l1"):
                continue
            for n in g["param_names"]:
                assert g["l2"] == (0.0 if "bias" in n else pytest.approx(0.15)), (n, g["l2"])
        opt = pyreg.Regularized(torch.optim.SGD(groups, lr=0.1), mode="proximal")  # a valid optimizer
        assert opt.param_groups


def test_related_tasks():
    """The fine-tuning data: same inputs and standardization, labels kept for
    all classes but the last, which is split in two halves."""
    import numpy as np

    from pyreg.demo.data import related_tasks

    old, new = related_tasks(8, 20, (300, 100, 100), (60, 100, 200), seed=3)
    assert old.num_classes == 4 and new.num_classes == 5 and old.num_features == new.num_features == 28
    assert (len(old.x_train), len(new.x_train), len(new.x_test)) == (300, 60, 200)
    assert sorted(set(new.y_test.tolist())) == [0, 1, 2, 3, 4] and sorted(set(old.y_test.tolist())) == [0, 1, 2, 3]
    # one standardization, from the old training split
    assert np.allclose(old.x_train.mean(0), 0, atol=1e-5) and not np.allclose(new.x_train.mean(0), 0, atol=1e-5)
    # class 3 of the old task splits into 3 and 4 along informative column 0
    y = new.y_test
    assert (new.x_test[y == 4, 0].min() > new.x_test[y == 3, 0].max())
    # disjoint samples
    rows = {tuple(r) for r in old.x_train.tolist()}
    assert not any(tuple(r) in rows for r in new.x_train.tolist())


def test_finetune_table(quick):
    """The fine-tuning table: the pre-trained model, none, L2 and L2-SP with new-
    and old-task accuracies; L2-SP (toward the pre-trained weights) forgets the
    old task less than none and L2 and does at least as well on the new one."""
    out, data = quick
    rows = data["finetune"]
    assert [(r["method"], r["alpha"]) for r in rows] == [("pretrained", 0.0)] + list(
        plan_runs(FINETUNE_METHODS, FINETUNE_ALPHAS))
    assert set(FINETUNE_METHODS) == {"none", "l2", "l2-sp"}
    for r in rows[1:]:
        for key in ("new_train_acc", "new_val_acc", "new_test_acc", "old_test_acc", "drift"):
            assert 0.0 <= r[key] <= (1.0 if key != "drift" else 10.0), (r, key)
    with open(out / "finetune.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["alpha"])) for r in csv_rows] == [(r["method"], r["alpha"]) for r in rows]
    assert [float(r["old_test_acc"]) for r in csv_rows] == [r["old_test_acc"] for r in rows]
    win = {r["method"]: r for r in rows[1:] if r["selected"]}
    assert sorted(win) == sorted(FINETUNE_METHODS)  # one winner per method
    for m in FINETUNE_METHODS:
        assert win[m]["new_val_acc"] == max(r["new_val_acc"] for r in rows if r["method"] == m)
    pre, none, l2, sp = rows[0], win["none"], win["l2"], win["l2-sp"]
    msg = f"pretrained {pre}\nnone {none}\nl2 {l2}\nl2-sp {sp}"
    assert pre["old_test_acc"] > 0.85, msg
    assert none["old_test_acc"] < pre["old_test_acc"] - 0.1, msg  # fine-tuning forgets
    assert sp["old_test_acc"] > max(none["old_test_acc"], l2["old_test_acc"]) + 0.1, msg
    assert sp["new_test_acc"] >= max(none["new_test_acc"], l2["new_test_acc"]) - 0.02, msg
    assert sp["drift"] < none["drift"], msg


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

    def total(r):
        return sum(r["layers"][n]["l2_norm"] ** 2 for n in weights)

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
    first = [r for r in data["results"] if r["task"] in STUDY and r["method"] == "l1"
             and r["alpha"] == max(QUICK_ALPHAS)]
    assert [r for r in again if r["task"] in STUDY] == first
    assert [r for r in again if r["task"] not in STUDY] == [r for r in data["results"] if r["task"] not in STUDY]


@pytest.mark.parametrize("args, needle", [
    (["--methods", "l1,lasso"], "--methods"),
    (["--alphas", "0.1,-1"], "--alphas"),
    (["--alphas", "nan"], "--alphas"),
    (["--seed", "1.5"], "--seed"),
    (["--seed", str(2 ** 32)], "--seed"),  # scikit-learn's generators take 32-bit seeds
    (["--device", "tpu"], "--device"),
])
def test_bad_arguments(tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(out)] + args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("tool", ["demo", "bench"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_folder_that_cannot_be_made_stops_before_the_run(tmp_path, capsys, tool, where):
    f = tmp_path / "afile"
    f.write_text("x")
    out = f if where == "a file" else f / "sub"
    args = ["--quick", "--device", "cpu", "--out", str(out)]
    args += ["--methods", "none"] if tool == "demo" else ["--shapes", "mlp", "--ops", "weight_stats"]
    with pytest.raises(SystemExit) as e:
        cli.main([tool] + args)
    assert e.value.code == 2
    err = capsys.readouterr()
    assert "argument --out: cannot make the folder" in err.err
    assert "pyreg demo:" not in err.out and "weight_stats" not in err.out  # (nothing ran)
    assert f.read_text() == "x"


@pytest.mark.parametrize("tool", ["demo", "bench"])
def test_an_output_folder_that_refuses_files_stops_before_the_run(tmp_path, capsys, monkeypatch, tool):
    """A folder that passes the access check but refuses a new file (a file
    system of its own, such as /sys) stops the tool before its run."""
    import pyreg._argtypes

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pyreg._argtypes.tempfile, "mkstemp", refuse)
    args = ["--quick", "--device", "cpu", "--out", str(tmp_path)]
    args += ["--methods", "none"] if tool == "demo" else ["--shapes", "mlp", "--ops", "weight_stats"]
    with pytest.raises(SystemExit) as e:
        cli.main([tool] + args)
    assert e.value.code == 2
    err = capsys.readouterr()
    assert f"argument --out: cannot write files into {str(tmp_path)!r} (Permission denied)" in err.err
    assert "weight_stats" not in err.out and not os.listdir(tmp_path)


def test_a_result_file_that_cannot_be_written_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    import pyreg.demo

    def study(*a, **k):  # (the run, then its files: a full disk)
        raise pyreg.demo.output_error(OSError(28, "No space left on device", str(tmp_path / "results.csv")))

    monkeypatch.setattr(pyreg.demo, "_study", study)
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"pyreg demo: cannot write {tmp_path / 'results.csv'}: No space left on device\n"


def test_cuda_unavailable(tmp_path, capsys):
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


def test_group_winner_is_compacted(quick):
    """The demo compacts the group-lasso winner: the MLP keeps exactly its
    informative inputs, with fewer parameters and the same outputs (checked
    inside pyreg.compact)."""
    _, data = quick
    rows = {c["task"]: c for c in data["compact"]}
    mlp = rows["mlp"]
    winner = _run(data, "mlp", "group", mlp["alpha"])[0]
    assert mlp["num_inputs"] == 128 and len(mlp["inputs_kept"]) == winner["inputs_used"]
    assert mlp["params_after"] < mlp["params_before"] and mlp["macs_after"] < mlp["macs_before"]
    assert set(mlp["inputs_kept"]) == set(range(8))  # the informative ones
    assert mlp["latency"] == {}  # not timed by the demo (its CPU paths are fixed for the numbers): see the bench


# --------------------------------------------------------------------------
# The real-data tasks (scikit-learn's bundled breast cancer and digits sets)
# --------------------------------------------------------------------------
def _winner(data, task, method):
    ws = [w for w in data["winners"] if w["task"] == task and w["method"] == method]
    assert len(ws) == 1, (task, method)
    return _run(data, task, method, ws[0]["alpha"])[0]


def _cancer_msg(data):
    return "\n".join(f"{r['task']} {r['method']} {r['alpha']}: val {r['val_acc']:.3f} kept {r['inputs_used']} "
                     f"noise0 {r['noise_zeroed']} prec {r['precision']:.2f} large {r['kept_large_scale']}"
                     for r in data["results"] if r["task"].startswith("cancer"))


def test_breast_cancer_data():
    """30 real features on scales five orders of magnitude apart, then noise inputs that are
    shuffled copies of them (same scales); standardized from the training split."""
    import numpy as np

    from pyreg.demo.data import breast_cancer, feature_scales

    raw = breast_cancer(30, (250, 150, 169), seed=0, standardize=False)
    std = breast_cancer(30, (250, 150, 169), seed=0, standardize=True)
    assert raw.num_features == std.num_features == 60 and raw.informative == list(range(30))
    scales = np.array(feature_scales(raw))
    assert scales[:30].max() / scales[:30].min() > 1e5
    both = np.concatenate([raw.x_train, raw.x_val, raw.x_test])
    assert np.allclose(np.sort(both[:, 30:], 0), np.sort(both[:, :30], 0))  # same values per column
    assert np.allclose(std.x_train.mean(0), 0, atol=1e-4) and np.allclose(std.x_train.std(0, correction=0), 1, atol=1e-3)
    assert torch.equal(raw.y_test, std.y_test)


def test_cancer_raw_selection_follows_the_scale(quick):
    """On raw inputs the penalties keep what is large, not what is informative:
    every raw run that drops most inputs keeps only inputs of the larger-scale
    half, and at least half of those it keeps are noise."""
    _, data = quick
    msg = _cancer_msg(data)
    selective = [r for r in _run(data, "cancer-raw", "l1") + _run(data, "cancer-raw", "group")
                 if r["inputs_used"] <= 20]
    assert len(selective) >= 2, msg
    for r in selective:
        assert r["inputs_used"] > 0 and r["kept_large_scale"] == r["inputs_used"], msg
        assert r["precision"] <= 0.5, msg


def test_cancer_standardized_group_lasso_removes_the_noise(quick):
    """On standardized inputs group lasso zeroes every noise input and keeps
    only real features, validating as well as no penalty; its grid winner
    zeroes many more noise inputs than the raw run's; standardizing also helps
    the unpenalized net."""
    _, data = quick
    msg = _cancer_msg(data)
    none_std, none_raw = _run(data, "cancer-std", "none")[0], _run(data, "cancer-raw", "none")[0]
    clean = [r for r in _run(data, "cancer-std", "group")
             if r["noise_zeroed"] == r["num_noise"] and r["val_acc"] >= none_std["val_acc"] - 0.02]
    assert clean, msg
    for r in clean:
        assert r["precision"] == 1.0 and r["inputs_used"] >= 3, msg
        assert r["kept_large_scale"] <= 0.75 * r["inputs_used"], msg  # scale no longer decides
    assert (_winner(data, "cancer-std", "group")["noise_zeroed"]
            >= _winner(data, "cancer-raw", "group")["noise_zeroed"] + 10), msg
    assert none_std["val_acc"] >= none_raw["val_acc"] + 0.02, msg


def test_digits_picture(quick):
    """digits_pixels.png: one 8 x 8 panel per digits method (no penalty, the L1
    and group lasso winners, target_sparsity), side by side."""
    import struct

    from pyreg.demo.report import PANEL_INCHES, PNG_DPI

    out, data = quick
    wins = {m: _winner(data, "digits", m) for m in DIGITS["methods"]}
    drawn = [m for m in DIGITS["methods"] if m not in ("strength", "group-strength", "path")]  # in the tables only
    assert data["config"]["digits_pixels_panels"] == [
        m if m in ("none", "target") else f"{m} alpha={wins[m]['alpha']:g}" for m in drawn]
    with open(out / "digits_pixels.png", "rb") as f:
        head = f.read(24)
    width, height = struct.unpack(">II", head[16:24])
    assert width == round(PANEL_INCHES * len(drawn) * PNG_DPI) and width > 3 * height
    for m in ("l1", "group"):
        w = wins[m]
        assert len(w["input_weight_norms"]) == 64 and w["inputs_used"] < 64, m
        assert w["test_acc"] >= 0.9 and w["test_acc"] >= wins["none"]["test_acc"] - 0.02, (m, w["test_acc"])
    # group lasso zeroes whole pixels: fewer pixels kept than L1's winner, at a lower sparsity overall
    assert wins["group"]["inputs_used"] <= wins["l1"]["inputs_used"] - 4
    assert wins["group"]["sparsity"] < wins["l1"]["sparsity"]


def test_digits_target_sparsity(quick):
    """target_sparsity: each targeted layer ends within 1 point of its target,
    untargeted weights stay dense, accuracy holds."""
    _, data = quick
    r = _run(data, "digits", "target")[0]
    none = _run(data, "digits", "none")[0]
    assert r["targets"] == {f"{k}.weight": v for k, v in DIGITS["targets"].items()}
    for name, t in r["targets"].items():
        assert abs(r["layers"][name]["sparsity"] - t) <= 0.01, (name, r["layers"][name]["sparsity"], t)
    assert r["layers"]["4.weight"]["sparsity"] == 0.0
    assert r["val_acc"] >= none["val_acc"] - 0.03, (r["val_acc"], none["val_acc"])



def test_strength_runs_once_per_task_with_its_table(quick, capsys):
    """``strength`` and ``group-strength``: one run per task at STRENGTH /
    GROUP_STRENGTH (l1_strength: zeros in each weight, comparable across
    layers; group_strength: whole input columns of the first layer only),
    and the table against the grid of the same penalty, whose numbers are
    the rows'."""
    from pyreg.demo.report import format_strength_table
    from pyreg.demo.study import GROUP_STRENGTH, STRENGTH

    _, data = quick
    tasks = ["mlp", "lstm", "cancer-raw", "cancer-std", "digits"]
    for task in tasks:
        for method, s in (("strength", STRENGTH), ("group-strength", GROUP_STRENGTH)):
            rows = _run(data, task, method)
            assert len(rows) == 1 and rows[0]["alpha"] == s, (task, method)
    r = _run(data, "mlp", "strength")[0]
    per_layer = [v["sparsity"] for k, v in r["layers"].items() if k.endswith("weight")]
    assert min(per_layer) > 0.2 and max(per_layer) < 3 * min(per_layer), per_layer
    g = _run(data, "mlp", "group-strength")[0]
    assert g["inputs_used"] < g["num_informative"] + g["num_noise"]  # whole inputs dropped
    assert g["layers"]["2.weight"]["sparsity"] == 0.0 and g["layers"]["4.weight"]["sparsity"] == 0.0
    table = format_strength_table(data["results"]).splitlines()
    assert [ln.split()[:2] for ln in table[2:]] == [[t, m] for t in tasks
                                                    for m in ("strength", "group-strength", "path")]
    for line, (method, grid_method) in zip(table[2:4], (("strength", "l1"), ("group-strength", "group"))):
        cells = line.split()
        rule = _run(data, "mlp", method)[0]
        grid = [x for x in data["results"] if x["task"] == "mlp" and x["method"] == grid_method]
        best = max(grid, key=lambda x: (x["val_acc"], x["alpha"]))
        assert cells[3] == "1" and cells[4] == f"{rule['val_acc']:.3f}"  # one run
        assert cells[7] == grid_method and cells[9] == str(len(grid)) and cells[10] == f"{best['val_acc']:.3f}"
        assert cells[-1] == f"{100 * (rule['val_acc'] - best['val_acc']):+.1f}"


def test_strength_table_without_its_grid(quick):
    """A method whose grid did not run (``--methods path``) keeps its row,
    its own numbers and the grid's columns marked not run."""
    from pyreg.demo.report import format_strength_table

    _, data = quick
    rows = [r for r in data["results"] if r["method"] in ("strength", "path")]
    table = format_strength_table(rows).splitlines()
    assert [ln.split()[:2] for ln in table[2:]] == [[r["task"], r["method"]] for r in rows]
    for line, r in zip(table[2:], rows):
        cells = line.split()
        assert f"{r['val_acc']:.3f}" in cells and "(not run)" in line and cells[-1] == "-"


def test_stale_outputs_removed(tmp_path, capsys, monkeypatch):
    """A run removes the demo's optional outputs it did not write (an
    earlier run's --full grid, fine-tuning or pixel files, or its path plot
    where no method run has an alpha), and nothing else in the folder."""
    from pyreg.demo import report

    out = tmp_path / "o"
    out.mkdir()
    for name in ("layer_grid.json", "finetune.csv", "digits_pixels.png", "regularization_path.png", "notes.txt"):
        (out / name).write_text("an earlier run's")
    report.drop_stale(str(out / "missing.json"))  # (nothing there: nothing to do)
    _no_aeon(monkeypatch)
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--methods", "none",
                     "--alphas", "0.3"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "layer_grid.json" not in names
    assert "regularization_path.png" not in names  # (no method with an alpha: no empty plot)
    data = json.loads((out / "results.json").read_text())
    assert ("finetune.csv" in names) == bool(data["finetune"])
    assert ("digits_pixels.png" in names) == ("digits_pixels_panels" in data["config"])
    assert (out / "finetune.csv").read_text() != "an earlier run's" if "finetune.csv" in names else True


def test_path_runs_the_grid_once_and_keeps_its_best_fit(quick):
    """``path`` on grids of fewer than 8 alphas: one run's steps per task
    over the task's grid, smallest alpha first; the row is the fit with the
    best validation accuracy (ties to the larger alpha), its alpha the one
    picked; the strength table compares it with the L1 grid's winner."""
    from pyreg.demo.report import format_strength_table

    _, data = quick
    grids = {"mlp": QUICK_ALPHAS, "lstm": QUICK_ALPHAS, "cancer-raw": CANCER["alphas"],
             "cancer-std": CANCER["alphas"], "digits": DIGITS["alphas"]}
    for task, grid in grids.items():
        rows = _run(data, task, "path")
        assert len(rows) == 1, task
        r = rows[0]
        assert [p["alpha"] for p in r["path"]] == sorted(grid) and 0.9 < r["runs"] <= 1, task  # (steps // alphas)
        best = max(r["path"], key=lambda p: (p["val_acc"], p["alpha"]))
        assert r["alpha"] == best["alpha"] and r["l1"] == best["alpha"], (task, r["alpha"], r["path"])
        weights = [v for name, v in r["layers"].items() if "weight" in name]  # what the path regularized
        zeros = 1 - sum(v["nonzero"] for v in weights) / sum(v["numel"] for v in weights)
        assert r["val_acc"] == best["val_acc"] and zeros == pytest.approx(best["sparsity"], abs=1e-12), task
    line = next(ln for ln in format_strength_table(data["results"]).splitlines()
                if ln.split()[:2] == ["digits", "path"])
    r = _run(data, "digits", "path")[0]
    grid = [x for x in data["results"] if x["task"] == "digits" and x["method"] == "l1"]
    best = max(grid, key=lambda x: (x["val_acc"], x["alpha"]))
    cells = line.split()
    assert cells[2:6] == ["alpha", f"{r['alpha']:g}", "1", f"{r['val_acc']:.3f}"] and cells[8] == "l1"
    assert cells[-1] == f"{100 * (r['val_acc'] - best['val_acc']):+.1f}"


def test_path_spreads_one_runs_steps_over_the_grid():
    """train_path: a fresh optimizer per alpha, in increasing order, each
    with the task's L1 at that alpha on the weights, and steps // len(grid)
    steps each: no more steps than one run."""
    import pyreg
    from pyreg.demo import make_real_tasks
    from pyreg.demo.study import Task, train_path

    _, digits = make_real_tasks(0)
    made, steps = [], []

    def factory(groups):
        opt = pyreg.optim.SGD(groups, lr=0.1, momentum=0.9)
        made.append(opt)
        opt.register_step_post_hook(lambda o, a, k: steps.append(len(made)))
        return opt

    task = Task("digits", digits.data, digits.make_model, factory, 50)
    model, groups, alpha, trace, runs = train_path(task, [0.1, 0.01, 0.03], 0, torch.device("cpu"))
    assert [g["l1"] for o in made for g in o.param_groups if g["param_names"][0].endswith("weight")] == [
        0.01, 0.03, 0.1]
    assert [g["l1"] for o in made for g in o.param_groups if g["param_names"][0].endswith("bias")] == [0.0] * 3
    assert steps == [1] * 16 + [2] * 16 + [3] * 16  # 50 // 3 each
    assert [p["alpha"] for p in trace] == [0.01, 0.03, 0.1] and alpha in (0.01, 0.03, 0.1)
    assert {n for g in groups for n in g["param_names"]} == {n for n, _ in model.named_parameters()}
    assert runs == 48 / 50


def test_path_on_a_grid_of_8_alphas_or_more_refits_at_its_1se_alpha(monkeypatch):
    """With a fifth of the grid's runs (10 alphas: 2 runs) holding one run
    more, train_path runs the path in what that run leaves (steps // len(grid)
    each), picks the largest alpha within one standard error of the best
    validation accuracy, and returns the task's own run at that alpha from
    the same initial weights (its bits)."""
    import pyreg
    from pyreg.demo import make_real_tasks
    from pyreg.demo.study import Task, train_model, train_path

    _, digits = make_real_tasks(0)
    made, steps, picked = [], [], []

    def factory(groups):
        opt = pyreg.optim.SGD(groups, lr=0.1, momentum=0.9)
        made.append(opt)
        opt.register_step_post_hook(lambda o, a, k: steps.append(len(made)))
        return opt

    real_path = pyreg.path

    def spy(*args, **kwargs):
        res = real_path(*args, **kwargs)
        picked.append((kwargs["select"], res.alphas[res.index_1se], res.rows))
        return res

    monkeypatch.setattr(pyreg, "path", spy)
    task = Task("digits", digits.data, digits.make_model, factory, 50)
    grid = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    model, groups, alpha, trace, runs = train_path(task, grid, 0, torch.device("cpu"))
    assert steps == [i for i in range(1, 11) for _ in range(5)] + [11] * 50 and runs == 2.0
    select, one_se, rows = picked[0]
    assert select == "1se" and pyreg.from_sklearn(alpha, 1.0)[0] == one_se
    assert [p["alpha"] for p in trace] == grid and alpha < max(grid)  # (the largest alphas kill the network)
    monkeypatch.setattr(pyreg, "path", real_path)
    made.clear()
    again, _ = train_model(task, "l1", alpha, 0, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# --------------------------------------------------------------------------
# The sequence task (JapaneseVowels, read from the aeon package's .ts files)
# --------------------------------------------------------------------------
TS_SNIPPET = """# a comment
#another one
@problemName Tiny
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b
@data
1,2,3:4,5,6:a

0.5,-1.25:1e-3,7:b
"""


def test_read_ts_values_labels_and_lengths(tmp_path):
    """The .ts reader: comments and blank lines skipped, header keys in any
    case, one [length, channels] array per series, labels as declared;
    pad_series right-aligns with zeros in front."""
    import numpy as np

    from pyreg.demo.data import pad_series, read_ts

    path = tmp_path / "tiny.ts"
    path.write_text(TS_SNIPPET.replace("@equalLength", "@EQUALLENGTH"))
    ts = read_ts(path)
    assert ts.labels == ["a", "b"] and ts.class_labels == ["a", "b"] and ts.lengths == [3, 2]
    assert ts.num_channels == 2 and ts.header["problemname"] == "Tiny"
    assert np.array_equal(ts.series[0], [[1, 4], [2, 5], [3, 6]])
    assert np.array_equal(ts.series[1], [[0.5, 1e-3], [-1.25, 7]])
    padded = pad_series(ts.series, 4)
    assert padded.shape == (2, 4, 2)
    assert np.array_equal(padded[1], [[0, 0], [0, 0], [0.5, 1e-3], [-1.25, 7]])
    assert np.array_equal(padded[0, 1:], ts.series[0]) and not padded[0, 0].any()
    with pytest.raises(ValueError, match="longer"):
        pad_series(ts.series, 2)
    assert read_ts("given", text=TS_SNIPPET).lengths == [3, 2]  # from text
    univariate = TS_SNIPPET.replace("@univariate false", "@univariate true").replace("@dimensions 2", "@dimensions 1")
    one = read_ts("u", text=univariate.replace(":4,5,6", "").replace(":1e-3,7", ""))
    assert one.num_channels == 1 and np.array_equal(one.series[1][:, 0], [0.5, -1.25])


@pytest.mark.parametrize("change, match", [
    (("@missing false", "@missing false\n@targetlabel true"), "unsupported header @targetlabel"),
    (("@timeStamps false", "@timeStamps true"), "timeStamps"),
    (("@missing false", "@missing true"), "missing"),
    (("@equalLength false", "@equalLength yes"), "true or false"),
    (("@equalLength false", "@equalLength true"), "equalLength true"),
    (("@univariate false", "@univariate true"), "univariate true"),
    (("@dimensions 2", "@dimensions 3"), "dimensions 3"),
    (("@classLabel true a b", "@classLabel false"), "classLabel"),
    (("@classLabel true a b", "@classLabel true a"), r"\['b'\]"),
    (("4,5,6:a", "4,?,6:a"), "not a number"),
    (("4,5,6:a", "4,5:a"), "differ in length"),
    (("1,2,3:4,5,6:a", "1,2,3:a"), "numbers of channels"),
    (("1,2,3:4,5,6:a", "1,2,3"), "no ':'"),
    (("@data\n", "@data\n@problemName again\n"), "header line after @data"),
    (("@data\n1,2,3:4,5,6:a\n\n0.5,-1.25:1e-3,7:b\n", ""), "no @data"),
    (("@problemName Tiny", "problemName Tiny"), "expected a header line"),
    (("@problemName Tiny", "@problemName Tiny\n@problemName Twice"), "twice"),
])
def test_read_ts_rejects(change, match):
    from pyreg.demo.data import read_ts

    text = TS_SNIPPET.replace(*change)
    assert text != TS_SNIPPET
    with pytest.raises(ValueError, match=match):
        read_ts("bad.ts", text=text)
    with pytest.raises(ValueError, match="no series"):
        read_ts("empty.ts", text=TS_SNIPPET.split("@data")[0] + "@data\n")


def write_synthetic_vowels(root, seed=0, n_train=60, n_test=60, channels=4, classes=3):
    """A small stand-in for aeon's JapaneseVowels files under ``root`` (an aeon
    package folder): variable-length series whose class raises one channel
    and shifts the last; not standardized."""
    import numpy as np

    folder = root / "datasets" / "data" / "JapaneseVowels"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for part, n in (("TRAIN", n_train), ("TEST", n_test)):
        lines = ["# synthetic", "@problemName JapaneseVowels", "@timeStamps false", "@missing false",
                 "@univariate false", f"@dimensions {channels}", "@equalLength false",
                 "@classLabel true " + " ".join(str(k + 1) for k in range(classes)), "@data"]
        for i in range(n):
            k = i % classes
            x = rng.standard_normal((int(rng.integers(5, 10)), channels)) + 3.0 + 0.5 * np.arange(channels)
            x[:, k % channels] += 2.0
            x[:, channels - 1] += k - 1
            lines.append(":".join(",".join(f"{v:.5f}" for v in x[:, c]) for c in range(channels)) + f":{k + 1}")
        (folder / f"JapaneseVowels_{part}.ts").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def synthetic_aeon(tmp_path_factory):
    return write_synthetic_vowels(tmp_path_factory.mktemp("site") / "aeon")


@pytest.fixture(scope="module")
def vowels_root(synthetic_aeon):
    """(aeon package folder, whether it holds the real data): the folder named
    by PYREG_TEST_AEON_DIR (e.g. an unpacked aeon wheel), else the installed
    aeon's, else the synthetic stand-in."""
    from pyreg.demo.data import sequence_data_dir

    env = os.environ.get("PYREG_TEST_AEON_DIR")
    if env:
        assert sequence_data_dir("JapaneseVowels", env) is not None, env
        return env, True
    found = sequence_data_dir("JapaneseVowels")
    if found is not None:
        return found.parents[2], True
    return synthetic_aeon, False


def test_sequence_data_dir(synthetic_aeon, tmp_path, monkeypatch):
    """Found in the aeon package folder, given or located with find_spec
    (aeon is not imported); None when aeon or the files are missing."""
    import importlib.util
    import sys

    from pyreg.demo.data import sequence_data_dir

    folder = synthetic_aeon / "datasets" / "data" / "JapaneseVowels"
    assert sequence_data_dir("JapaneseVowels", synthetic_aeon) == folder
    assert sequence_data_dir("BasicMotions", synthetic_aeon) is None
    assert sequence_data_dir("JapaneseVowels", tmp_path) is None
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(synthetic_aeon))
    assert sequence_data_dir("JapaneseVowels") == folder
    assert "aeon" not in sys.modules or sys.modules["aeon"].__spec__ is not None
    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(None))
    assert sequence_data_dir("JapaneseVowels") is None


def test_japanese_vowels_data(vowels_root):
    """Training split from the TRAIN file, validation and test halves of the
    TEST file; real channels standardized on the training frames, noise
    channels appended, every series right-aligned with zeros in front."""
    import numpy as np

    from pyreg.demo.data import japanese_vowels, read_ts

    root, real = vowels_root
    d = japanese_vowels(5, seed=1, root=root)
    folder = Path(root) / "datasets" / "data" / "JapaneseVowels"
    train, test = read_ts(folder / "JapaneseVowels_TRAIN.ts"), read_ts(folder / "JapaneseVowels_TEST.ts")
    channels = train.num_channels
    length = max(train.lengths + test.lengths)
    if real:
        assert (channels, len(train.series), len(test.series), length) == (12, 270, 370, 29)
        assert train.class_labels == [str(k) for k in range(1, 10)]
    assert d.num_features == channels + 5 and d.informative == list(range(channels))
    assert d.num_classes == len(train.class_labels)
    assert d.x_train.shape == (len(train.series), length, channels + 5)
    assert len(d.x_val) + len(d.x_test) == len(test.series) and abs(len(d.x_val) - len(d.x_test)) <= 1
    # labels in file order on the training split
    assert d.y_train.tolist() == [train.class_labels.index(lab) for lab in train.labels]
    # right-aligned: the frames before a series' start are zero in every channel
    x = d.x_train.numpy()
    for i, n in enumerate(train.lengths):
        assert not x[i, :length - n].any() and (x[i, length - n:, channels:] != 0).all()
    # the real channels: the file's values, standardized over the training frames
    frames = np.concatenate(train.series)
    got = np.concatenate([x[i, length - n:, :channels] for i, n in enumerate(train.lengths)])
    assert np.allclose(got, (frames - frames.mean(0)) / frames.std(0), atol=1e-5)
    assert np.allclose(got.mean(0), 0, atol=1e-5) and np.allclose(got.std(0), 1, atol=1e-4)
    again = japanese_vowels(5, seed=1, root=root)
    assert torch.equal(again.x_val, d.x_val) and torch.equal(again.y_test, d.y_test)
    other = japanese_vowels(5, seed=2, root=root)
    assert not torch.equal(other.y_val, d.y_val)  # the validation / test split is seeded


def test_vowels_group_lasso_zeroes_the_noise_channels(vowels_root):
    """The claim: group lasso over the LSTM's input channels zeroes the
    whole column of every noise channel at its grid winner and keeps the
    real channels, validating about as well as no penalty; no penalty
    zeroes nothing."""
    import io

    from pyreg.demo import run_vowels
    from pyreg.demo.report import Progress

    root, real = vowels_root
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, winners = run_vowels(0, torch.device("cpu"), Progress(io.StringIO()), root=root)
    finally:
        torch.set_num_threads(threads)
    assert [(r["method"], r["alpha"]) for r in rows] == plan_runs(VOWELS["methods"], VOWELS["alphas"])
    win = {w["method"]: w for w in winners}
    msg = "\n".join(f"{r['method']} {r['alpha']}: val {r['val_acc']:.3f} real {r['informative_kept']}/"
                    f"{r['num_informative']} noise0 {r['noise_zeroed']}/{r['num_noise']}" for r in rows)
    none, group = win["none"], win["group"]
    assert none["noise_zeroed"] == 0 and none["sparsity"] == 0.0, msg
    assert group["num_noise"] == VOWELS["num_noise"], msg
    assert group["noise_zeroed"] == group["num_noise"], msg
    assert group["informative_kept"] >= group["num_informative"] - (2 if real else 0), msg
    assert group["val_acc"] >= none["val_acc"] - 0.03, msg
    norms = group["input_weight_norms"]
    assert all(v == 0.0 for v in norms[group["num_informative"]:]), msg
    if real:  # JapaneseVowels: no run of L1 zeroes every noise channel
        assert all(r["noise_zeroed"] < r["num_noise"] for r in rows if r["method"] == "l1"), msg
        assert none["val_acc"] >= 0.9, msg


def test_demo_runs_the_vowels_task_when_the_data_is_found(synthetic_aeon, tmp_path, capsys, monkeypatch):
    """With aeon's data found (find_spec, aeon not imported) the demo runs the
    vowels task: its table and winners printed, its rows after the real-data
    tasks' in results.json and results.csv, its settings in the config."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", _fake_find_spec(synthetic_aeon))
    out = tmp_path / "seq"
    assert cli.main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--methods", "none",
                     "--alphas", "0.3"]) == 0
    text = capsys.readouterr().out
    assert VOWELS_SKIPPED not in text and "JapaneseVowels" in text and "Sequence winners" in text
    printed = [ln.split()[:3] for ln in text.splitlines() if ln.startswith("vowels ")]
    assert printed == [["vowels", m, "-" if m == "none" else f"{a:g}"]
                       for m, a in plan_runs(VOWELS["methods"], VOWELS["alphas"])]
    with open(out / "results.json") as f:
        data = json.load(f)
    rows = [r for r in data["results"] if r["task"] == "vowels"]
    assert [(r["method"], r["alpha"]) for r in rows] == plan_runs(VOWELS["methods"], VOWELS["alphas"])
    assert data["results"][-len(rows):] == rows
    assert sorted(w["method"] for w in data["winners"] if w["task"] == "vowels") == sorted(VOWELS["methods"])
    assert data["config"]["vowels"]["num_noise"] == VOWELS["num_noise"]
    for r in rows:
        assert (r["num_informative"], r["num_noise"]) == (4, VOWELS["num_noise"])
    with open(out / "results.csv") as f:
        assert sum(r["task"] == "vowels" for r in csv.DictReader(f)) == len(rows)


# --------------------------------------------------------------------------
# The CPU code paths the demo fixes, so that its numbers do not depend on the CPU
# --------------------------------------------------------------------------
_PATHS = """
import json, os, sys, torch
from pyreg.demo import fixed_cpu_paths
if sys.argv[1] == "after-an-op":
    torch.ones(3).sum()
if sys.argv[1] == "native":
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
else:
    with fixed_cpu_paths() as paths:
        pass
    print(json.dumps(paths))
"""


def _paths_in_a_new_process(tmp_path, mode, **env):
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    r = subprocess.run([sys.executable, "-c", _PATHS, mode], capture_output=True, text=True, cwd=tmp_path,
                       env={**clean, **env}, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _avx2_x86():
    import platform

    from pyreg.demo import _avx2_fma

    return platform.machine().lower() in ("x86_64", "amd64") and _avx2_fma()


@pytest.mark.skipif(not _avx2_x86(), reason="the paths are fixed on x86-64 CPUs with AVX2 and FMA")
def test_the_demo_fixes_torchs_cpu_paths_before_its_first_op(tmp_path):
    """In a new process: torch's vectorized kernels at AVX2 and MKL on its
    vendor-independent branch; variables the user set are kept; in a process
    that already ran an op, the record says the capability in effect (the
    CPU's own)."""
    assert _paths_in_a_new_process(tmp_path, "first") == {
        "capability": "AVX2", "mkl_cbwr": "COMPATIBLE", "onednn": False, "threads": 1}
    default = _paths_in_a_new_process(tmp_path, "native", ATEN_CPU_CAPABILITY="default")["capability"]
    assert default in ("DEFAULT", "NO AVX")  # (its name in torch 2.13; in 2.7)
    assert _paths_in_a_new_process(tmp_path, "first", ATEN_CPU_CAPABILITY="default", MKL_CBWR="AUTO") == {
        "capability": default, "mkl_cbwr": "AUTO", "onednn": False, "threads": 1}
    native = _paths_in_a_new_process(tmp_path, "native")["capability"]
    assert _paths_in_a_new_process(tmp_path, "after-an-op")["capability"] == native


def test_fixed_cpu_paths_leaves_the_environment_as_it_was(monkeypatch):
    """Processes started after the demo do not inherit its variables; one the
    user set is kept, inside and after."""
    from pyreg.demo import fixed_cpu_paths

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    with fixed_cpu_paths() as paths:
        assert paths["mkl_cbwr"] == "AUTO" and os.environ["MKL_CBWR"] == "AUTO"
        assert os.environ.get("ATEN_CPU_CAPABILITY") == ("avx2" if _avx2_x86() else None)
    assert "ATEN_CPU_CAPABILITY" not in os.environ and os.environ["MKL_CBWR"] == "AUTO"


def test_cpu_training_restores_threads_and_onednn():
    from pyreg.demo import cpu_training

    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_training(torch.device("cpu")):
            assert torch.get_num_threads() == 1 and not torch.backends.mkldnn.enabled
            raise RuntimeError("inside")
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)
    with cpu_training(torch.device("cuda")):  # (nothing to fix on a GPU: not even CUDA is needed for this)
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)
