"""``pyreg.path``: the regularization path. Parity with scikit-learn's
``lasso_path`` / ``enet_path`` (proximal gradient with warm starts on a
linear model reaches coordinate descent's coefficients and exact zeros), the
grid, warm starts, selection, data forms, argument checks, the result's
table, dict, plot and models, and that ``import pyreg`` stays light."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pyreg
from pyreg.path import PathResult, _evaluate, _select

N, P = 60, 12


def _data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, P))
    beta = np.zeros(P)
    beta[:4] = [2.0, -1.5, 1.0, 0.5]
    y = X @ beta + 0.5 * rng.standard_normal(N)
    return X, y


def _half_mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def _linear(p=P):
    m = nn.Linear(p, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(m.weight)
    return m


def _ista(X):
    L = float(np.linalg.eigvalsh(X.T @ X / X.shape[0]).max())
    return lambda g: pyreg.optim.SGD(g, lr=1.0 / L)


def _mlp(p=P, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(p, 8), nn.ReLU(), nn.Linear(8, 1))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------
# 1. Parity with scikit-learn
# --------------------------------------------------------------------------
def _sklearn_grid(X, y, l1_ratio, n_alphas, eps):
    try:
        from sklearn.linear_model._coordinate_descent import _alpha_grid

        return np.asarray(_alpha_grid(X, y, l1_ratio=l1_ratio, fit_intercept=False, eps=eps, n_alphas=n_alphas))
    except (ImportError, TypeError):  # another scikit-learn: its path's own default grid
        from sklearn.linear_model import enet_path

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return enet_path(X, y, l1_ratio=l1_ratio, eps=eps, n_alphas=n_alphas)[0]


@pytest.mark.parametrize("method,l1_ratio", [("l1", 1.0), ("elastic_net", 0.5)])
def test_matches_sklearn_path(method, l1_ratio):
    from sklearn.linear_model import enet_path

    X, y = _data()
    model = _linear()
    result = pyreg.path(model, _half_mse, (torch.tensor(X), torch.tensor(y)), method=method, l1_ratio=l1_ratio,
                        n_alphas=10, eps=1e-3, optimizer=_ista(X), epochs=400, exclude=[], progress=False)
    # the default grid is scikit-learn's: alpha_max = max|X^T y| / (n * l1_ratio), geometric down to eps * that
    sk_grid = _sklearn_grid(X, y, l1_ratio, 10, 1e-3)
    np.testing.assert_allclose(result.alphas, sk_grid, rtol=1e-12)
    assert result.alphas[0] == pytest.approx(np.abs(X.T @ y).max() / N / l1_ratio, rel=1e-12)
    sk_alphas, sk_coefs, _ = enet_path(X, y, l1_ratio=l1_ratio, alphas=np.array(result.alphas), tol=1e-14,
                                       max_iter=1_000_000)
    ours = np.stack([result.weights(i)["weight"][0].numpy() for i in range(len(result.alphas))], axis=1)
    assert np.abs(ours - sk_coefs).max() < 1e-4, np.abs(ours - sk_coefs).max()
    np.testing.assert_array_equal(ours == 0, sk_coefs == 0)  # the same exact zeros
    assert (sk_coefs == 0).any() and (sk_coefs != 0).any()   # the path has both (the test can fail)
    # the reported per-layer numbers are those of the weights
    for i, row in enumerate(result.rows):
        w = ours[:, i]
        assert row["layers"]["weight"]["l1"] == pytest.approx(np.abs(w).sum(), abs=1e-12)
        assert row["layers"]["weight"]["l2"] == pytest.approx(np.linalg.norm(w), abs=1e-12)
        assert row["sparsity"] == pytest.approx((w == 0).mean())


# --------------------------------------------------------------------------
# 2., 3. The model is not changed; warm starts, largest alpha first
# --------------------------------------------------------------------------
def test_the_users_model_is_not_changed():
    X, y = _data()
    model = _mlp()
    before = _state(model)
    model.eval()
    result = pyreg.path(model, nn.functional.mse_loss, (torch.tensor(X).float(), torch.tensor(y).float()[:, None]),
                        n_alphas=3, epochs=20, progress=False)
    assert _same_state(before, _state(model))
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert not _same_state(before, result.weights(0))  # the copy was trained


def test_alphas_run_in_decreasing_order_and_sparsity_falls():
    X, y = _data()
    given = [0.001, 0.3, 0.01, 0.1, 0.03, 1.0]
    result = pyreg.path(_linear(), _half_mse, (torch.tensor(X), torch.tensor(y)), alphas=given,
                        optimizer=_ista(X), epochs=200, exclude=[], progress=False)
    assert result.alphas == sorted(given, reverse=True)
    assert [r["alpha"] for r in result.rows] == result.alphas
    sparsity = [r["sparsity"] for r in result.rows]
    assert all(a >= b for a, b in zip(sparsity, sparsity[1:])), sparsity
    assert sparsity[0] > sparsity[-1]


def _validated(epochs, **kw):
    """The linear model's training data, and path arguments with validation
    data and a per-sample metric (12 alphas, ISTA)."""
    X, y = _data()
    Xv, yv = _data(seed=1)
    per_sample = lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2  # noqa: E731
    return (torch.tensor(X), torch.tensor(y)), dict(val=(torch.tensor(Xv), torch.tensor(yv)), n_alphas=12,
                                                    optimizer=_ista(X), epochs=epochs, exclude=[],
                                                    metric=per_sample, progress=False, **kw)


@pytest.mark.parametrize("select", ["best", "1se"])
def test_increasing_order_fits_smallest_first_and_selects_as_decreasing_does(select):
    train, common = _validated(300, select=select)
    down = pyreg.path(_linear(), _half_mse, train, **common)
    up = pyreg.path(_linear(), _half_mse, train, order="increasing", **common)
    assert up.alphas == down.alphas[::-1]
    assert [r["alpha"] for r in up.rows] == up.alphas
    # one regularized tensor: every fit is warm-started from the one before, all-zero ones too
    assert down.rows[0]["sparsity"] == 1.0
    assert [r["start"] for r in down.rows] == [None] + down.alphas[:-1]
    assert [r["start"] for r in up.rows] == [None] + up.alphas[:-1]
    sparsity = [r["sparsity"] for r in up.rows]
    assert all(a <= b for a, b in zip(sparsity, sparsity[1:])), sparsity
    # a convex problem: the same optimum at every alpha whichever fit it starts from
    for i in range(12):
        a, b = down.weights(i)["weight"], up.weights(11 - i)["weight"]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert torch.equal(a == 0, b == 0)
    assert down.index_1se < down.best_index  # the two rules pick different fits here
    assert up.alpha == down.alpha and up.index == 11 - down.index
    assert up.best_index == 11 - down.best_index and up.index_1se == 11 - down.index_1se
    # keep_weights=False keeps the selected fit in this order too
    lean = pyreg.path(_linear(), _half_mse, train, order="increasing", keep_weights=False, **common)
    assert lean.index == up.index
    assert _same_state(lean.weights(), up.weights(up.index))
    with pytest.raises(ValueError, match="not kept"):
        lean.model(next(i for i in range(12) if i != lean.index))


def test_ties_go_to_the_larger_alpha_in_either_order():
    rows = _rows([0.5, 0.3, 0.3, 0.4], [0.0] * 4)  # alphas 1.0, 0.5, 0.25, 0.125
    assert _select(rows, False) == (1, 1)
    up = rows[::-1]
    assert _select(up, False) == (2, 2)  # the same row (alpha 0.5)
    # 1se in increasing order: the largest alpha within one se of the best, wherever it sits
    rows = _rows([0.9, 0.52, 0.5, 0.6], [0.05] * 4)[::-1]  # alphas 0.125 .. 1.0
    assert _select(rows, False) == (1, 2)


def test_a_fit_that_kills_the_network_is_no_warm_start():
    # alpha 100 zeroes every weight of the MLP, a stationary point at every alpha: the fit after it
    # starts from the last fit that kept a weight (or the model's own weights), in either order
    X, y = _data()
    data = (torch.tensor(X).float(), torch.tensor(y).float()[:, None])
    common = dict(optimizer=lambda g: pyreg.optim.SGD(g, lr=0.05, momentum=0.9), epochs=100, progress=False)
    model = _mlp()
    down = pyreg.path(model, nn.functional.mse_loss, data, alphas=[100.0, 0.01, 0.001], **common)  # the default
    assert down.order == "decreasing" and [r["sparsity"] for r in down.rows][0] == 1.0
    assert [r["start"] for r in down.rows] == [None, None, 0.01]
    assert [line.split("|")[6].strip() for line in down.table().splitlines()[2:]] == ["model", "model", "0.01"]
    # the fit at 0.01 is the one the model's own weights give at 0.01
    fresh = pyreg.path(model, nn.functional.mse_loss, data, alphas=[0.01], **common)
    assert fresh.rows[0]["start"] is None and _same_state(down.weights(1), fresh.weights(0))
    assert down.rows[2]["sparsity"] < 0.5
    up = pyreg.path(model, nn.functional.mse_loss, data, alphas=[0.001, 100.0, 200.0], order="increasing", **common)
    assert up.alphas == [0.001, 100.0, 200.0] and up.to_dict()["order"] == "increasing"
    assert [r["start"] for r in up.rows] == [None, 0.001, 0.001]
    assert up.to_dict()["rows"][1]["start"] == 0.001
    assert up.rows[0]["sparsity"] < 0.5 and up.rows[1]["sparsity"] == up.rows[2]["sparsity"] == 1.0
    # the fit at 200 is the one that follows the fit at 0.001 directly (the unregularized biases show it)
    pair = pyreg.path(model, nn.functional.mse_loss, data, alphas=[0.001, 200.0], order="increasing", **common)
    assert _same_state(up.weights(2), pair.weights(1))


def test_a_dead_fit_is_told_by_its_output_not_by_its_zeros():
    # the output layer alone zeroed (its l1 1e5 times the input layer's): the model's output is its bias
    # for every sample while most input weights remain, and the next fit starts from the model
    X, y = _data()
    data = (torch.tensor(X).float(), torch.tensor(y).float()[:, None])
    common = dict(optimizer=lambda g: pyreg.optim.SGD(g, lr=0.05, momentum=0.9), epochs=100, progress=False,
                  method=lambda a: {"l1": a / 1e5, "overrides": {"2.weight": {"l1": a}}})
    down = pyreg.path(_mlp(), nn.functional.mse_loss, data, alphas=[1000.0, 0.001], **common)
    top = down.rows[0]["layers"]
    assert top["2.weight"]["sparsity"] == 1.0 and top["0.weight"]["sparsity"] < 0.5
    assert [r["start"] for r in down.rows] == [None, None]
    fresh = pyreg.path(_mlp(), nn.functional.mse_loss, data, alphas=[0.001], **common)
    assert _same_state(down.weights(1), fresh.weights(0))


class _Out(nn.Module):
    """Returns ``outputs[i]`` at its i-th call (whatever the input)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, x):
        self.calls += 1
        return self.outputs[self.calls - 1]


@pytest.mark.parametrize("outputs, constant", [
    ([torch.ones(3, 2), torch.ones(2, 2)], True),  # the same row for every sample, over two batches
    ([torch.ones(3, 2), torch.tensor([[1.0, 1.0], [1.0, 1.5]])], False),  # one sample of the second differs
    ([torch.ones(3, 2), torch.full((2, 2), 2.0)], False),  # each batch constant, but not the same
    ([torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]), torch.ones(2, 2)], False),
    ([torch.ones(3, 2), torch.ones(2, 3)], False),  # shapes that differ
    ([torch.full((3, 2), float("nan")), torch.full((2, 2), float("nan"))], True),  # NaN: diverged, as dead
    ([torch.ones(3, 2), torch.tensor([[1.0, float("inf")], [1.0, 1.5]])], True),  # one infinite output
    ([(torch.ones(3, 2),), (torch.ones(2, 2),)], False),  # not a tensor: not known constant
])
def test_evaluate_tells_a_constant_output(outputs, constant):
    batches = [(torch.randn(3, 4), torch.zeros(3)), (torch.randn(2, 4), torch.zeros(2))]
    mean, _, got = _evaluate(_Out(outputs), lambda out, y: torch.zeros(y.shape[0]), batches, False, None)
    assert mean == 0.0 and got is constant


def test_strength_method_default_grid_and_sparsity():
    """method="strength": l1_strength = alpha at each point, the default grid
    evenly spaced from 0.95 down, sparsity falling with the strength, and
    each fit's optimizer setting its l1 from the push."""
    X, y = _data()
    made = []

    def factory(groups):
        made.append(pyreg.optim.Adam(groups, lr=1e-2))
        return made[-1]

    model = _mlp()
    result = pyreg.path(model, nn.functional.mse_loss, (torch.tensor(X).float(), torch.tensor(y).float()[:, None]),
                        method="strength", n_alphas=4, optimizer=factory, epochs=60, progress=False)
    assert result.alphas == pytest.approx([0.95, 0.7125, 0.475, 0.2375])
    assert [g.get("l1_strength") for g in made[0].param_groups] == [0.95, None]  # biases excluded
    sparsity = [r["sparsity"] for r in result.rows]
    assert sparsity[0] > sparsity[-1] and sparsity[0] > 0.5, sparsity
    w = made[0].param_groups[0]["params"][0]  # (later fits start where units died: pushes of 0 are common)
    assert float(made[0].state[w]["strength_l1"]) > 0


def test_group_strength_method_drops_whole_input_columns():
    """method="group_strength": group_strength = alpha on every weight's
    columns: the MLP's first layer loses whole input columns only, more at
    the larger strength."""
    X, y = _data()
    result = pyreg.path(_mlp(), nn.functional.mse_loss, (torch.tensor(X).float(), torch.tensor(y).float()[:, None]),
                        method="group_strength", alphas=[0.3, 0.9],
                        optimizer=lambda g: pyreg.optim.SGD(g, lr=0.05, momentum=0.9), epochs=120, progress=False)
    w = result.model(0)[0].weight  # 0.9, the first fit
    zero_cols = (w == 0).all(dim=0)
    assert int((w == 0).sum()) == 8 * int(zero_cols.sum()) > 0  # the zeros come in whole columns
    # (the next fit starts there: a column that regrows stays 0 in the rows of units that died)
    dropped = [int((result.model(i)[0].weight == 0).all(dim=0).sum()) for i in range(2)]
    assert dropped[0] > dropped[1], dropped


def test_each_fit_starts_from_the_previous_one():
    """With one ISTA step per alpha, the weights at alpha i are one proximal
    step at alpha i from the weights at alpha i-1 (a cold start would begin
    from the model's weights again)."""
    X, y = _data()
    torch.manual_seed(1)
    model = _linear()
    with torch.no_grad():
        model.weight.normal_()
    alphas = [0.5, 0.2, 0.1]
    lr = 0.1
    result = pyreg.path(model, _half_mse, (torch.tensor(X), torch.tensor(y)), alphas=alphas,
                        optimizer=lambda g: pyreg.optim.SGD(g, lr=lr), epochs=1, exclude=[], progress=False)
    w = model.weight.detach().clone()[0].numpy()
    for i, a in enumerate(alphas):
        g = X.T @ (X @ w - y) / N
        z = w - lr * g
        w = np.sign(z) * np.maximum(np.abs(z) - lr * a, 0.0)
        np.testing.assert_allclose(result.weights(i)["weight"][0].numpy(), w, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------
# 4. Selection
# --------------------------------------------------------------------------
def _rows(means, ses):  # alphas 1, 1/2, 1/4, ...: decreasing along the rows
    return [{"alpha": 2.0 ** -i, "val_metric": m, "val_se": s} for i, (m, s) in enumerate(zip(means, ses))]


def test_select_rules():
    # alphas decrease along the rows; the best is index 3, its se 0.1: index 1 is the largest within it
    rows = _rows([1.0, 0.55, 0.6, 0.5, 0.52, 0.7], [0.1] * 6)
    assert _select(rows, False) == (3, 1)
    # accuracy-like: larger is better
    rows = _rows([0.5, 0.8, 0.92, 0.95, 0.9], [0.02, 0.02, 0.02, 0.04, 0.02])
    assert _select(rows, True) == (3, 2)
    # NaN (a diverged fit) is never the best; no se (NaN): 1se is the best
    rows = _rows([float("nan"), 0.4, 0.3, 0.35], [float("nan")] * 4)
    assert _select(rows, False) == (2, 2)


def test_a_metric_nan_at_every_alpha_warns_that_nothing_was_chosen():
    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    nan = lambda out, t: torch.full((t.shape[0],), float("nan"), dtype=torch.float64)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="NaN at every alpha"):
        result = pyreg.path(_linear(), _half_mse, (Xt, yt), alphas=[0.1, 0.01], metric=nan, optimizer=_ista(X),
                            epochs=2, progress=False)
    assert result.index == 0
    calls = []

    def nan_first(out, t):  # NaN for the metric's check and the first fit, then a number
        calls.append(1)
        return nan(out, t) if len(calls) <= 2 else _half_mse(out, t)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one alpha with a number: no warning
        result = pyreg.path(_linear(), _half_mse, (Xt, yt), alphas=[0.1, 0.01], metric=nan_first,
                            optimizer=_ista(X), epochs=2, progress=False)
    assert result.index == 1 and math.isnan(result.rows[0]["val_metric"])


@pytest.mark.parametrize("rnn", [False, True])
def test_default_grid_is_not_one_dropout_masks(rnn):
    torch.manual_seed(0)
    X, y = torch.randn(64, 5, 4), torch.randn(64, 1)
    if rnn:  # dropout between an LSTM's layers
        class Net(nn.Module):
            def __init__(self, p):
                super().__init__()
                self.rnn, self.head = nn.LSTM(4, 6, num_layers=2, dropout=p, batch_first=True), nn.Linear(6, 1)

            def forward(self, x):
                return self.head(self.rnn(x)[0][:, -1])
    else:
        class Net(nn.Module):
            def __init__(self, p):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 1))

            def forward(self, x):
                return self.body(x)
    torch.manual_seed(1)
    plain = Net(0.0)
    torch.manual_seed(1)
    model = Net(0.5)
    model.load_state_dict(plain.state_dict())
    loss = nn.functional.mse_loss
    tops = []
    for seed in range(3):  # the grid does not change with the random state
        torch.manual_seed(seed)
        tops.append(pyreg.path(model, loss, (X, y), n_alphas=2, epochs=1, progress=False).alphas[0])
    expected = pyreg.path(plain, loss, (X, y), n_alphas=2, epochs=1, progress=False).alphas[0]
    assert tops == [expected] * 3  # ... and is the model's without dropout
    if rnn:
        assert model.rnn.dropout == 0.5 and model.training


def test_selection_on_a_real_path_follows_the_rows():
    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    Xv, yv = _data(seed=1)
    per_sample = lambda out, t: 0.5 * (out.squeeze(-1) - t) ** 2  # noqa: E731
    common = dict(val=(torch.tensor(Xv), torch.tensor(yv)), n_alphas=12, optimizer=_ista(X), epochs=150,
                  exclude=[], metric=per_sample, progress=False)
    best = pyreg.path(_linear(), _half_mse, (Xt, yt), select="best", **common)
    one_se = pyreg.path(_linear(), _half_mse, (Xt, yt), select="1se", **common)
    means = np.array([r["val_metric"] for r in best.rows])
    ses = np.array([r["val_se"] for r in best.rows])
    assert np.all(ses > 0)
    assert best.best_index == int(np.argmin(means)) and best.alpha == best.alphas[best.best_index]
    within = np.nonzero(means <= means[best.best_index] + ses[best.best_index])[0]
    assert one_se.index_1se == best.index_1se == int(within[0])
    assert one_se.alpha == one_se.alphas[one_se.index_1se] >= best.alpha
    assert one_se.index_1se < one_se.best_index  # here 1se is a larger alpha than the best
    # the metric is 0.5 * squared error per sample: its mean and standard error over the samples
    w = best.weights(best.best_index)["weight"][0].numpy()
    r = 0.5 * (Xv @ w - yv) ** 2
    assert means[best.best_index] == pytest.approx(r.mean(), rel=1e-10)
    assert ses[best.best_index] == pytest.approx(r.std(ddof=1) / math.sqrt(N), rel=1e-8)


def _classes(n=200, p=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    return X, y


def test_greater_is_better_with_accuracy():
    X, y = _classes()
    Xv, yv = _classes(seed=1)
    torch.manual_seed(0)
    model = nn.Linear(10, 2)
    accuracy = lambda out, t: (out.argmax(1) == t).float()  # noqa: E731
    result = pyreg.path(model, nn.functional.cross_entropy, (X, y), val=(Xv, yv), n_alphas=6, eps=1e-2,
                        optimizer=lambda g: pyreg.optim.SGD(g, lr=0.5), epochs=50, metric=accuracy,
                        greater_is_better=True, progress=False)
    acc = [r["val_metric"] for r in result.rows]
    assert result.best_index == int(np.argmax(acc))
    assert acc[result.best_index] > acc[0]  # at alpha_max the weights are shrunk to (nearly) nothing
    limit = acc[result.best_index] - result.rows[result.best_index]["val_se"]
    assert result.index_1se == min(i for i, a in enumerate(acc) if a >= limit)


# --------------------------------------------------------------------------
# 5. Data forms
# --------------------------------------------------------------------------
def test_dataloader_batches_and_val_none():
    from torch.utils.data import DataLoader, TensorDataset

    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    loader = DataLoader(TensorDataset(Xt, yt), batch_size=16, shuffle=True)  # batches of 16, 16, 16, 12
    calls = []

    def counting_loss(out, t):
        calls.append(len(t))
        return _half_mse(out, t)

    result = pyreg.path(_linear(), counting_loss, loader, n_alphas=4, optimizer=_ista(X), epochs=3,
                        exclude=[], progress=False)
    assert result.metric_on == "train" and "train metric" in result.table()
    assert len(result.rows) == 4 and all(math.isfinite(r["val_metric"]) for r in result.rows)
    # alpha_max over the whole training data, from the batches weighted by their sizes
    assert result.alphas[0] == pytest.approx(np.abs(X.T @ y).max() / N, rel=1e-12)
    # per alpha: 3 epochs of 4 steps, then the metric (the loss) on the 4 batches; plus the alpha_max pass
    # and the metric's check on the first batch before any fit
    assert len(calls) == 1 + 4 + 4 * (3 * 4 + 4)
    # a scalar metric per batch: the mean weighted by batch size, the se over the batches
    assert all(r["val_se"] > 0 for r in result.rows)
    w = result.weights(0)["weight"][0].numpy()
    assert result.rows[0]["val_metric"] == pytest.approx(0.5 * np.mean((X @ w - y) ** 2), rel=1e-10)

    full = pyreg.path(_linear(), _half_mse, (Xt, yt), val=loader, n_alphas=2, optimizer=_ista(X), epochs=3,
                      exclude=[], progress=False)
    assert full.metric_on == "val" and "val metric" in full.table()


# --------------------------------------------------------------------------
# 6. Bad input: a clear error before anything runs
# --------------------------------------------------------------------------
BAD = [
    (dict(method="lasso"), ValueError, "unknown method"),
    (dict(method="elastic_net", l1_ratio=0.0), ValueError, "l1_ratio"),
    (dict(l1_ratio=1.5), ValueError, "l1_ratio"),
    (dict(alphas=[]), ValueError, "alphas is empty"),
    (dict(alphas=[0.1, float("nan")]), ValueError, "alphas"),
    (dict(alphas=[0.1, float("inf")]), ValueError, "alphas"),
    (dict(alphas=[0.1, -1.0]), ValueError, "alphas"),
    (dict(alphas="0.1"), TypeError, "alphas"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=2.5), TypeError, "epochs"),
    (dict(select="min"), ValueError, "select"),
    (dict(order="ascending"), ValueError, "order"),
    (dict(order=None), ValueError, "order"),
    (dict(n_alphas=0), ValueError, "n_alphas"),
    (dict(eps=1.0), ValueError, "eps"),
    (dict(greater_is_better="yes"), TypeError, "greater_is_better"),
    (dict(metric="mse"), TypeError, "metric"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(method=lambda a: {"l1": a}), ValueError, "pass alphas"),
    (dict(method=lambda a: {"lr": a}, alphas=[0.1]), ValueError, "param_groups"),
    (dict(method=lambda a: a, alphas=[0.1]), TypeError, "dict"),
    (dict(method="group", group_dim=5), ValueError, "group_dim"),
    (dict(exclude=["*"]), ValueError, "no parameter is regularized"),
    (dict(exclude=3), TypeError, "exclude"),
    (dict(val=torch.zeros(3)), TypeError, "val"),
    (dict(val=iter([])), TypeError, "iterator"),
    (dict(device=3), TypeError, "device"),
    (dict(device="meta"), ValueError, "'meta' holds no data"),
    (dict(method="strength", alphas=[0.5, 1.5]), ValueError, "strength"),
    (dict(method="group_strength", alphas=[2.0]), ValueError, "strength"),
    (dict(method="group_strength", group_dim=5), ValueError, "group_dim"),
    (dict(metric=lambda out, y: "x"), TypeError, "metric must return a tensor or a number, got str"),
    (dict(metric=lambda out, y: None), TypeError, "metric must return a tensor or a number, got NoneType"),
    (dict(metric=lambda out, y: torch.ones(2, 3)), ValueError, "one value per sample"),
    (dict(val=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 10), torch.zeros(3, 1)),
                                          batch_size=8, drop_last=True)), ValueError, "no batches"),
    (dict(alphas=[torch.tensor([0.1, 0.2])]), ValueError, r"alphas\[0\] holds 2 values"),
    (dict(alphas=[0.3, np.array([0.1, 0.2])]), ValueError, r"alphas\[1\] holds 2 values"),
] + ([] if torch.cuda.is_available() else [(dict(device="cuda"), ValueError, "CUDA is not available"),
                                          (dict(device="cuda:1"), ValueError, "CUDA is not available")]) \
  + ([] if torch.backends.mps.is_available() else [(dict(device="mps"), ValueError, "MPS is not available")]) \
  + ([] if not hasattr(torch, "xpu") or torch.xpu.is_available()
     else [(dict(device="xpu:0"), ValueError, "XPU is not available")])


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_fail_before_training(kwargs, error, match):
    X, y = _data()
    model = _mlp()
    before = _state(model)
    made = []

    def factory(groups):
        made.append(groups)
        return pyreg.optim.SGD(groups, lr=0.01)

    kwargs = {"optimizer": factory, "epochs": 1, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        pyreg.path(model, nn.functional.mse_loss, (torch.tensor(X).float(), torch.tensor(y).float()[:, None]),
                   **kwargs)
    assert made == []  # nothing was trained
    assert _same_state(before, _state(model))


def test_an_optimizer_that_ignores_the_groups_keys_is_refused_before_training():
    """torch's SGD would train the path without its l1 (sparsity 0 at every alpha, silently)."""
    X, y = _data()
    model = _mlp()
    before = _state(model)
    losses = []

    def loss(out, t):
        losses.append(1)
        return nn.functional.mse_loss(out, t)

    with pytest.raises(TypeError, match="does not apply the groups' l1/l2/group_l1"):
        pyreg.path(model, loss, (torch.tensor(X).float(), torch.tensor(y).float()[:, None]), alphas=[10.0],
                   optimizer=lambda g: torch.optim.SGD(g, lr=0.1), metric=nn.functional.mse_loss, epochs=1,
                   progress=False)
    assert losses == [] and _same_state(before, _state(model))  # no training step


def test_one_sample_of_metric_data_never_counts_as_a_dead_fit():
    X, y = _data()
    Xt, yt = torch.tensor(X).float(), torch.tensor(y).float()[:, None]
    r = pyreg.path(_mlp(), nn.functional.mse_loss, (Xt, yt), val=(Xt[:1], yt[:1]), alphas=[0.1, 0.01, 0.001],
                   optimizer=lambda g: pyreg.optim.SGD(g, lr=0.01), epochs=2, order="decreasing", progress=False)
    assert [row["start"] for row in r.rows] == [None, 0.1, 0.01]  # warm starts (every fit was "dead" before)


@pytest.mark.parametrize("case", ["empty batch", "detached loss"])
def test_a_batch_without_samples_or_a_loss_without_grad_is_a_clear_error(case):
    """An empty batch among the training batches (its mean loss is NaN) and a
    loss that training cannot differentiate each raise a clear error; the
    model given is unchanged."""
    X, y = _data()
    Xt, yt = torch.tensor(X).float(), torch.tensor(y).float()[:, None]
    model = _mlp()
    before = _state(model)
    if case == "empty batch":
        train, loss, match = [(Xt, yt), (Xt[:0], yt[:0])], nn.functional.mse_loss, "train's batch 1 has no samples"
    else:
        train, match = (Xt, yt), "loss returned a tensor that does not depend on the model's weights"
        loss = lambda out, t: nn.functional.mse_loss(out, t).detach()  # noqa: E731
    with pytest.raises(ValueError, match=match):
        pyreg.path(model, loss, train, alphas=[0.01], optimizer=lambda g: pyreg.optim.SGD(g, lr=0.05), epochs=1,
                   progress=False)
    assert _same_state(before, _state(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_first_fit_of_the_default_grid_keeps_zero_weights_zero(dtype):
    """At alpha_max all-zero weights stay zero, through the rounding of the
    training steps' gradients (at the exact largest gradient the prox's test
    is a tie: about half of these fits left a weight of ~1e-7 nonzero)."""
    half = lambda o, t: 0.5 * ((o - t) ** 2).sum(1).mean()  # noqa: E731
    left = []
    for method in ("l1", "group", "elastic_net"):
        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            X = torch.randn(40, 6, generator=g, dtype=dtype)
            Y = X @ torch.randn(6, 3, generator=g, dtype=dtype)
            lr = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / 40).max())
            model = nn.Linear(6, 3, bias=False, dtype=dtype)
            nn.init.zeros_(model.weight)
            r = pyreg.path(model, half, (X, Y), method=method, n_alphas=2, exclude=[], epochs=50, progress=False,
                           optimizer=lambda groups: pyreg.optim.SGD(groups, lr=lr))
            w = r.weights(0)["weight"]
            if bool((w != 0).any()):
                left.append((method, seed, float(w.abs().max())))
    assert left == []


def test_bad_data_and_model():
    X = torch.zeros(5, 3)
    with pytest.raises(TypeError, match="nn.Module"):
        pyreg.path(lambda x: x, nn.functional.mse_loss, (X, X), progress=False)
    with pytest.raises(ValueError, match="same first dimension"):
        pyreg.path(nn.Linear(3, 3), nn.functional.mse_loss, (X, X[:4]), progress=False)
    with pytest.raises(TypeError, match="iterator"):
        pyreg.path(nn.Linear(3, 3), nn.functional.mse_loss, iter([(X, X)]), progress=False)


# --------------------------------------------------------------------------
# 7. Group lasso and a method of your own
# --------------------------------------------------------------------------
def test_group_method_zeroes_whole_input_columns():
    torch.manual_seed(0)
    X = torch.randn(200, 10)
    y = (X[:, 0] - 2 * X[:, 1] + 0.5 * X[:, 2])[:, None]
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1))
    sgd = lambda g: pyreg.optim.SGD(g, lr=0.05, momentum=0.9)  # noqa: E731
    result = pyreg.path(model, nn.functional.mse_loss, (X, y), method="group", n_alphas=4, optimizer=sgd,
                        epochs=200, progress=False)
    assert set(result.rows[0]["layers"]) == {"0.weight", "2.weight"}  # the biases are not regularized
    for i in range(len(result.alphas)):
        w = result.weights(i)["0.weight"]
        zero_cols = (w == 0).all(dim=0)
        # a column is zero as a whole or not at all: here exactly the noise inputs' columns
        assert torch.equal((w == 0).any(dim=0), zero_cols), i
        assert zero_cols.tolist() == [False] * 3 + [True] * 7, i
    # at a large alpha every column of the first layer is zero
    big = pyreg.path(model, nn.functional.mse_loss, (X, y), method="group", alphas=[10.0], optimizer=sgd,
                     epochs=100, progress=False)
    assert bool((big.weights(0)["0.weight"] == 0).all()) and big.rows[0]["layers"]["0.weight"]["sparsity"] == 1.0


def test_group_alpha_max_is_the_largest_column_gradient_norm():
    torch.manual_seed(0)
    X = torch.randn(100, 6, dtype=torch.float64)
    Y = X[:, :2] @ torch.randn(2, 3, dtype=torch.float64) + 0.1 * torch.randn(100, 3, dtype=torch.float64)
    model = nn.Linear(6, 3, bias=False, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean()  # noqa: E731
    sgd = lambda g: pyreg.optim.SGD(g, lr=0.1)  # noqa: E731
    result = pyreg.path(model, loss, (X, Y), method="group", n_alphas=3, optimizer=sgd, epochs=50,
                        exclude=[], progress=False)
    grad = -(Y.T @ X) / 100  # d loss / d W at W = 0, [out, in]: a column per input
    top = float(grad.norm(dim=0).max())
    assert result.alphas[0] == pytest.approx(top, rel=1e-12)
    assert bool((result.weights(0)["weight"] == 0).all())  # at alpha_max zero weights stay zero...
    below = pyreg.path(model, loss, (X, Y), method="group", alphas=[0.95 * top], optimizer=sgd, epochs=1,
                       exclude=[], progress=False)
    w = below.weights(0)["weight"]
    assert bool((w != 0).any()) and bool(((w == 0).all(0) | (w != 0).all(0)).all())  # ... and not below it


def test_callable_method():
    X, y = _data()
    Xt, yt = torch.tensor(X).float(), torch.tensor(y).float()[:, None]
    model = _mlp()
    seen = []

    def method(alpha):
        seen.append(alpha)
        return {"l1": 0.0, "overrides": {"0.weight": {"l1": alpha}}}

    result = pyreg.path(model, nn.functional.mse_loss, (Xt, yt), alphas=[0.0, 0.05, 0.5], method=method,
                        optimizer=lambda g: pyreg.optim.SGD(g, lr=0.05), epochs=100, progress=False)
    assert set(result.rows[0]["layers"]) == {"0.weight"}  # only what the method regularizes
    assert result.alphas == [0.5, 0.05, 0.0]
    sparsity = [r["sparsity"] for r in result.rows]
    assert sparsity[0] > 0.5 and sparsity[0] >= sparsity[1] >= sparsity[2]
    for i in range(3):  # the second layer has no L1
        assert bool((result.weights(i)["2.weight"] != 0).all())
    assert {0.0, 0.05, 0.5} <= set(seen)


# --------------------------------------------------------------------------
# 8. The result
# --------------------------------------------------------------------------
def _small_result(**kw):
    X, y = _data()
    return pyreg.path(_mlp(), nn.functional.mse_loss, (torch.tensor(X).float(), torch.tensor(y).float()[:, None]),
                      n_alphas=4, epochs=30, optimizer=lambda g: pyreg.optim.SGD(g, lr=0.05), progress=False,
                      order="increasing", **kw)


def test_table_dict_plot_and_models(tmp_path):
    result = _small_result()
    assert isinstance(result, PathResult)
    table = result.table()
    lines = table.splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| # | alpha")
    assert "best" in lines[2 + result.best_index] and "1se" in lines[2 + result.index_1se]
    assert "selected" in lines[2 + result.best_index]
    d = json.loads(json.dumps(result.to_dict()))
    assert d["alphas"] == result.alphas and d["best_index"] == result.best_index and len(d["rows"]) == 4
    assert set(d["rows"][0]) >= {"alpha", "train_loss", "val_metric", "val_se", "sparsity", "layers", "epochs",
                                 "seconds"}
    assert d["rows"][0]["val_se"] is None  # a scalar metric on one full batch: no se
    assert "PathResult(4 alphas" in repr(result)
    for i in range(4):
        m = result.model(i)
        assert isinstance(m, nn.Sequential) and _same_state(_state(m), result.weights(i))
    assert _same_state(_state(result.model()), result.weights(result.best_index))
    pytest.importorskip("matplotlib")
    with pytest.raises(TypeError, match="path must be a file name"):
        result.plot(123)
    out = result.plot(str(tmp_path / "path.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("training", [True, False])
def test_the_result_model_is_in_the_mode_the_model_was(training):
    X, y = _data()
    Xt, yt = torch.tensor(X).float(), torch.tensor(y).float()[:, None]
    model = nn.Sequential(nn.Linear(P, 8), nn.Dropout(0.5), nn.Linear(8, 1)).train(training)
    result = pyreg.path(model, nn.functional.mse_loss, (Xt, yt), alphas=[0.1, 0.01], epochs=2, progress=False)
    assert all(m.training == training for m in result.model().modules()) and model.training == training


def test_bad_training_data_without_val_names_train():
    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    with pytest.raises(TypeError, match=r"^train must yield \(x, y\) batches"):
        pyreg.path(_linear(), _half_mse, [Xt, yt], alphas=[0.1], progress=False)


@pytest.mark.parametrize("kind", ["per_sample", "per_batch"])
def test_a_one_sample_batch_counts_as_its_metric_kind(kind):
    """A batch of one sample: its one value is per sample or per batch as the other batches' are
    (a per-sample metric squeezed to a scalar, a per-batch one of shape (1,)): the same mean."""
    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    loader = [(Xt[:30], yt[:30]), (Xt[30:31], yt[30:31])]  # (the last batch holds one sample)
    if kind == "per_sample":
        metric = lambda out, t: ((out.squeeze(-1) - t) ** 2).squeeze()  # noqa: E731 (a scalar for one sample)
    else:
        metric = lambda out, t: ((out.squeeze(-1) - t) ** 2).mean(0, keepdim=True)  # noqa: E731 (shape (1,))
    r = pyreg.path(_linear(), _half_mse, (Xt, yt), val=loader, alphas=[0.1], metric=metric, epochs=1,
                   optimizer=_ista(X), progress=False)
    with torch.no_grad():
        want = float(((r.model()(Xt[:31]).squeeze(-1) - yt[:31]) ** 2).mean())
    assert r.rows[0]["val_metric"] == pytest.approx(want, rel=1e-12)


def test_batches_of_dicts_are_weighted_by_their_samples():
    """x and y dicts: each batch weighs its samples (the first tensor's first dim), not 1."""
    torch.manual_seed(0)
    A, Y = torch.randn(9, 3), torch.randn(9, 1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            return self.l(x["a"])

    data = [({"a": A[:8]}, {"y": Y[:8]}), ({"a": A[8:]}, {"y": Y[8:]})]
    m = M()
    r = pyreg.path(m, lambda o, t: ((o - t["y"]) ** 2).mean(), data, alphas=[0.1], epochs=1,
                   optimizer=lambda g: pyreg.optim.SGD(g, lr=0.0), progress=False)
    with torch.no_grad():
        want = float(((m(({"a": A})) - Y) ** 2).mean())
    assert r.rows[0]["val_metric"] == pytest.approx(want, rel=1e-6)
    assert r.rows[0]["train_loss"] == pytest.approx(want, rel=1e-6)
    from pyreg.path import _to
    moved = _to({"a": A, "b": [A]}, torch.device("meta"))  # (dict inputs go to the model's device)
    assert moved["a"].is_meta and moved["b"][0].is_meta


def test_a_diverged_fit_is_no_warm_start():
    """A fit whose output is NaN restarts the next one from the last live fit (it stayed NaN)."""
    torch.manual_seed(0)
    X = torch.randn(64, 5) * 3
    y = X.sum(1, keepdim=True)
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = pyreg.path(m, nn.functional.mse_loss, (X, y), alphas=[0.0, 0.3, 3.0], method="l2", order="increasing",
                       epochs=100, optimizer=lambda g: pyreg.optim.SGD(g, lr=0.1), progress=False)
    assert math.isnan(r.rows[0]["val_metric"])  # (this lr diverges with a small penalty)
    assert [row["start"] for row in r.rows] == [None, None, None]  # each from the model's weights, not NaN
    assert math.isfinite(r.rows[2]["val_metric"])


def test_1se_without_a_standard_error_warns():
    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    with pytest.warns(RuntimeWarning, match="select='1se' has no standard error"):
        pyreg.path(_linear(), _half_mse, (Xt, yt), alphas=[0.1, 0.01], select="1se", epochs=1,
                   optimizer=_ista(X), progress=False)


@pytest.mark.parametrize("select", ["best", "1se"])
def test_keep_weights_false_keeps_the_selected_fit(select):
    train, common = _validated(150, select=select)
    kept = pyreg.path(_linear(), _half_mse, train, **common)
    result = pyreg.path(_linear(), _half_mse, train, keep_weights=False, **common)
    assert kept.index_1se < kept.best_index  # the two rules pick different fits here
    assert result.index == kept.index == (kept.best_index if select == "best" else kept.index_1se)
    assert _same_state(_state(result.model()), kept.weights(kept.index))
    assert not _same_state(result.weights(), kept.weights(kept.index + 1))
    other = next(i for i in range(12) if i != result.index)
    with pytest.raises(ValueError, match="not kept"):
        result.model(other)


# --------------------------------------------------------------------------
# 9. import pyreg stays light
# --------------------------------------------------------------------------
def test_import_pyreg_loads_no_plotting_or_sklearn():
    code = ("import sys, torch; before = set(sys.modules); import pyreg; "
            "print(sorted(m for m in ('matplotlib', 'sklearn', 'tqdm') "
            "if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_a_method_callable_with_target_sparsity_counts_its_layers():
    """A ``method`` callable that regularizes a layer through
    ``target_sparsity`` (or another key than l1/l2): that layer is among
    the regularized ones, its zeros in the row's sparsity, and a layer
    that no key regularizes is not."""
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = (x[:, :2] @ torch.tensor([1.0, -2.0]))[:, None]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    for over in ({"0.weight": {"target_sparsity": 0.5}},
                 {"0.weight": {"target_sparsity": 0.5}, "2.weight": {"l1": 1e-6}}):
        r = pyreg.path(model, nn.functional.mse_loss, (x, y), alphas=[0.5], epochs=30, progress=False,
                       optimizer=lambda g: pyreg.optim.Adam(g, lr=1e-2), method=lambda a, o=over: {"overrides": o})
        layers = r.rows[0]["layers"]
        assert sorted(layers) == sorted(over)
        w = r.weights()["0.weight"]
        assert layers["0.weight"]["sparsity"] == float((w == 0).double().mean()) == 0.5
        ws = [r.weights()[n] for n in over]
        assert r.rows[0]["sparsity"] == pytest.approx(sum(int((t == 0).sum()) for t in ws) / sum(t.numel() for t in ws))


@pytest.mark.parametrize("method", ["strength", "group_strength"])
def test_a_strength_path_with_too_few_steps_per_fit_is_refused(method):
    """A strength sets its coefficient at its first refresh (after
    l1_refresh = 10 steps), acting from the next step: fits of 10 steps or
    fewer would train without it. Refused before anything is trained where
    the steps are known (full batch: epochs; a sized loader: epochs x
    batches), a warning after the first fit where they are not; 11 steps
    regularize."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    state = copy.deepcopy(model.state_dict())
    common = dict(method=method, alphas=[0.9], progress=False, optimizer=lambda g: pyreg.optim.SGD(g, lr=0.1))
    with pytest.raises(ValueError, match="l1_refresh = 10 steps"):
        pyreg.path(model, nn.functional.mse_loss, (x, y), epochs=10, **common)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    with pytest.raises(ValueError, match="a fit of 10 steps"):
        pyreg.path(model, nn.functional.mse_loss, batches, epochs=5, **common)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))

    class Unsized:
        def __iter__(self):
            return iter(batches)
    with pytest.warns(UserWarning, match="a fit of 10 steps"):
        pyreg.path(model, nn.functional.mse_loss, Unsized(), epochs=5, **common)
    r = pyreg.path(model, nn.functional.mse_loss, (x, y), epochs=11, **common)
    common["alphas"] = [0.0]  # (strength 0: no penalty)
    r0 = pyreg.path(model, nn.functional.mse_loss, (x, y), epochs=11, **common)
    assert not torch.equal(r.weights()["0.weight"], r0.weights()["0.weight"])  # the 11th step's prox acted


def test_a_model_on_the_meta_device_is_refused_before_anything():
    with torch.device("meta"):
        model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for kw in ({}, {"alphas": [0.1]}):
        with pytest.raises(TypeError, match="meta device"):
            pyreg.path(model, nn.functional.mse_loss, (x, y), progress=False, **kw)


def test_namedtuple_and_defaultdict_inputs_reach_the_model_as_given():
    """Inputs in a namedtuple (the form DataLoader's collate keeps) or a
    defaultdict go to the model in their own type, on the path's device."""
    import collections
    Inp = collections.namedtuple("Inp", ["a", "b"])

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.seen = set()

        def forward(self, inp):
            self.seen.add(type(inp).__name__)
            a, b = (inp.a, inp.b) if isinstance(inp, tuple) else (inp["a"], inp["b"])
            return self.lin(a + b)

    torch.manual_seed(0)
    a, b, y = torch.randn(16, 4), torch.randn(16, 4), torch.randn(16, 1)
    for inp in (Inp(a, b), collections.defaultdict(list, a=a, b=b)):
        model = Two()
        batches = [(inp, y)]
        r = pyreg.path(model, nn.functional.mse_loss, batches, alphas=[0.01], epochs=2, progress=False)
        assert r.rows[0]["train_loss"] == r.rows[0]["train_loss"]  # (a number: the fit ran)
        assert r.model().seen >= {type(inp).__name__}


def test_submodules_keep_their_modes_in_the_fits_and_the_result():
    """A model in training mode with a BatchNorm held in eval mode (a frozen
    one, as in fine-tuning): the fits leave its running statistics as they
    are, and result.model() gives every module its mode of the given model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model[1].running_mean.normal_()
    model.train()
    model[1].eval()
    given = [m.training for m in model.modules()]
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    r = pyreg.path(model, nn.functional.mse_loss, (x, y), n_alphas=2, epochs=3, progress=False)
    assert [m.training for m in r.model().modules()] == given
    assert torch.equal(r.weights()["1.running_mean"], model[1].running_mean)  # not updated by the fits
    model.eval()
    r = pyreg.path(model, nn.functional.mse_loss, (x, y), n_alphas=2, epochs=3, progress=False)
    assert [m.training for m in r.model().modules()] == [False] * len(given)
    assert not torch.equal(r.weights()["1.running_mean"], model[1].running_mean)  # trained in training mode
