"""Counting (parameters, multiply-adds, zeros), latency measurement and the report of ``pyreg.compact``."""
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["Report", "LayerRow", "capture", "layer_counts", "measure_latency", "SparseLinear"]


def capture(gm, args, at: Optional[list] = None) -> Dict[str, object]:
    """Run ``gm`` on ``args`` and keep every node's value (``at``: holds the node running, so that
    a caller can name the one that raised)."""
    import torch.fx

    values = {}

    class _Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if at is not None:
                at[:] = [n]
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad():
        values["__output__"] = _Capture(gm).run(*args)
    return values


def _macs(mod: nn.Module, x, y, kv=None) -> int:
    """Multiply-adds of one call of ``mod`` on ``x`` giving ``y`` (``kv``: an
    attention's key input): Linear, every convolution (transposed too),
    recurrent layers, multi-head attention; 0 for other layers."""
    from ._rewrite import StackedRNN

    if isinstance(mod, nn.Linear) and isinstance(y, Tensor):
        return y.numel() * mod.in_features
    if isinstance(mod, nn.modules.conv._ConvNd) and isinstance(y, Tensor) and isinstance(x, Tensor):
        k = 1
        for s in mod.kernel_size:
            k *= s
        if mod.transposed:  # each input element meets out_channels / groups kernels
            return x.numel() * (mod.out_channels // mod.groups) * k
        return y.numel() * (mod.in_channels // mod.groups) * k
    if isinstance(mod, nn.MultiheadAttention) and isinstance(x, Tensor) and isinstance(kv, Tensor):
        e = mod.embed_dim
        n_q, n_k = x.numel() // x.shape[-1], kv.numel() // kv.shape[-1]  # (query and key positions, all samples)
        samples = 1 if x.dim() == 2 else x.shape[0 if mod.batch_first else 1]
        # (add_bias_kv and add_zero_attn each append a key and value position after the projections)
        length_k = n_k // samples + (mod.bias_k is not None) + bool(mod.add_zero_attn)
        projections = n_q * e * e + n_k * (mod.kdim + mod.vdim) * e + n_q * e * e  # q, k, v and the output's
        return projections + 2 * n_q * length_k * e  # the scores and their weighted sum of the values
    layers = mod.layers if isinstance(mod, StackedRNN) else [mod] if isinstance(mod, nn.RNNBase) else []
    total = 0
    if layers and isinstance(x, Tensor):
        steps = x.numel() // x.shape[-1]
        for layer in layers:
            gates = {nn.LSTM: 4, nn.GRU: 3}.get(type(layer), 1)
            for i in range(layer.num_layers):
                n_in = layer.input_size if i == 0 else layer.hidden_size
                total += steps * gates * layer.hidden_size * (n_in + layer.hidden_size) * (
                    2 if layer.bidirectional else 1)
    return total


def layer_counts(gm, values) -> Dict[str, dict]:
    """Per called layer: type, parameters (a shared one in its first layer's row), multiply-adds
    (Linear, conv, recurrent), exact zeros."""
    rows: Dict[str, dict] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        x = values.get(node.args[0].name) if node.args and hasattr(node.args[0], "name") else None
        y = values.get(node.name)
        if isinstance(y, tuple):
            y = y[0]
        row = rows.setdefault(node.target, {"type": type(mod).__name__, "params": 0, "macs": 0, "zeros": 0,
                                            "weights": 0})
        key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")  # (an attention's key input)
        kv = values.get(key.name) if hasattr(key, "name") else None
        row["macs"] += _macs(mod, x, y, kv)
    seen = set()  # a parameter shared by two layers (tied) counts in the first one's row
    for name, row in rows.items():
        mod = gm.get_submodule(name)
        for pname, p in mod.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            row["params"] += p.numel()
            if "weight" in pname:
                row["weights"] += p.numel()
                row["zeros"] += int((p.detach() == 0).sum())
    # parameters the forward reads itself (get_attr: the model's own, a custom module's), in one row
    rest = sum(p.numel() for p in gm.parameters() if id(p) not in seen)
    if rest:
        rows[OTHER_PARAMS] = {"type": "-", "params": rest, "macs": 0, "zeros": 0, "weights": 0}
    return rows


#: The report's row of the parameters that no called layer holds.
OTHER_PARAMS = "(other parameters)"
#: The report's row of the parameters of layers the forward never calls (not in the result).
UNUSED_PARAMS = "(unused by the forward)"


def measure_latency(models: List[nn.Module], args_list: List[tuple], device: str,
                    budget_s: float = 2.0) -> List[Dict[str, float]]:
    """Median seconds per call of each model, interleaved: model A, model B, A, B, ..."""
    moved = []
    for m, args in zip(models, args_list):
        m = m.to(device)  # (in place: the caller passes copies for another device than the model's)
        args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
        moved.append((m, args))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for m, args in moved:  # warm up
            m(*args)
            m(*args)
        sync()
        t0 = time.perf_counter()
        for m, args in moved:
            m(*args)
        sync()
        one = max(time.perf_counter() - t0, 1e-6)
        number = max(1, int(0.005 / one))       # calls per sample: at least ~5 ms of work per sample
        repeats = int(min(max(budget_s / (one * number), 7), 101))
        samples = [[] for _ in moved]
        for _ in range(repeats):
            for i, (m, args) in enumerate(moved):
                sync()
                t = time.perf_counter()
                for _ in range(number):
                    m(*args)
                sync()
                samples[i].append((time.perf_counter() - t) / number)
    return [{"median_s": statistics.median(s), "repeats": repeats, "calls_per_repeat": number} for s in samples]


class SparseLinear(nn.Module):
    """A Linear layer whose weight is stored as a torch.sparse CSR matrix."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @staticmethod
    def unsupported(linear: nn.Linear) -> Optional[str]:
        """Why torch cannot run this layer's weight as CSR on its device and dtype (a product of
        the same kind tried on a 2 x 2 matrix), or None."""
        w = linear.weight
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                torch.eye(2, dtype=w.dtype, device=w.device).to_sparse_csr() @ torch.ones(
                    2, 1, dtype=w.dtype, device=w.device)
        except (RuntimeError, NotImplementedError) as e:
            return (f"torch.sparse CSR has no {str(w.dtype).replace('torch.', '')} product on {w.device.type} "
                    f"({type(e).__name__})")
        return None

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        y = (self.weight @ flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass
class LayerRow:
    name: str
    type: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed: Dict[str, List[int]] = field(default_factory=dict)
    zeros_after: int = 0
    weights_after: int = 0


@dataclass
class Report:
    """What ``pyreg.compact`` removed, and what it cost and saved. ``str(report)`` is a table; ``to_dict()``."""
    layers: List[LayerRow]
    inputs: Dict[str, dict]
    left_alone: Dict[str, str]
    kept_zero_groups: Dict[str, dict]
    batch_size: Optional[int]
    max_abs_error: float
    output_scale: float
    drop_inputs: bool
    example_shapes: str = ""
    latency: Dict[str, dict] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(r.macs_before for r in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(r.macs_after for r in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(params_before=self.params_before, params_after=self.params_after,
                 macs_before=self.macs_before, macs_after=self.macs_after)
        return d

    def __str__(self) -> str:
        lines = []
        head = f"{'layer':<24} {'type':<12} {'params':>21} {'MACs':>25} {'zeros left':>12}  removed"
        lines += [head, "-" * len(head)]
        for r in self.layers:
            removed = "; ".join(f"{k} {_short(v)}" for k, v in r.removed.items()) or "-"
            zeros = f"{r.zeros_after}/{r.weights_after}" if r.weights_after else "-"
            lines.append(f"{r.name:<24} {r.type:<12} {r.params_before:>10,}->{r.params_after:<10,}"
                         f" {r.macs_before:>12,}->{r.macs_after:<12,} {zeros:>12}  {removed}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<24} {'':<12} {self.params_before:>10,}->{self.params_after:<10,}"
                     f" {self.macs_before:>12,}->{self.macs_after:<12,}")
        for name, inp in self.inputs.items():
            how = "the model now takes only these" if self.drop_inputs else "gathered inside the model"
            lines.append(f"input {name} (dim {inp['dim']}): kept {len(inp['kept'])} of {inp['size']} "
                         f"features {_short(inp['kept'])} ({how})")
        lines.append(f"outputs checked: max abs error {self.max_abs_error:.3g} (output scale {self.output_scale:.3g})")
        for dev, lat in self.latency.items():
            lines.append(f"latency {dev}, batch {self.batch_size} (example {self.example_shapes}): "
                         f"{lat['before_ms']:.4g} ms -> "
                         f"{lat['after_ms']:.4g} ms ({lat['speedup']:.2f}x; median of {lat['repeats']} "
                         f"interleaved repeats)")
        zeros = sum(r.zeros_after for r in self.layers)
        if zeros:
            lines.append(f"{zeros:,} element-wise zeros remain in weights: they do not speed up dense "
                         f"inference (see Compacted.to_sparse)")
        for name, reason in self.left_alone.items():
            lines.append(f"left alone: {name}: {reason}")
        for name, kept in self.kept_zero_groups.items():
            lines.append(f"kept {kept['count']} zero group(s) of {name}: {'; '.join(kept['reasons'])}")
        return "\n".join(lines)


def _short(idx: List[int], n: int = 12) -> str:
    s = ", ".join(map(str, idx[:n]))
    return f"[{s}{', ...' if len(idx) > n else ''}] ({len(idx)})"
