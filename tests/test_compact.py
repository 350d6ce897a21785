"""pyreg.compact: removed groups, folded constants, coupling, inputs, report, errors."""
import copy

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

import pyreg
from pyreg.compact import Compacted, StackedRNN


def _seed(s=0):
    torch.manual_seed(s)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def check(model, x, **kw):
    """Compact, check the original is untouched, and compare on fresh random inputs."""
    model.eval()
    before = _state(model)
    out = pyreg.compact(model, x, measure=False, **kw)
    assert isinstance(out, Compacted)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    xs = x if isinstance(x, tuple) else (x,)
    fresh = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in xs)
    if kw.get("drop_inputs"):
        fresh_in = list(fresh)
        for i, inp in zip(range(len(fresh)), out.report.inputs.values()):
            fresh_in[i] = fresh[i].index_select(inp["dim"], torch.tensor(inp["kept"]))
    else:
        fresh_in = fresh
    with torch.no_grad():
        ref, got = model(*fresh), out.model(*fresh_in)
    scale = float(ref.abs().max())
    assert float((ref - got).abs().max()) <= 1e-5 * max(scale, 1e-6), (ref - got).abs().max()
    assert out.report.params_after == _params(out.model)
    assert out.report.params_before == _params(model)
    orig = dict(model.named_parameters())  # a trainable weight stays trainable, a frozen one frozen
    assert all(p.requires_grad == orig[n].requires_grad for n, p in out.model.named_parameters() if n in orig)
    return out


# ---------------------------------------------------------------- Linear chains

@pytest.mark.parametrize("bias", [True, False])
def test_linear_chain_input_columns_and_outgoing_zero(bias):
    _seed(1)
    m = nn.Sequential(nn.Linear(13, 9, bias=bias), nn.ReLU(), nn.Dropout(0.3), nn.Linear(9, 7, bias=bias),
                      nn.GELU(), nn.Linear(7, 3, bias=bias))
    with torch.no_grad():
        m[0].weight[:, [0, 5, 12]] = 0      # 3 inputs unused
        m[3].weight[:, [2, 4]] = 0          # neurons 2, 4 of layer 0 unused (outgoing zero)
        m[5].weight[:, 6] = 0               # neuron 6 of layer 3 unused
    out = check(m, torch.randn(31, 13))
    b = 1 if bias else 0
    expected = _params(m) - 3 * 9 - 2 * (10 + b) - (7 + b + 3) + 3 * 0
    # inputs: 3 columns of layer 0; neurons 2, 4: a row (10 kept inputs + bias) and a column of layer 3;
    # neuron 6 of layer 3: a row (7 kept inputs + bias) and a column of layer 5
    expected = _params(m) - 3 * 9 - 2 * (13 - 3 + b) - 2 * 7 - (9 - 2 + b) - 3
    assert out.report.params_after == expected
    assert out.report.inputs["input_1"]["removed"] == [0, 5, 12]
    assert out.report.layers[0].removed["outputs"] == [2, 4]


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU])
def test_incoming_zero_neuron_is_folded(act):
    _seed(2)
    m = nn.Sequential(nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 0.7       # constant act(0.7) != 0: must be folded, not dropped
        m[2].weight[3] = 0
        m[2].bias[3] = -0.4
    out = check(m, torch.randn(17, 6))
    assert out.report.params_after == _params(m) - (6 + 1 + 4) - (4 + 1 + 2)
    assert out.report.layers[0].removed["outputs"] == [1]


def test_fold_into_layer_without_bias_creates_one():
    _seed(3)
    m = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        m[0].weight[0] = 0
        m[0].bias[0] = 1.5
    out = check(m, torch.randn(8, 5))
    assert out.model.get_submodule("2").bias is not None


def test_a_constant_zero_adds_no_bias():
    """A removed neuron whose value is 0 everywhere (relu of a negative
    constant) has nothing to fold: a layer without a bias gets none."""
    _seed(3)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        m[0].weight[2] = 0
        m[0].bias[2] = -1.0
    out = check(m, torch.randn(5, 4))
    assert out.model.get_submodule("2").bias is None
    assert out.report.params_after == _params(m) - (4 + 1) - 3


def test_the_compacted_model_trains_what_the_original_trained():
    """Every parameter of the result keeps its requires_grad (a frozen
    layer stays frozen, the others train): one SGD step moves each
    trainable weight, sliced or not."""
    _seed(3)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        m[2].weight[:, [2, 5]] = 0
    m[4].requires_grad_(False)
    out = check(m, torch.randn(4, 6))
    c = out.model.train()
    assert {n: p.requires_grad for n, p in c.named_parameters()} == {n: p.requires_grad for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in c.named_parameters()}
    opt = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.1)
    c(torch.randn(16, 6)).pow(2).sum().backward()
    opt.step()
    moved = {n: not torch.equal(before[n], p) for n, p in c.named_parameters()}
    assert moved == {n: not n.startswith("4.") for n in before}


def test_compact_under_inference_mode_gives_a_model_that_trains():
    _seed(3)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[2].weight[:, [2, 5]] = 0
    x = torch.randn(4, 6)
    with torch.inference_mode():
        out = pyreg.compact(m, x, measure=False)
    c = out.model
    assert not any(p.is_inference() for p in c.parameters()) and out.report.params_after == _params(m) - 2 * (6 + 1 + 3)
    c(torch.randn(5, 6)).sum().backward()
    assert all(p.grad is not None for p in c.parameters())


def test_a_fold_keeps_a_frozen_bias_frozen():
    _seed(3)
    m = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight[0] = 0
        m[0].bias[0] = 1.5  # a constant, folded into m[2].bias
    m[2].bias.requires_grad_(False)
    out = check(m, torch.randn(8, 5))
    assert out.report.layers[0].removed == {"outputs": [0]} and not out.model.get_submodule("2").bias.requires_grad


def test_incoming_zero_with_zero_columns_needs_no_fold_and_odd_sizes():
    _seed(4)
    m = nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 1))
    with torch.no_grad():
        m[0].weight[[0, 3]] = 0
    check(m, torch.randn(1, 1))


# ---------------------------------------------------------------- convolutions

def test_conv2d_chain_and_flatten_to_linear():
    _seed(5)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(5 * 4 * 4, 4))
    with torch.no_grad():
        m[0].weight[:, 1] = 0              # input channel 1 unused
        m[0].weight[2] = 0                 # channel 2: constant relu(b), folded into conv 2 (no padding)
        m[0].bias[2] = 0.5
        m[2].weight[4] = 0                 # channel 4: constant map relu(b) -> a block of 16 features
        m[2].bias[4] = 0.3
        m[2].weight[:, 5] = 0              # channel 5 of conv 0 unused
    out = check(m, torch.randn(4, 3, 8, 8))
    exp = _params(m) - 6 * 9 - 2 * (2 * 9 + 1) - 2 * 5 * 9 - (4 * 9 + 1) - 16 * 4
    assert out.report.params_after == exp
    assert out.report.layers[-1].removed["inputs"] == list(range(64, 80))


def test_view_with_literal_size_is_rewritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3)
            self.fc = nn.Linear(6 * 5, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(-1, 30))

    _seed(6)
    m = Net()
    with torch.no_grad():
        m.conv.weight[3] = 0
        m.conv.bias[3] = -0.2              # relu(-0.2) = 0
    out = check(m, torch.randn(3, 4, 7))
    assert out.model.conv.out_channels == 5


def test_constant_channel_into_padded_conv_kept_unless_zero():
    _seed(7)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        m[0].weight[[0, 1]] = 0
        m[0].bias[0] = 0.8                 # constant 0.8: not constant at the padded border -> kept
        m[0].bias[1] = -0.8                # relu -> 0: removable
    out = check(m, torch.randn(2, 2, 6, 5))
    assert out.model.get_submodule("0").out_channels == 3
    assert out.report.layers[0].removed["outputs"] == [1]
    assert "0" in out.report.kept_zero_groups


def test_conv1d_chain():
    _seed(8)
    m = nn.Sequential(nn.Conv1d(5, 7, 3), nn.Tanh(), nn.Conv1d(7, 4, 1), nn.ReLU(), nn.Conv1d(4, 2, 3))
    with torch.no_grad():
        m[0].weight[:, 2] = 0
        m[0].weight[6] = 0
        m[0].bias[6] = 0.9                 # folded into the 1x1 conv (no padding)
        m[4].weight[:, 0] = 0
    out = check(m, torch.randn(3, 5, 11))
    assert out.report.inputs["input_1"]["removed"] == [2]
    assert out.model.get_submodule("2").out_channels == 3


# ---------------------------------------------------------------- BatchNorm

def test_batchnorm_eval_and_zero_gamma():
    _seed(9)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(),
                      nn.Linear(4 * 3 * 3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        for bn in (m[1], m[6]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.normal_()
            bn.bias.normal_()
        m[1].weight[2] = 0                 # zero gamma: the channel is the constant relu(beta)
        m[0].weight[4] = 0                 # zero kernel: constant conv bias through BN
        m[5].weight[1] = 0                 # zero Linear row through BatchNorm1d
    out = check(m, torch.randn(5, 3, 7, 7))
    assert out.report.layers[1].removed["channels"] == [2, 4]
    assert out.model.get_submodule("6").num_features == 7


# ---------------------------------------------------------------- coupling

class Residual(nn.Module):
    def __init__(self, c=5):
        super().__init__()
        self.a = nn.Linear(c, 6)
        self.b = nn.Linear(c, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + self.b(x))


def test_residual_channel_zero_in_one_branch_stays():
    _seed(10)
    m = Residual()
    with torch.no_grad():
        m.a.weight[3] = 0
        m.a.bias[3] = 0.0                  # zero in branch a only
    out = check(m, torch.randn(9, 5))
    assert out.model.a.out_features == 6 and out.model.b.out_features == 6


def test_residual_channel_zero_in_every_member_goes():
    _seed(11)
    m = Residual()
    with torch.no_grad():
        for lin in (m.a, m.b):
            lin.weight[3] = 0
        m.a.bias[3], m.b.bias[3] = 0.4, -1.1  # the sum relu(0.4) - 1.1 is folded into head
    out = check(m, torch.randn(9, 5))
    assert out.model.a.out_features == 5 and out.model.b.out_features == 5 and out.model.head.in_features == 5
    assert out.report.params_after == _params(m) - 2 * 6 - 2


def test_residual_conv_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 1, bias=False)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(self.bn1(self.c1(x))) + self.c2(x))

    _seed(12)
    m = Block()
    with torch.no_grad():
        m.bn1.bias.normal_()
        m.c1.weight[1] = 0                 # only one member of the sum: stays
        m.c1.weight[2] = 0
        m.c2.weight[2] = 0                 # both: constant relu(beta) + 0, folded into the 1x1 head
    out = check(m, torch.randn(3, 4, 6, 6))
    assert out.model.c1.out_channels == 3 and out.model.bn1.num_features == 3


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 3)
        self.head = nn.Linear(7, 2)
        self.side = nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.head(torch.cat([a, b], dim=1)) + self.side(a)


def test_concat_coupling():
    _seed(13)
    m = Concat()
    with torch.no_grad():
        m.head.weight[:, [1, 2, 5]] = 0    # a1, a2, b1 unused by head
        m.side.weight[:, 1] = 0            # a1 unused by side too -> goes; a2 is used by side -> stays
    out = check(m, torch.randn(6, 5))
    assert out.model.a.out_features == 3 and out.model.b.out_features == 2
    assert out.model.head.in_features == 5 and out.model.side.in_features == 3


class _TextCNN(nn.Module):
    """Two conv branches pooled over time, squeezed, concatenated, read for
    their device and dtype, and a classifier between an unsqueeze and a squeeze."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(5, 8, 3), nn.Conv1d(5, 6, 2), nn.Linear(14, 3)

    def forward(self, x):
        a = F.max_pool1d(F.relu(self.c1(x)), x.shape[2] - 2).squeeze(2)
        b = torch.squeeze(F.adaptive_max_pool1d(F.relu(self.c2(x)), 1), -1)
        h = torch.cat([a, b], 1).to(x.device, x.dtype)
        return self.fc(h.unsqueeze(1)).squeeze(1)


def test_squeeze_unsqueeze_and_device_reads_are_followed():
    _seed(6)
    m = _TextCNN()
    with torch.no_grad():
        m.fc.weight[:, [1, 4, 9]] = 0      # c1's channels 1, 4 and c2's channel 1 unused
        m.c1.weight[:, 2] = 0              # input 2, which c2 still reads
    out = check(m, torch.randn(4, 5, 11))
    rows = {r.name: r.removed for r in out.report.layers}
    assert rows["c1"] == {"outputs": [1, 4]} and rows["c2"] == {"outputs": [1]} and rows["fc"] == {"inputs": [1, 4, 9]}
    y = torch.randn(3, 5, 17)  # (another length: the pooling reads it)
    with torch.no_grad():
        torch.testing.assert_close(out.model(y), m(y))


@pytest.mark.parametrize("read", ["[0]", ".values", "indices too"])
def test_a_max_over_time_is_followed_where_only_its_values_are_read(read):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv1d(4, 6, 3), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.c(x))
            if read == "[0]":
                return self.fc(h.max(dim=2)[0])
            if read == ".values":
                return self.fc(torch.min(h, 2).values)
            v, i = h.max(2)
            return self.fc(v) + i.sum(1, keepdim=True)

    _seed(8)
    m = M()
    with torch.no_grad():
        m.fc.weight[:, [1, 3]] = 0
    out = check(m, torch.randn(3, 4, 9))
    removed = {r.name: r.removed for r in out.report.layers}
    if read == "indices too":
        assert "outputs" not in removed["c"] and any("op max" in r for r in out.report.left_alone.values())
    else:
        assert removed["c"] == {"outputs": [1, 3]} and removed["fc"] == {"inputs": [1, 3]}


def test_a_squeeze_of_a_channel_dim_of_width_one_keeps_it():
    _seed(6)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x).squeeze(-1))  # the single channel is dropped: [B, 3, 1] -> [B, 3]

    m = M()
    with torch.no_grad():
        m.a.weight.zero_()
    out = check(m, torch.randn(2, 3, 4))
    assert "outputs" not in {r.name: r.removed for r in out.report.layers}["a"]
    assert "squeeze" in out.report.left_alone["squeeze"]


def test_concat_along_batch_couples_members():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(3, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 0))

    _seed(14)
    m = Net()
    with torch.no_grad():
        m.a.weight[0] = 0                  # zero in a only: stays
        m.a.weight[2] = 0
        m.b.weight[2] = 0                  # zero in both: the two constants differ -> cannot fold into one bias
        m.head.weight[:, 3] = 0            # unused in both: goes
    out = check(m, torch.randn(5, 3))
    assert out.model.a.out_features == 3


# ---------------------------------------------------------------- recurrent layers

class RnnHead(nn.Module):
    def __init__(self, kind, inputs, hidden, layers=1, batch_first=True, bias=True):
        super().__init__()
        self.rnn = kind(inputs, hidden, num_layers=layers, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(hidden, 3)
        self.batch_first = batch_first

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


def _zero_unit(rnn, layer, unit, gates):
    h = rnn.hidden_size
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            p = getattr(rnn, f"{name}_l{layer}", None)
            if p is not None:
                for g in range(gates):
                    p[g * h + unit] = 0


@pytest.mark.parametrize("kind,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_rnn_input_columns_and_hidden_units(kind, gates, batch_first):
    _seed(15)
    m = RnnHead(kind, 7, 6, batch_first=batch_first)
    with torch.no_grad():
        m.rnn.weight_ih_l0[:, [0, 4]] = 0
    _zero_unit(m.rnn, 0, 2, gates)                 # incoming zero: state stays 0
    with torch.no_grad():
        m.head.weight[:, 5] = 0                    # unit 5: unused by the head ...
        m.rnn.weight_hh_l0[:, 5] = 0               # ... and by the other units
    x = torch.randn(4, 5, 7) if batch_first else torch.randn(5, 4, 7)
    out = check(m, x)
    assert out.report.inputs["x"]["removed"] == [0, 4]
    assert out.model.rnn.hidden_size == 4 and out.model.rnn.input_size == 5
    H, I = 4, 5  # kept: 4 of 6 hidden units, 5 of 7 inputs; the head keeps 4 of 6 columns
    exp = gates * H * I + gates * H * H + 2 * gates * H + H * 3 + 3
    assert out.report.params_after == exp


def test_rnn_unit_read_by_others_stays():
    _seed(16)
    m = RnnHead(nn.GRU, 4, 5)
    with torch.no_grad():
        m.head.weight[:, 1] = 0            # unused by the head but read through the recurrence: stays
    out = check(m, torch.randn(2, 6, 4))
    assert out.model.rnn.hidden_size == 5


def test_multilayer_lstm_becomes_stacked():
    _seed(17)
    m = RnnHead(nn.LSTM, 5, 6, layers=3, batch_first=False)
    _zero_unit(m.rnn, 0, 1, 4)
    _zero_unit(m.rnn, 1, 3, 4)
    _zero_unit(m.rnn, 1, 4, 4)
    _zero_unit(m.rnn, 2, 0, 4)
    with torch.no_grad():
        m.rnn.weight_ih_l0[:, 2] = 0
    out = check(m, torch.randn(7, 3, 5))
    assert isinstance(out.model.rnn, StackedRNN)
    assert [layer.hidden_size for layer in out.model.rnn.layers] == [5, 4, 5]


# ---------------------------------------------------------------- embeddings

def test_embedding_dims():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.fc = nn.Linear(6, 2)

        def forward(self, tokens):
            return self.fc(self.emb(tokens).mean(1))

    _seed(18)
    m = Net()
    with torch.no_grad():
        m.emb.weight[:, [1, 4]] = 0
        m.fc.weight[:, 5] = 0
    tokens = torch.randint(0, 11, (4, 9))
    m.eval()
    out = pyreg.compact(m, tokens, measure=False)
    assert torch.allclose(out.model(tokens), m(tokens), atol=1e-6)
    assert out.model.emb.embedding_dim == 3
    assert out.report.params_after == _params(m) - 3 * 11 - 3 * 2


def test_embedding_flattened_per_token():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.fc = nn.Linear(3 * 5, 2)

        def forward(self, tokens):
            return self.fc(self.emb(tokens).view(-1, 15))   # dims repeat per token: interleaved features

    _seed(26)
    m = Net().eval()
    with torch.no_grad():
        m.emb.weight[:, 2] = 0             # zero dim: constant 0 at every token
        m.fc.weight[:, [4, 9, 14]] = 0     # dim 4 unused at every token
        m.fc.weight[:, 0] = 0              # dim 0 unused at token 0 only: stays
    tokens = torch.randint(0, 7, (6, 3))
    out = pyreg.compact(m, tokens, measure=False)
    assert torch.allclose(out.model(tokens), m(tokens), atol=1e-6)
    assert out.model.emb.embedding_dim == 3 and out.model.fc.in_features == 9


# ---------------------------------------------------------------- inputs

@pytest.mark.parametrize("drop", [False, True])
def test_drop_inputs(drop):
    _seed(19)
    m = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        m[0].weight[:, [1, 3, 8]] = 0
    x = torch.randn(12, 10)
    out = check(m, x, drop_inputs=drop)
    kept = [0, 2, 4, 5, 6, 7, 9]
    assert out.report.inputs["input_1"]["kept"] == kept
    with torch.no_grad():
        if drop:
            assert torch.allclose(out.model(x[:, kept]), m(x), atol=1e-6)
        else:
            assert torch.allclose(out.model(x), m(x), atol=1e-6)


# ---------------------------------------------------------------- bad inputs, nothing changed

def test_untraceable_model_raises():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    m = Branchy()
    before = _state(m)
    with pytest.raises(ValueError, match="cannot be traced"):
        pyreg.compact(m, torch.randn(2, 3), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_unsupported_layer_in_chain_is_left_alone_and_named():
    _seed(20)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                      nn.Linear(4 * 3 * 3, 2))
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 0
        m[2].weight[3] = 0
        m[2].bias[3] = 0
    out = check(m, torch.randn(2, 3, 5, 5))
    assert "1" in out.report.left_alone and "PReLU" in out.report.left_alone["1"]
    assert "2" in out.report.left_alone and "groups=2" in out.report.left_alone["2"]
    assert out.report.params_after == _params(m)
    assert "0" in out.report.kept_zero_groups


def test_layernorm_over_channels_stops_the_chain():
    _seed(21)
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        m[0].weight[2] = 0
        m[0].bias[2] = 0
    out = check(m, torch.randn(4, 5))
    assert out.report.params_after == _params(m)
    assert "LayerNorm" in out.report.left_alone["1"]


def test_layernorm_over_other_dim_passes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 5, 1)
            self.ln = nn.LayerNorm(8)
            self.out = nn.Conv1d(5, 2, 1)

        def forward(self, x):
            return self.out(self.ln(self.conv(x)))

    _seed(22)
    m = Net()
    with torch.no_grad():
        m.out.weight[:, 4] = 0
    out = check(m, torch.randn(2, 3, 8))
    assert out.model.conv.out_channels == 4


def test_wrong_input_shape():
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    before = _state(m)
    with pytest.raises(ValueError, match="cannot run on example_inputs of shape"):
        pyreg.compact(m, torch.randn(2, 5), measure=False)
    with pytest.raises(TypeError):
        pyreg.compact(m, [1, 2], measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def _batch_of_three(x):
    if x.shape[0] < 3:  # a model's own error, which happens to start as compact's refusals do
        raise ValueError("compact: batch too small")
    return x


torch.fx.wrap("_batch_of_three")  # (called when the traced model runs)


def test_a_models_own_value_error_is_told_as_the_model_failing_to_run():
    class Checks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(_batch_of_three(x))

    with pytest.raises(ValueError, match=r"cannot run on example_inputs of shape \(2, 4\) "
                                         r"\(ValueError: compact: batch too small\)"):
        pyreg.compact(Checks(), torch.randn(2, 4), measure=False)


def test_wrong_result_is_refused_and_names_the_layer(monkeypatch):
    """The check after building: a fold that adds nothing (a planted bug) raises, naming the layer."""
    import importlib

    rw = importlib.import_module("pyreg.compact._rewrite")

    monkeypatch.setattr(rw, "feature_values", lambda x, dim: torch.zeros(x.shape[dim]))
    _seed(27)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 2.0
    before = _state(m)
    with pytest.raises(RuntimeError, match=r"first differing layer: _2 \(call_module 2\)"):
        pyreg.compact(m, torch.randn(5, 4), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_conv_and_rnn_wrong_input_shape():
    with pytest.raises(ValueError, match="cannot run"):
        pyreg.compact(nn.Conv2d(3, 4, 3), torch.randn(2, 4, 8, 8), measure=False)
    with pytest.raises(ValueError, match="cannot run"):
        pyreg.compact(RnnHead(nn.LSTM, 5, 4), torch.randn(2, 3, 6), measure=False)
    with pytest.raises(ValueError, match="2 example inputs given"):
        pyreg.compact(nn.Linear(3, 2), (torch.randn(2, 3), torch.randn(2, 3)), measure=False)


class InPlace(nn.Module):
    """A Linear, an in-place form of an activation or arithmetic, a Linear."""

    def __init__(self, how):
        super().__init__()
        self.fc, self.out, self.how, self.act = nn.Linear(4, 8), nn.Linear(8, 2), how, nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc(x)
        if self.how == "relu_":
            h.relu_()
        elif self.how == "mul_relu_":
            h.mul_(2)
            h.relu_()
        elif self.how == "add_":
            g = self.fc(x)
            g.add_(h)
            h = g
        elif self.how == "torch.relu_":
            torch.relu_(h)
        elif self.how == "inplace=True":
            torch.nn.functional.relu(h, inplace=True)
        elif self.how == "ReLU(inplace=True)":
            self.act(h)
        elif self.how == "+=":
            h += 1
            h = torch.relu(h)
        return self.out(h)


@pytest.mark.parametrize("how", ["relu_", "mul_relu_", "add_", "torch.relu_", "inplace=True", "ReLU(inplace=True)",
                                 "+="])
def test_in_place_calls_are_followed(how):
    """An in-place call whose result the forward drops (h.relu_()) is what later reads of h see: traced,
    its node has no users; it must not be dropped as dead code (that changed the outputs, silently
    where the example did not show it), and the constant folded is the value after it."""
    _seed(40)
    m = InPlace(how)
    with torch.no_grad():
        m.fc.bias.fill_(-1.0)
        m.fc.weight[3] = 0
        m.fc.bias[3] = 0.5  # a constant neuron, folded after the activation
        m.fc.weight[:, 1] = 0
    out = check(m, torch.zeros(2, 4))  # on zeros every other pre-activation is negative
    assert out.report.params_after < _params(m)


@pytest.mark.parametrize("how", ["view", "base", "input", "copy_"])
def test_in_place_write_seen_through_another_tensor_is_refused(how):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            if how == "view":  # writes a view, reads the base
                h[:, :2].relu_()
            elif how == "base":  # writes the base, reads a view made before
                v = h.view(-1)
                h.relu_()
                h = v.view(h.shape)
            elif how == "copy_":  # no out-of-place form
                h.copy_(h * 2)
            else:
                x.relu_()
                h = self.fc(x)
            return self.out(h)

    m = Net()
    before = _state(m)
    with pytest.raises(ValueError, match="writes in place into" if how != "copy_" else "has no out-of-place form"):
        pyreg.compact(m, torch.randn(3, 4), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("read", ["F.linear", "bias of the producer", "bias of the consumer"])
def test_a_layer_whose_parameters_are_read_directly_is_left_whole(read):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            y = self.out(torch.relu(self.fc(x)))
            if read == "F.linear":
                return y + torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)[:, :2]
            if read == "bias of the producer":
                return y + self.fc.bias.sum()
            return y + self.out.bias.sum()

    _seed(41)
    m = Net()
    with torch.no_grad():
        m.fc.weight[3] = 0
        m.fc.bias[3] = 2.0
    out = check(m, torch.randn(5, 4))
    name = "out" if read == "bias of the consumer" else "fc"
    assert "read directly" in out.report.left_alone[name]
    assert out.model.fc.out_features == 8


def test_avg_pool_with_a_divisor_override_is_not_constant_preserving():
    _seed(42)
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.AvgPool2d(2, 2, ceil_mode=True, divisor_override=1),
                      nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 1.0  # constant before the pool; not after it (edge windows sum fewer values)
    check(m, torch.randn(2, 2, 5, 5))


class _FunctionalPool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.c, self.c2, self.pool = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 1), pool

    def forward(self, x):
        return self.c2(self.pool(torch.relu(self.c(x))))


@pytest.mark.parametrize("pool, kept", [
    (lambda x: nn.functional.avg_pool1d(x, 2), 4),  # (3 zero channels go, the constant one is folded)
    (lambda x: nn.functional.avg_pool1d(x, 3, 1, padding=1, count_include_pad=False), 4),
    (lambda x: nn.functional.max_pool1d(x, 2), 4),
    (lambda x: nn.functional.avg_pool1d(x, 3, 1, 1), 8),  # edge windows count the padding: nothing constant
], ids=["avg", "avg-padding-not-counted", "max", "avg-padding-counted"])
def test_functional_pools_keep_a_channel_a_channel_as_their_modules_do(pool, kept):
    _seed(44)
    m = _FunctionalPool(pool)
    with torch.no_grad():
        m.c.weight[[1, 4, 6]] = 0
        m.c.bias[[1, 4, 6]] = 0
        m.c.weight[3] = 0
        m.c.bias[3] = 0.7
    out = check(m, torch.randn(2, 3, 8))
    assert out.model.c.out_channels == kept
    assert "avg_pool1d" not in out.report.left_alone


def test_an_embedding_with_max_norm_is_named_when_it_changes_the_output():
    _seed(45)
    m = nn.Sequential(nn.Embedding(50, 12, max_norm=1.0), nn.Flatten(), nn.Linear(120, 3))
    with torch.no_grad():
        m[0].weight[:, 4] = 0.5
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="its Embedding '0' has max_norm, which renormalizes the rows it reads"):
        pyreg.compact(m, torch.arange(50).view(5, 10), measure=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_with_a_fold(dtype):
    _seed(43)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        m[0].weight[:, 1] = 0
        m[0].weight[2] = 0
        m[0].bias[2] = 0.5
    out = pyreg.compact(m, torch.randn(4, 6).to(dtype), measure=False)
    assert out.report.params_after < _params(m)
    eps = torch.finfo(dtype).eps
    assert 0 < out.report.max_abs_error <= 16 * eps * out.report.output_scale


@pytest.mark.parametrize("kw,err,match", [
    (dict(example_inputs=torch.randn(0, 6)), ValueError, "no samples"),
    (dict(example_inputs=torch.full((2, 6), float("nan"))), ValueError, "NaN or inf"),
    (dict(atol=-1.0), ValueError, "atol must be finite and >= 0"),
    (dict(atol="x"), TypeError, "atol must be a real number"),
    (dict(drop_inputs="yes"), TypeError, "drop_inputs must be True or False"),
    (dict(measure="no"), TypeError, "measure must be True or False"),
])
def test_bad_arguments(kw, err, match):
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight[2] = 0
        m[0].bias[2] = 0.5
    before = _state(m)
    kw = dict(kw)
    x = kw.pop("example_inputs", torch.randn(3, 6))
    with pytest.raises(err, match=match):
        pyreg.compact(m, x, **kw)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- report

def test_report_table_dict_latency_and_sparse():
    _seed(23)
    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        m[0].weight[:, :8] = 0
        m[2].weight[0, :6] = 0             # element-wise zeros: stay, counted
    out = pyreg.compact(m.eval(), torch.randn(32, 16), measure=True)
    text = str(out.report)
    assert "params" in text and "latency cpu, batch 32 (example (32, 16))" in text and "do not speed up dense" in text
    d = out.report.to_dict()
    assert d["params_before"] == _params(m) and d["params_after"] == _params(m) - 8 * 12
    assert d["macs_before"] == 32 * (16 * 12 + 12 * 3) and d["macs_after"] == 32 * (8 * 12 + 12 * 3)
    assert d["latency"]["cpu"]["before_ms"] > 0 and d["layers"][2]["zeros_after"] == 6
    sparse, info = out.to_sparse(min_sparsity=0.1)
    assert list(info["converted"]) == ["2"] and info["cpu"]["sparse_ms"] > 0
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(sparse(x), m(x), atol=1e-6)


# ---------------------------------------------------------------- Torch-Pruning

def test_same_count_as_torch_pruning():
    tp = pytest.importorskip("torch_pruning", reason="torch_pruning is not installed")

    def make():
        torch.manual_seed(24)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
        with torch.no_grad():
            m[3].weight[:, [1, 5]] = 0     # channels 1, 5 of conv 0 unused
            m[8].weight[:, 2] = 0          # channel 2 of conv 3 unused
        return m.eval()

    x = torch.randn(2, 3, 8, 8)
    ours = check(make(), x)
    theirs = make()
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    dg.get_pruning_group(theirs[0], tp.prune_conv_out_channels, idxs=[1, 5]).prune()
    dg.get_pruning_group(theirs[3], tp.prune_conv_out_channels, idxs=[2]).prune()
    assert ours.report.params_after == _params(theirs)
    assert ours.model.get_submodule("0").out_channels == theirs[0].out_channels == 6


# ---------------------------------------------------------------- a ResNet-like model

class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet(widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3), classes=1000):
    layers = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(Bottleneck(cin, w, 4 * w, 2 if j == 0 and i > 0 else 1))
            cin = 4 * w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def zero_some_channels(model, frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(generator=g)
                mod.running_var.uniform_(0.5, 2, generator=g)
                mod.bias.normal_(generator=g)
            if isinstance(mod, Bottleneck):
                for conv, bn in ((mod.conv1, mod.bn1), (mod.conv2, mod.bn2)):
                    k = int(conv.out_channels * frac)
                    idx = torch.randperm(conv.out_channels, generator=g)[:k]
                    conv.weight[idx] = 0
                    bn.weight[idx[: k // 2]] = 0      # some through a zero gamma instead
    return model


def test_small_resnet():
    _seed(25)
    m = zero_some_channels(resnet(widths=(4, 8), blocks=(2, 2), classes=5)).eval()
    out = check(m, torch.randn(2, 3, 32, 32))
    assert out.report.params_after < _params(m)


# ---------------------------------------------------------------- what only other inputs would show

def _same_on(model, out, inputs):
    """The compacted model computes the original's on each of ``inputs`` (other sizes than the example's)."""
    model.eval()
    with torch.no_grad():
        for x in inputs:
            ref, got = model(x), out.model(x)
            assert ref.shape == got.shape and float((ref - got).abs().max()) <= 1e-5 * max(1.0, float(
                ref.abs().max())), tuple(x.shape)


class _SeqSum(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.fc1, self.fc2, self.dims = nn.Linear(6, 8), nn.Linear(8, 3), dims

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).sum(self.dims))


class _ConvSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).sum((2, 3)))


@pytest.mark.parametrize("case", ["time", "batch", "space"])
def test_a_constant_summed_over_positions_is_kept_and_a_zero_one_removed(case):
    """sum() over positions scales a constant channel by their number, which may differ from input to
    input (not folded); a channel that is 0 stays 0 (removed)."""
    _seed(40)
    m = _ConvSum() if case == "space" else _SeqSum(1 if case == "time" else 0)
    first = m.c if case == "space" else m.fc1
    with torch.no_grad():
        first.weight[2] = 0
        first.bias[2] = 0.7   # relu(0.7): a constant that the sum multiplies
        first.weight[5] = 0
        first.bias[5] = -0.3  # relu(-0.3) = 0: nothing to fold
    example = {"time": torch.randn(4, 5, 6), "batch": torch.randn(4, 6), "space": torch.randn(2, 3, 8, 8)}[case]
    others = {"time": [torch.randn(4, 9, 6), torch.randn(2, 1, 6)], "batch": [torch.randn(7, 6)],
              "space": [torch.randn(2, 3, 12, 12)]}[case]
    out = check(m, example)
    assert out.report.layers[0].removed["outputs"] == [5]
    _same_on(m, out, others)


class _Scaled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc1, self.fc2, self.how = nn.Linear(6, 8), nn.Linear(8, 3), how
        self.register_buffer("gain", torch.tensor(1.5))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.how == "input scale":
            h = h * x.abs().mean()
        elif self.how == "batch size":
            h = h / x.size(0)
        else:
            h = h * self.gain  # a buffer: the same for every input
        return self.fc2(h)


@pytest.mark.parametrize("how", ["input scale", "batch size", "buffer"])
def test_a_constant_times_a_value_of_the_input_is_not_a_constant(how):
    _seed(41)
    m = _Scaled(how)
    with torch.no_grad():
        m.fc1.weight[2] = 0
        m.fc1.bias[2] = 0.7
    out = check(m, torch.randn(4, 6))
    assert out.report.layers[0].removed.get("outputs", []) == ([2] if how == "buffer" else [])
    _same_on(m, out, [3 * torch.randn(4, 6), torch.randn(9, 6)])


def test_a_layer_also_called_on_an_input_not_followed_keeps_its_columns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.shared = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.shared(torch.relu(self.a(x))) + self.shared(torch.softmax(self.b(x), -1))

    _seed(42)
    m = M()
    with torch.no_grad():
        m.shared.weight[:, 2] = 0
    out = check(m, torch.randn(4, 6))
    assert out.model.shared.in_features == 8


class _Keywords(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.o, self.how = nn.Linear(5, 8), nn.Linear(8, 2), how
        if how in ("add", "mul"):
            self.b = nn.Linear(5, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "module":
            return self.o(input=h)
        if self.how == "flatten":
            return self.o(torch.flatten(input=h, start_dim=1))
        g = torch.relu(self.b(x))
        if self.how == "add":
            return self.o(torch.add(h, other=g))
        return self.o(h.mul(other=g))


@pytest.mark.parametrize("how", ["module", "flatten", "add", "mul"])
@pytest.mark.parametrize("zeroed", [False, True])
def test_a_tensor_passed_by_keyword_is_kept_whole(how, zeroed):
    _seed(43)
    m = _Keywords(how)
    if zeroed:
        with torch.no_grad():
            m.o.weight[:, 3] = 0
    out = check(m, torch.randn(3, 5))
    assert out.model.a.out_features == 8


def _double(w):
    return 2 * w


class _Double(nn.Module):
    def forward(self, w):
        return _double(w)


@pytest.mark.parametrize("how", ["parametrization", "weight_norm", "spectral_norm", "hook", "pre-hook"])
def test_layers_with_parametrizations_or_hooks_are_left_whole(how):
    from torch.nn.utils import parametrizations, parametrize

    _seed(44)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight[4] = 0
        m[0].bias[4] = 0.5
        m[2].weight[:, [2, 5]] = 0
        m[4].weight[:, 1] = 0
    if how == "parametrization":
        parametrize.register_parametrization(m[2], "weight", _Double())
    elif how == "weight_norm":
        parametrizations.weight_norm(m[2])
    elif how == "spectral_norm":
        parametrizations.spectral_norm(m[2])
    elif how == "hook":  # makes the "constant" neuron 4 of m[0] depend on the input
        m[2].register_forward_hook(lambda mod, inp, out: out + inp[0].mean(-1, keepdim=True))
    else:
        m[2].register_forward_pre_hook(lambda mod, inp: (inp[0] * torch.linspace(0.5, 2, 8),))
    out = check(m, torch.randn(5, 6))
    assert "2" in out.report.left_alone, out.report.left_alone
    assert out.model.get_submodule("2").in_features == 8
    _same_on(m, out, [torch.randn(9, 6), torch.randn(1, 6)])


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_a_model_that_cannot_be_copied_is_refused_unchanged():
    _seed(45)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), torch.nn.utils.weight_norm(nn.Linear(8, 3)))
    m(torch.randn(2, 6)).sum().backward()  # (its computed weight is not a leaf: deepcopy refuses it)
    before = _state(m)
    with pytest.raises(ValueError, match="cannot be copied with copy.deepcopy"):
        pyreg.compact(m, torch.randn(4, 6), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_tied_layers_stay_tied_and_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.enc(x)))))))

    _seed(46)
    m = Tied()
    with torch.no_grad():
        m.a.weight[:, 3] = 0
        m.out.weight[:, 5] = 0
    out = check(m, torch.randn(4, 6))  # (its params_before is the model's own count)
    assert out.model.a.weight is out.model.b.weight
    assert out.report.left_alone.get("a") == "it shares a parameter with b"


def test_a_width_read_by_the_forward_keeps_the_channels():
    class M(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.fc1, self.fc2, self.how = nn.Linear(6, 8), nn.Linear(8, 3), how

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            width = h.shape[-1] if self.how == "shape" else h.size(1) if self.how == "size" else h.size()[-1]
            return self.fc2(h) / width ** 0.5

    for how in ("shape", "size", "size()"):
        _seed(47)
        m = M(how)
        with torch.no_grad():
            m.fc2.weight[:, [2, 5]] = 0
        out = check(m, torch.randn(4, 6))
        assert out.model.fc2.in_features == 8, how


def test_meta_inputs_or_weights_are_refused():
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is on the meta device"):
        pyreg.compact(m, torch.randn(4, 6, device="meta"), measure=False)
    with pytest.raises(ValueError, match="the model's 0.weight is on the meta device"):
        pyreg.compact(m.to("meta"), torch.randn(4, 6), measure=False)


# ---------------------------------------------------------------- calls and forms the analysis follows

class _GruTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.r, self.o = nn.GRU(6, 10, num_layers=2, batch_first=True), nn.Linear(20, 3)

    def forward(self, x, y):
        a, _ = self.r(x)
        b, _ = self.r(y)
        return self.o(torch.cat([a[:, -1], b[:, -1]], -1))


def test_a_multilayer_rnn_called_twice():
    """A shared recurrent encoder: its inner layer's dead unit goes once, whatever the number of calls."""
    _seed(0)
    m = _GruTwice()
    with torch.no_grad():
        for t in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(m.r, t).view(3, 10, -1)[:, 3] = 0  # unit 3 of layer 0: every gate's row zero
    out = check(m, (torch.randn(4, 5, 6), torch.randn(4, 5, 6)))
    assert out.report.params_after < out.report.params_before
    assert [r.removed for r in out.report.layers if r.name == "r"] == [{"hidden_l0": [3]}]


class _PoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.p, self.c2 = nn.Conv2d(3, 8, 3), nn.MaxPool2d(2, return_indices=True), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(self.p(self.c(x))[0])


def test_a_pool_returning_indices_keeps_the_channels():
    _seed(1)
    m = _PoolIndices()
    with torch.no_grad():
        m.c.weight[2] = 0
        m.c.bias[2] = 0
    out = check(m, torch.randn(2, 3, 12, 12))
    assert "return_indices" in out.report.left_alone["p"] and out.report.params_after == out.report.params_before


class _Maxout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.p, self.o = nn.Linear(6, 16), nn.MaxPool1d(2), nn.Linear(8, 2)

    def forward(self, x):
        return self.o(self.p(self.a(x)))  # (a 2-D input: MaxPool1d pools the features themselves)


class _PoolOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.p, self.c2 = nn.Conv1d(3, 8, 1), nn.MaxPool2d((3, 1), stride=1, padding=(1, 0)), nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.c2(self.p(self.c(x)))  # (a 3-D input: MaxPool2d's window runs over the channels)


@pytest.mark.parametrize("case", ["maxout", "pool2d_on_3d"])
def test_a_pool_over_the_channel_dim_keeps_the_channels(case):
    _seed(2)
    m, x = (_Maxout(), torch.randn(4, 6)) if case == "maxout" else (_PoolOverChannels(), torch.randn(4, 3, 10))
    first, last = (m.a, m.o) if case == "maxout" else (m.c, m.c2)
    with torch.no_grad():
        first.weight[3] = 0
        first.bias[3] = 5.0  # a constant channel, which the pool mixes with its neighbours
        last.weight[:, 3 if case != "maxout" else 1] = 0
    out = check(m, x)
    assert out.report.params_after == out.report.params_before
    assert any("pooled over the channel dim" in r for g in out.report.kept_zero_groups.values() for r in g["reasons"])


class _ReshapeByKeyword(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c, self.f, self.how = nn.Conv2d(1, 16, 5, stride=6), nn.Linear(256, 10), how

    def forward(self, x):
        h = torch.relu(self.c(x))
        h = torch.reshape(h, shape=(-1, 256)) if self.how == "function" else h.reshape(shape=(-1, 256))
        return self.f(h)


@pytest.mark.parametrize("how", ["function", "method"])
def test_a_literal_size_given_by_keyword_is_rewritten(how):
    _seed(3)
    m = _ReshapeByKeyword(how)
    with torch.no_grad():
        m.c.weight[3] = 0
        m.c.bias[3] = 0
    out = check(m, torch.randn(2, 1, 24, 24))
    assert out.report.params_after < out.report.params_before
    _same_on(m, out, [torch.randn(5, 1, 24, 24)])


class _DimsByKeyword(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c, self.l, self.how = nn.Conv1d(4, 8, 3), nn.Linear(8, 3), how

    def forward(self, x):
        h = self.c(x)
        h = {"transpose": lambda: h.transpose(dim0=1, dim1=2), "permute": lambda: h.permute(dims=(0, 2, 1)),
             "torch.transpose": lambda: torch.transpose(h, dim0=1, dim1=2),
             "torch.permute": lambda: torch.permute(h, dims=(0, 2, 1))}[self.how]()
        return self.l(h)


@pytest.mark.parametrize("how", ["transpose", "permute", "torch.transpose", "torch.permute"])
def test_dims_given_by_keyword(how):
    _seed(4)
    m = _DimsByKeyword(how)
    with torch.no_grad():
        m.l.weight[:, 5] = 0  # channel 5 of the conv is read by nothing: it goes
    out = check(m, torch.randn(2, 4, 10))
    assert [r.removed for r in out.report.layers if r.name == "c"] == [{"outputs": [5]}]
    _same_on(m, out, [torch.randn(3, 4, 7)])


class _LastState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.o = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        return self.o(self.lstm(x)[-1][-2][-1])  # (h_n, c_n)[0][last layer], by negative indices


def test_an_rnn_result_indexed_from_the_end():
    _seed(5)
    m = _LastState()
    with torch.no_grad():
        m.o.weight[:, 2] = 0
        for t in ("weight_ih_l0", "weight_hh_l0"):
            getattr(m.lstm, t).view(4, 6, -1)[:, 2] = 0
        m.lstm.weight_hh_l0[:, 2] = 0  # unit 2 is read by no other unit and by no layer
    out = check(m, torch.randn(2, 5, 4))
    assert out.report.params_after < out.report.params_before
    _same_on(m, out, [torch.randn(3, 9, 4)])


def test_a_compacted_model_that_fails_to_run_is_a_bug_named_at_its_node(monkeypatch):
    """The check run of the result raising is reported as compact's bug, with the node that raised."""
    from pyreg.compact import _report

    real, calls = _report.capture, []

    def capture(gm, args, at=None):
        calls.append(1)
        if len(calls) == 1:
            return real(gm, args, at)
        at[:] = [next(n for n in gm.graph.nodes if n.op == "call_module")]
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\nWhile executing ...")

    monkeypatch.setattr(_report, "capture", capture)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    before = _state(m)
    with pytest.raises(RuntimeError, match=r"fails on example_inputs at _0 \(call_module 0\) \(RuntimeError: mat1 "
                                           r"and mat2 shapes cannot be multiplied\).*This is a bug; the original "
                                           r"model is unchanged"):
        pyreg.compact(m, torch.randn(5, 4), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_sparse_leaves_dense_what_torch_cannot_multiply(dtype):
    _seed(6)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype).eval()
    with torch.no_grad():
        m[0].weight[:, :6] = 0
    out = pyreg.compact(m, torch.randn(4, 8, dtype=dtype), measure=False)
    sparse, info = out.to_sparse(min_sparsity=0.1, measure=True)
    x = torch.randn(3, 8, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), out.model(x))  # it runs: what torch cannot multiply stays dense
    for name, why in info["left_dense"].items():
        assert "CSR has no" in why and name not in info["converted"]
    assert info["cpu"]["dense_ms"] > 0


class _SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.q, self.o = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.o(self.q(torch.relu(self.a(x))) + self.q(torch.relu(self.b(x))))


def test_a_layer_called_twice_drops_a_neuron_that_is_zero_in_both_calls():
    """A constant 0 into a layer called twice needs no folding: the neuron goes (a nonzero constant
    cannot go: one bias would hold both calls' folds)."""
    _seed(7)
    m = _SharedLayer()
    with torch.no_grad():
        for lin in (m.a, m.b):
            lin.weight[5] = 0
            lin.bias[5] = -1.0  # relu(-1) = 0 in both calls
    out = check(m, torch.randn(6, 4))
    removed = {r.name: r.removed for r in out.report.layers if r.removed}
    assert removed == {"a": {"outputs": [5]}, "b": {"outputs": [5]}, "q": {"inputs": [5]}}
    with torch.no_grad():
        m.b.bias[5] = 1.0  # now 1 in the second call: kept
    out = check(m, torch.randn(6, 4))
    assert out.report.params_after == out.report.params_before


def test_an_input_normalized_before_its_conv_loses_its_zero_channel():
    _seed(8)
    m = nn.Sequential(nn.BatchNorm1d(4), nn.Conv1d(4, 3, 3)).eval()
    with torch.no_grad():
        m[0].running_mean.uniform_(-1, 1)
        m[1].weight[:, 1] = 0
    out = check(m, torch.randn(3, 4, 10))
    assert out.report.inputs["input_1"]["dim"] == 1 and out.report.inputs["input_1"]["removed"] == [1]
    _same_on(m, out, [torch.randn(2, 4, 7)])


class _CudaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.r, self.o = nn.Conv1d(5, 8, 3), nn.BatchNorm1d(8), nn.GRU(8, 6, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.c(x)))           # [B, 8, L]
        y, _ = self.r(h.permute(2, 0, 1))             # [L, B, 6]
        return self.o(y[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compact_on_cuda():
    """A model on the GPU: input columns gathered, a constant channel folded, BatchNorm sliced, an
    inner recurrent unit removed, the latency measured on the GPU; the result on the GPU."""
    _seed(9)
    m = _CudaNet()
    with torch.no_grad():
        m.c.weight[:, 1] = 0                 # input channel 1: read by nothing
        m.c.weight[4] = 0                    # conv channel 4: a constant (its bias), folded into the GRU
        for t in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(m.r, t).view(3, 6, -1)[:, 2] = 0
    m = m.cuda().eval()
    x = torch.randn(4, 5, 9, device="cuda")
    out = pyreg.compact(m, x, measure=True)
    assert out.report.params_after < out.report.params_before
    assert all(p.is_cuda for p in out.model.parameters()) and all(b.is_cuda for b in out.model.buffers())
    assert out.report.inputs["x"]["removed"] == [1] and out.report.latency["cuda"]["after_ms"] > 0
    _same_on(m, out, [torch.randn(3, 5, 11, device="cuda")])


def test_an_in_place_call_whose_memory_a_later_tensor_reuses_is_followed():
    """A tensor written in place (nn.ReLU(inplace=True)) whose memory is
    freed after its last read, and handed out again to a later tensor of the
    same size: no alias, followed (it was refused as a view read later)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act = nn.Linear(64, 64), nn.ReLU(inplace=True)
            self.fc2, self.fc3, self.fc4 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2)

        def forward(self, x):
            return self.fc4(self.fc3(self.fc2(self.act(self.fc1(x)))))
    _seed(3)
    m = Net()
    with torch.no_grad():
        m.fc2.weight[:, 5] = 0  # an input of fc2 to drop: fc1's row 5
    for batch in range(8, 1100, 24):  # (whether the allocator hands a block out again varies with the size)
        out = pyreg.compact(m.eval(), torch.randn(batch, 64), measure=False)
        assert out.report.params_after < _params(m)
    check(m, torch.randn(256, 64))


@pytest.mark.parametrize("affine, stats", [(False, False), (False, True), (True, False)])
def test_batchnorm_without_weights_or_running_stats(affine, stats):
    """A BatchNorm with no affine weights and no running statistics has
    nothing of its own to cut: its channel goes with the layers around it."""
    _seed(5)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=affine, track_running_stats=stats), nn.ReLU(),
                      nn.Linear(6, 2))
    with torch.no_grad():
        m[3].weight[:, 1] = 0  # channel 1 unused by the head
    out = check(m, torch.randn(7, 5))
    assert out.report.params_after < _params(m)
    assert out.model.get_submodule("1").num_features == 5


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_a_recurrent_layer_given_an_initial_state_keeps_the_state_s_channels(kind):
    """An initial state computed by a layer (h0 = init(z)): the recurrent
    layer is left alone, and so are the channels of its state (the layer
    making h0 lost rows it has no zeros in, and the model no longer ran)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.init, self.rnn, self.head = nn.Linear(5, 8), kind(4, 8, batch_first=True), nn.Linear(8, 2)
            self.drop = nn.Linear(6, 4)

        def forward(self, x, z):
            h0 = self.init(z)[None]
            state = h0 if kind is nn.GRU else (h0, torch.zeros_like(h0))
            out, _ = self.rnn(self.drop(x), state)
            return self.head(out[:, -1])
    _seed(6)
    m = Net()
    with torch.no_grad():
        m.drop.weight[:, 2] = 0  # an input column of drop: still removable
    out = check(m, (torch.randn(3, 7, 6), torch.randn(3, 5)))
    assert out.model.get_submodule("init").out_features == 8
    assert "rnn" in out.report.left_alone


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooks_on_the_model_itself_are_refused(kind):
    """The traced forward runs no hooks of the model itself: refused (a
    logging hook vanished from the result without a word), nothing changed;
    hooks on a layer leave that layer whole."""
    _seed(7)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        m[2].weight[:, 1] = 0
    hook = (lambda mod, inp, out: out) if kind == "forward" else (lambda mod, inp: None)
    handle = m.register_forward_hook(hook) if kind == "forward" else m.register_forward_pre_hook(hook)
    before = _state(m)
    with pytest.raises(ValueError, match="forward hooks of its own"):
        pyreg.compact(m, torch.randn(5, 4), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    handle.remove()
    m[2].register_forward_hook(hook if kind == "forward" else (lambda mod, inp, out: out))
    out = check(m, torch.randn(5, 4))
    assert "2" in out.report.left_alone


@pytest.mark.parametrize("dims", [1, 2])
def test_a_conv_on_an_unbatched_input_is_left_alone(dims):
    """torch's convs take an unbatched input ([C, L], [C, H, W]), whose
    channel dim is 0: the conv is left alone with its reason (compact took
    dim 1 for its channels and failed)."""
    _seed(8)
    conv = nn.Conv1d(4, 4, 1) if dims == 1 else nn.Conv2d(3, 5, 3)
    m = nn.Sequential(conv, nn.ReLU(), nn.Linear(4 if dims == 1 else 7, 2))
    with torch.no_grad():
        m[2].weight[:, 1] = 0
        conv.weight[1] = 0
    x = torch.randn(4, 4) if dims == 1 else torch.randn(3, 9, 9)
    out = check(m, x)
    assert "unbatched" in out.report.left_alone["0"]


@pytest.mark.parametrize("how", ["nan", "random"])
def test_an_output_that_cannot_be_checked_is_refused(how):
    """The result is checked against the model's output on the example: an
    output with NaN, or one that differs between two eval-mode runs (a
    dropout forced on), is refused as such (it was reported as an internal
    error), nothing changed."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            if how == "random":
                h = torch.nn.functional.dropout(h, 0.5, training=True)
            else:
                h = h / h.sum(1, keepdim=True) * 0  # 0 / 0 where a row is all zero
            return self.out(h)
    _seed(9)
    m = Net()
    with torch.no_grad():
        m.out.weight[:, 1] = 0
        if how == "nan":  # every pre-activation negative: 0 / 0
            m.fc.weight.zero_()
            m.fc.bias.fill_(-1.0)
    before = _state(m)
    with pytest.raises(ValueError, match="NaN or inf" if how == "nan" else "differs between two runs"):
        pyreg.compact(m, torch.randn(5, 4), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_the_report_counts_every_parameter_of_the_model():
    """The report's totals are the model's: parameters the forward reads
    itself in one row, and those of a layer it never calls (which the
    result does not hold) in another, removed."""
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.g = nn.Parameter(torch.full((n,), 2.0))

        def forward(self, x):
            return x * self.g

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.sc, self.fc2 = nn.Linear(6, 8), Scale(8), nn.Linear(8, 2)
            self.temp = nn.Parameter(torch.tensor(3.0))
            self.unused = nn.Linear(10, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.sc(self.fc1(x)))) / self.temp
    _seed(10)
    m = Net()
    out = check(m, torch.randn(4, 6))
    rows = {r.name: r for r in out.report.layers}
    assert (rows["(other parameters)"].params_before, rows["(other parameters)"].params_after) == (9, 9)
    assert (rows["(unused by the forward)"].params_before, rows["(unused by the forward)"].params_after) == (110, 0)
    assert out.report.params_before == _params(m)
    assert out.report.params_after == _params(out.model)
    assert "a tensor of shape (8,) differs from channel to channel" in out.report.left_alone["mul"]


def test_a_trace_that_fails_where_the_model_runs_says_so():
    """A forward with an argument left to its default (mask=None) runs on
    the example, but torch.fx traces the branch for a given mask: the error
    says the trace fails, not the model (it said the model cannot run)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(6, 4), nn.Linear(4, 2)

        def forward(self, x, mask=None):
            h = self.fc(x).relu()
            if mask is not None:
                h = h * mask
            return self.out(h)
    _seed(11)
    m = Net()
    before = _state(m)
    with pytest.raises(ValueError, match="runs on example_inputs but its torch.fx trace does not"):
        pyreg.compact(m, torch.randn(3, 6), measure=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("batch_first", [True, False])
def test_macs_of_every_convolution_and_of_attention(batch_first):
    """The report's multiply-adds of a Conv3d and a ConvTranspose2d are
    torch's flop counter's (halved), and a MultiheadAttention's are its four
    projections (torch's count of its linear layers) plus its scores and
    their weighted sum of the values, L * S * E per sample each."""
    from torch.utils.flop_counter import FlopCounterMode

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3, self.ct = nn.Conv3d(2, 4, 3, padding=1), nn.ConvTranspose2d(4, 3, 3, stride=2, groups=1)
            self.att = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=5, vdim=4)

        def forward(self, v, q, k, val):
            o, _ = self.att(q, k, val, need_weights=False)
            return self.ct(self.c3(v).mean(2)).sum() + o.sum()

    _seed(7)
    m = M().eval()
    n, L, S = 3, 7, 5
    shape = (lambda b, t, c: (b, t, c)) if batch_first else (lambda b, t, c: (t, b, c))
    args = (torch.randn(n, 2, 4, 5, 6), torch.randn(shape(n, L, 6)), torch.randn(shape(n, S, 5)),
            torch.randn(shape(n, S, 4)))
    macs = {r.name: r.macs_before for r in pyreg.compact(m, args, measure=False).report.layers}
    with torch.no_grad(), FlopCounterMode(display=False) as count:
        m.ct(m.c3(args[0]).mean(2))
    flops = {str(k): sum(v.values()) for k, v in count.get_flop_counts().items()}
    assert macs["c3"] == flops["Conv3d"] // 2 and macs["ct"] == flops["ConvTranspose2d"] // 2
    projections = n * L * 6 * 6 + n * S * (5 + 4) * 6 + n * L * 6 * 6
    assert macs["att"] == projections + 2 * n * L * S * 6


class _KimTextCNN(nn.Module):
    """Embeddings unsqueezed into one input channel of a Conv2d whose kernel
    spans the embedding dim (Kim 2014): the embedding dims reach the conv
    along another dim than its channels."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv, self.fc = nn.Embedding(40, 8), nn.Conv2d(1, 5, (3, 8)), nn.Linear(5, 3)

    def forward(self, t):
        h = F.relu(self.conv(self.emb(t).unsqueeze(1))).squeeze(3)  # [B, 5, L - 2]
        return self.fc(h.max(dim=2)[0])


class _UnitLinear(nn.Module):
    """A Linear over a dim of size 1 made by unsqueeze (a layer reading the
    followed channels along another dim)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.up, self.fc2 = nn.Linear(6, 4), nn.Linear(1, 3), nn.Linear(12, 2)

    def forward(self, x):
        return self.fc2(self.up(self.fc1(x).unsqueeze(-1)).flatten(1))


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("make, x", [(_KimTextCNN, lambda: torch.randint(0, 40, (4, 6))),
                                     (_UnitLinear, lambda: torch.randn(4, 6))], ids=["kim", "unit-linear"])
def test_a_layer_reading_channels_along_another_dim_keeps_them(make, x, zeros):
    _seed(9)
    m = make()
    if zeros:
        with torch.no_grad():
            (m.fc if make is _KimTextCNN else m.fc2).weight[:, 1] = 0
    out = check(m, x())
    if make is _KimTextCNN:  # (the conv's channels are followed: its output channel 1 is unused)
        assert out.report.layers[1].removed == ({"outputs": [1]} if zeros else {})


class _Squeezed(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.fc1, self.fc2 = how, nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.squeeze() if self.how == "every" else h.squeeze(1))


@pytest.mark.parametrize("how", ["every", "channel"])
def test_a_squeeze_that_may_drop_the_channel_dim_keeps_the_channels(how):
    """Three of four neurons unused: compaction would leave the channel dim
    1 wide, and a squeeze of every dim of size 1, or of the channel dim (a
    no-op at width 4), would then drop it; the channels are kept."""
    _seed(9)
    m = _Squeezed(how)
    with torch.no_grad():
        m.fc2.weight[:, 1:] = 0
    out = check(m, torch.randn(5, 6))
    assert out.report.params_after == out.report.params_before and "squeeze" in str(out.report.left_alone)
    with torch.no_grad():
        for b in (1, 2, 7):
            y = torch.randn(b, 6)
            torch.testing.assert_close(out.model(y), m(y))


@pytest.mark.parametrize("op", ["transpose", "cat"])
def test_a_dim_computed_in_the_forward_keeps_the_channels(op):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            if op == "cat":
                return self.fc(torch.cat([a, b], dim=a.ndim - 1))
            return self.fc(torch.cat([a, b], 1).transpose(0, a.ndim - 1).transpose(0, 1))

    _seed(9)
    m = M()
    with torch.no_grad():
        m.fc.weight[:, 2] = 0
    try:
        torch.fx.symbolic_trace(M())
    except TypeError:  # (torch.fx of torch before 2.8 cannot pass a traced dim to torch.cat: compact says so)
        with pytest.raises(ValueError, match="cannot be traced by torch.fx.symbolic_trace"):
            pyreg.compact(m, torch.randn(5, 4), measure=False)
        return
    out = check(m, torch.randn(5, 4))
    assert "computed in the forward" in str(out.report.left_alone)


def test_macs_of_attention_with_keyword_inputs_and_extra_key_positions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True)

        def forward(self, q, k):
            return self.att(q, key=k, value=k, need_weights=False)[0]

    _seed(9)
    n, L, S, e = 3, 7, 5, 6
    out = pyreg.compact(M().eval(), (torch.randn(n, L, e), torch.randn(n, S, e)), measure=False)
    projections = n * L * e * e + n * S * 2 * e * e + n * L * e * e
    assert out.report.layers[0].macs_before == projections + 2 * n * L * (S + 2) * e
