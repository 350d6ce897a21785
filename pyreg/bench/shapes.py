"""Parameter shape sets of real models, written out explicitly (no torchvision,
no downloads): the lists of weight tensors pyreg's ops would cover.

Each set is a list of ``(name, shape)``; :func:`get` returns it with metadata.
The element counts are those of the reference implementations (checked in
``tests/test_bench.py``): ResNet-50 25,557,032 (torchvision), GPT-2 124M
124,439,808 (Hugging Face ``gpt2``, tied lm_head counted once), ViT-Ti/16
5,717,416 (timm ``vit_tiny_patch16_224``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ShapeSet:
    name: str
    description: str
    shapes: List[Tuple[str, Shape]]
    gpu_only: bool = False

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def count(self) -> int:
        return len(self.shapes)


def _linear(prefix: str, fan_in: int, fan_out: int, bias: bool = True):
    out = [(f"{prefix}.weight", (fan_out, fan_in))]
    if bias:
        out.append((f"{prefix}.bias", (fan_out,)))
    return out


def mlp() -> List[Tuple[str, Shape]]:
    """MNIST-style MLP 784-512-512-10 (669,706 parameters, 6 tensors)."""
    return _linear("fc1", 784, 512) + _linear("fc2", 512, 512) + _linear("fc3", 512, 10)


def lstm() -> List[Tuple[str, Shape]]:
    """Word-level LSTM language model (PyTorch's word_language_model layout):
    embedding 5000x256, 2-layer nn.LSTM(256, 512), decoder Linear(512, 5000);
    7,523,208 parameters, 11 tensors."""
    vocab, emb, hidden = 5000, 256, 512
    out = [("encoder.weight", (vocab, emb))]
    for layer, fan_in in enumerate((emb, hidden)):
        out += [(f"rnn.weight_ih_l{layer}", (4 * hidden, fan_in)),
                (f"rnn.weight_hh_l{layer}", (4 * hidden, hidden)),
                (f"rnn.bias_ih_l{layer}", (4 * hidden,)),
                (f"rnn.bias_hh_l{layer}", (4 * hidden,))]
    return out + _linear("decoder", hidden, vocab)


def resnet50() -> List[Tuple[str, Shape]]:
    """torchvision ResNet-50 (v1.5): 25,557,032 parameters, 161 tensors
    (conv weights, BatchNorm weight and bias, fc)."""
    out: List[Tuple[str, Shape]] = []

    def bn(prefix, c):
        out.extend([(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))])

    out.append(("conv1.weight", (64, 3, 7, 7)))
    bn("bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            out.append((f"{p}.conv1.weight", (planes, inplanes, 1, 1)))
            bn(f"{p}.bn1", planes)
            out.append((f"{p}.conv2.weight", (planes, planes, 3, 3)))
            bn(f"{p}.bn2", planes)
            out.append((f"{p}.conv3.weight", (planes * 4, planes, 1, 1)))
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                out.append((f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)))
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return out + _linear("fc", 2048, 1000)


def vit_tiny() -> List[Tuple[str, Shape]]:
    """ViT-Ti/16 at 224x224 (DeiT-Tiny; timm ``vit_tiny_patch16_224`` names):
    12 blocks of width 192, 3 heads, MLP 768, 1000 classes; 5,717,416
    parameters, 152 tensors: a small model with many small tensors."""
    d, hidden = 192, 768
    out: List[Tuple[str, Shape]] = [("cls_token", (1, 1, d)), ("pos_embed", (1, 197, d)),
                                    ("patch_embed.proj.weight", (d, 3, 16, 16)),
                                    ("patch_embed.proj.bias", (d,))]
    for i in range(12):
        b = f"blocks.{i}"
        out += [(f"{b}.norm1.weight", (d,)), (f"{b}.norm1.bias", (d,))]
        out += _linear(f"{b}.attn.qkv", d, 3 * d) + _linear(f"{b}.attn.proj", d, d)
        out += [(f"{b}.norm2.weight", (d,)), (f"{b}.norm2.bias", (d,))]
        out += _linear(f"{b}.mlp.fc1", d, hidden) + _linear(f"{b}.mlp.fc2", hidden, d)
    return out + [("norm.weight", (d,)), ("norm.bias", (d,))] + _linear("head", d, 1000)


def gpt(n_layer: int, d: int, vocab: int = 50257, ctx: int = 1024, prefix: str = "transformer"):
    """GPT-2 layout (Hugging Face names): wte, wpe, per block ln_1, attn.c_attn,
    attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj (Conv1D weights are (in, out)),
    ln_f; the lm_head is tied to wte and not listed twice."""
    out: List[Tuple[str, Shape]] = [(f"{prefix}.wte.weight", (vocab, d)), (f"{prefix}.wpe.weight", (ctx, d))]
    for i in range(n_layer):
        h = f"{prefix}.h.{i}"
        out += [(f"{h}.ln_1.weight", (d,)), (f"{h}.ln_1.bias", (d,)),
                (f"{h}.attn.c_attn.weight", (d, 3 * d)), (f"{h}.attn.c_attn.bias", (3 * d,)),
                (f"{h}.attn.c_proj.weight", (d, d)), (f"{h}.attn.c_proj.bias", (d,)),
                (f"{h}.ln_2.weight", (d,)), (f"{h}.ln_2.bias", (d,)),
                (f"{h}.mlp.c_fc.weight", (d, 4 * d)), (f"{h}.mlp.c_fc.bias", (4 * d,)),
                (f"{h}.mlp.c_proj.weight", (4 * d, d)), (f"{h}.mlp.c_proj.bias", (d,))]
    return out + [(f"{prefix}.ln_f.weight", (d,)), (f"{prefix}.ln_f.bias", (d,))]


def matrices(sset: ShapeSet) -> ShapeSet:
    """The set's tensors of two or more dimensions (weights, embeddings, conv
    kernels; no biases or norm scales), under the same name: what the group
    ops (group_prox_, max_norm_) are applied to."""
    return ShapeSet(sset.name, sset.description, [(n, s) for n, s in sset.shapes if len(s) >= 2],
                    sset.gpu_only)


SETS = {
    "mlp": ShapeSet("mlp", "MLP 784-512-512-10", mlp()),
    "lstm": ShapeSet("lstm", "2-layer LSTM LM (vocab 5000, emb 256, hidden 512)", lstm()),
    "vit-tiny": ShapeSet("vit-tiny", "ViT-Ti/16 (DeiT-Tiny), 152 tensors", vit_tiny()),
    "resnet50": ShapeSet("resnet50", "ResNet-50", resnet50()),
    "gpt2": ShapeSet("gpt2", "GPT-2 124M", gpt(12, 768)),
    "gpt-1.3b": ShapeSet("gpt-1.3b", "GPT-3 XL layout, 1.3B (24 layers, d=2048, ctx 2048)",
                         gpt(24, 2048, ctx=2048), gpu_only=True),
}
ORDER = list(SETS)


def get(name: str) -> ShapeSet:
    return SETS[name]
