"""The demo's data sets, built locally with nothing downloaded.

* :func:`informative_features`: a generated classification set (scikit-learn's
  ``make_classification``) with a few informative input columns followed by
  many pure-noise columns, so which inputs matter is known exactly.
* :func:`noisy_sequences`: a generated sequence classification task for the
  LSTM in which only two of the input channels carry signal.
* :func:`related_tasks`: a task to pre-train on and a small related task to
  fine-tune on (same inputs, a partly changed label map).
* :func:`breast_cancer` and :func:`digits`: two real data sets that ship
  inside scikit-learn (nothing downloaded): breast cancer with added noise
  inputs, raw or standardized, and 8 x 8 images of handwritten digits.
* :func:`japanese_vowels`: a real multichannel sequence set (12 channels of
  speech features, variable length, 9 speakers) with added noise channels,
  read from the ``.ts`` files that ship inside the ``aeon`` package (the
  ``sequences`` extra); :func:`read_ts` parses that format without importing
  aeon, :func:`sequence_data_dir` finds the files.

Each returns a :class:`Splits` of float32 tensors, standardized (statistics
taken from the training split only; :func:`breast_cancer` also raw) with
train / validation / test parts.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Splits:
    """Train / validation / test tensors of one task (on the CPU)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    informative: list[int]   # input features (columns / channels) that carry signal
    num_features: int

    def to(self, device: torch.device) -> Splits:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Splits(**moved)


def _split(n: int, sizes: tuple[int, int, int], rng: np.random.Generator):
    order = rng.permutation(n)
    a, b, c = sizes
    if a + b + c > n:
        raise ValueError(f"split sizes {sizes} exceed the {n} samples")
    return order[:a], order[a:a + b], order[a + b:a + b + c]


def _f32(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _i64(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _standardize(x_train: np.ndarray, *others: np.ndarray):
    """Scale every column (last axis) to mean 0, std 1 on the training split;
    constant columns stay 0."""
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    std[std == 0] = 1.0
    return [(a - mean) / std for a in (x_train,) + others]


def informative_features(num_informative: int, num_noise: int, sizes: tuple[int, int, int],
                          seed: int, num_classes: int = 4) -> Splits:
    """A classification set whose informative inputs are known.

    scikit-learn's ``make_classification``: ``num_classes`` Gaussian clusters
    in the first ``num_informative`` columns, followed by ``num_noise``
    N(0, 1) columns that carry no information about the label (generated
    with ``shuffle=False``, so the informative set is columns
    ``0 .. num_informative - 1``; the rows are shuffled here).
    """
    from sklearn.datasets import make_classification

    n = sum(sizes)
    x, y = make_classification(
        n_samples=n, n_features=num_informative + num_noise, n_informative=num_informative,
        n_redundant=0, n_repeated=0, n_classes=num_classes, n_clusters_per_class=1,
        class_sep=1.5, flip_y=0.0, shuffle=False, random_state=seed)
    rng = np.random.default_rng(seed)
    tr, va, te = _split(n, sizes, rng)
    xs = _standardize(x[tr], x[va], x[te])
    return Splits("mlp", _f32(xs[0]), _i64(y[tr]), _f32(xs[1]), _i64(y[va]), _f32(xs[2]), _i64(y[te]),
                  num_classes=num_classes, informative=list(range(num_informative)),
                  num_features=num_informative + num_noise)


def noisy_sequences(num_channels: int, length: int, sizes: tuple[int, int, int], seed: int,
                    label_noise: float = 0.1) -> Splits:
    """Sequences of ``length`` steps with ``num_channels`` N(0, 1) channels.

    The label is 1 when channel 0, summed over the first half of the
    sequence, exceeds channel 1 summed over the second half: the model must
    remember across time, and every other channel is noise. A fraction
    ``label_noise`` of the labels is flipped, so that memorizing the small
    training set hurts validation accuracy (over-fitting is visible).
    """
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.standard_normal((n, length, num_channels))
    half = length // 2
    score = x[:, :half, 0].sum(axis=1) - x[:, half:, 1].sum(axis=1)
    y = (score > 0).astype(np.int64)
    flip = rng.random(n) < label_noise
    y[flip] = 1 - y[flip]
    tr, va, te = _split(n, sizes, rng)
    xs = _standardize(x[tr], x[va], x[te])
    return Splits("lstm", _f32(xs[0]), _i64(y[tr]), _f32(xs[1]), _i64(y[va]), _f32(xs[2]), _i64(y[te]),
                  num_classes=2, informative=[0, 1], num_features=num_channels)


def related_tasks(num_informative: int, num_noise: int, old_sizes: tuple[int, int, int],
                  new_sizes: tuple[int, int, int], seed: int, num_classes: int = 4) -> tuple[Splits, Splits]:
    """A pre-training task and a small related task, for fine-tuning.

    Both draw their samples (disjoint ones) from one ``make_classification``
    pool with the same ``num_classes`` clusters, informative columns
    ``0 .. num_informative - 1`` and ``num_noise`` noise columns as
    :func:`informative_features`, and share one standardization (from the
    old task's training split, as a pre-trained model's preprocessing).

    * old (``"pretrain"``): the clusters' labels.
    * new (``"finetune"``): a partly changed label map with one more class:
      classes ``0 .. num_classes - 2`` keep their labels; the last class is
      split in two by the median of informative column 0 within it (the
      half above becomes class ``num_classes``), a boundary the old task
      never needed. ``new_sizes`` is meant to be small.
    """
    from sklearn.datasets import make_classification

    n_old, n_new = sum(old_sizes), sum(new_sizes)
    x, y = make_classification(
        n_samples=n_old + n_new, n_features=num_informative + num_noise, n_informative=num_informative,
        n_redundant=0, n_repeated=0, n_classes=num_classes, n_clusters_per_class=1,
        class_sep=1.5, flip_y=0.0, shuffle=False, random_state=seed)
    last = num_classes - 1
    split_at = np.median(x[y == last, 0])
    y_new = np.where((y == last) & (x[:, 0] > split_at), num_classes, y)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_old + n_new)
    old_idx, new_idx = order[:n_old], order[n_old:]
    tr, va, te = (old_idx[i] for i in _split(n_old, old_sizes, rng))
    ntr, nva, nte = (new_idx[i] for i in _split(n_new, new_sizes, rng))
    xs = _standardize(x[tr], x[va], x[te], x[ntr], x[nva], x[nte])
    informative = list(range(num_informative))
    width = num_informative + num_noise
    old = Splits("pretrain", _f32(xs[0]), _i64(y[tr]), _f32(xs[1]), _i64(y[va]), _f32(xs[2]), _i64(y[te]),
                 num_classes=num_classes, informative=informative, num_features=width)
    new = Splits("finetune", _f32(xs[3]), _i64(y_new[ntr]), _f32(xs[4]), _i64(y_new[nva]), _f32(xs[5]),
                 _i64(y_new[nte]), num_classes=num_classes + 1, informative=informative, num_features=width)
    return old, new


def breast_cancer(num_noise: int, sizes: tuple[int, int, int], seed: int, standardize: bool) -> Splits:
    """scikit-learn's breast cancer set (569 samples, 30 real features whose
    standard deviations span five orders of magnitude, 2 classes; shipped
    with scikit-learn) plus ``num_noise`` pure-noise inputs.

    Noise input ``k`` is real feature ``k mod 30`` with its rows shuffled
    (seeded): the same values at the same scale, no relation to the label,
    so a noise input cannot be told from a real one by its scale. Columns
    ``0 .. 29`` are the real features, ``30 ..`` the noise. With
    ``standardize`` every column is scaled to mean 0, std 1 on the training
    split; without it the inputs stay as measured (name ``"cancer-raw"``).
    """
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    n, real = x.shape
    noise = np.stack([x[rng.permutation(n), k % real] for k in range(num_noise)], axis=1)
    x = np.concatenate([x, noise], axis=1)
    tr, va, te = _split(n, sizes, rng)
    xs = _standardize(x[tr], x[va], x[te]) if standardize else [x[tr], x[va], x[te]]
    return Splits("cancer-std" if standardize else "cancer-raw", _f32(xs[0]), _i64(y[tr]), _f32(xs[1]),
                  _i64(y[va]), _f32(xs[2]), _i64(y[te]), num_classes=2, informative=list(range(real)),
                  num_features=real + num_noise)


def feature_scales(data: Splits) -> list[float]:
    """The standard deviation of each input column on the training split."""
    return [float(v) for v in data.x_train.double().std(dim=0).tolist()]


def digits(sizes: tuple[int, int, int], seed: int) -> Splits:
    """scikit-learn's handwritten digits (1797 images of 8 x 8 pixels, 10
    classes; shipped with scikit-learn), one input per pixel (row-major),
    standardized on the training split (pixels that are constant there stay
    0). Every pixel counts as informative: the question is which ones a
    penalty keeps."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    tr, va, te = _split(len(x), sizes, rng)
    xs = _standardize(x[tr], x[va], x[te])
    return Splits("digits", _f32(xs[0]), _i64(y[tr]), _f32(xs[1]), _i64(y[va]), _f32(xs[2]), _i64(y[te]),
                  num_classes=10, informative=list(range(x.shape[1])), num_features=x.shape[1])


# --------------------------------------------------------------------------
# Sequence data in the .ts format (shipped inside the aeon package)
# --------------------------------------------------------------------------
@dataclass
class TsData:
    """A parsed ``.ts`` file: one ``[length, channels]`` float64 array per
    series (lengths may differ), its class label, the labels the header
    declares (in order) and the header (keys lower-case)."""

    series: list[np.ndarray]
    labels: list[str]
    class_labels: list[str]
    header: dict[str, str]

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.series]

    @property
    def num_channels(self) -> int:
        return self.series[0].shape[1]


#: The header keys :func:`read_ts` understands (lower-case); any other fails.
TS_KEYS = ("problemname", "timestamps", "missing", "univariate", "dimensions", "equallength",
           "serieslength", "classlabel", "data")


def _ts_bool(header: dict[str, str], key: str, where: str) -> bool | None:
    if key not in header:
        return None
    value = header[key].lower()
    if value not in ("true", "false"):
        raise ValueError(f"{where}: @{key} must be true or false, not {header[key]!r}")
    return value == "true"


def read_ts(source: str | os.PathLike, text: str | None = None) -> TsData:
    """Parse a classification file in the ``.ts`` format (sktime / aeon).

    Lines starting with ``#`` are comments; header lines start with ``@``
    (``@problemName``, ``@univariate``, ``@dimensions``, ``@equalLength``,
    ``@seriesLength``, ``@classLabel true <labels>``, ...), then ``@data``
    and one series per line: channels separated by ``:``, values within a
    channel by ``,``, the class label last. Every channel of a series has the
    same length; series may differ in length unless ``@equalLength true``.

    ``source`` is a path, or a name for messages when ``text`` is given.
    Raises ValueError on anything this reader does not support or that
    contradicts the header: an unknown header key, time stamps, missing
    values (``?``), no class labels, a label the header does not list, a
    channel count or length that differs from the header or between series.
    """
    where = str(source)
    if text is None:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    header: dict[str, str] = {}
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        at = f"{where}, line {number}"
        if not in_data:
            if not line.startswith("@"):
                raise ValueError(f"{at}: expected a header line (@...) before @data, got {line[:40]!r}")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key not in TS_KEYS:
                raise ValueError(f"{at}: unsupported header @{key} (this reader knows "
                                 + ", ".join("@" + k for k in TS_KEYS) + ")")
            if key in header:
                raise ValueError(f"{at}: @{key} given twice")
            header[key] = value.strip()
            if key == "data":
                in_data = True
                if _ts_bool(header, "timestamps", where):
                    raise ValueError(f"{where}: @timeStamps true is not supported")
                if _ts_bool(header, "missing", where):
                    raise ValueError(f"{where}: @missing true is not supported")
                _ts_bool(header, "univariate", where)
                _ts_bool(header, "equallength", where)
                parts = header.get("classlabel", "").split()
                if not parts or parts[0].lower() != "true" or len(parts) < 2:
                    raise ValueError(f"{where}: needs @classLabel true followed by the class labels "
                                     f"(a classification set), got {header.get('classlabel')!r}")
            continue
        if line.startswith("@"):
            raise ValueError(f"{at}: header line after @data: {line[:40]!r}")
        *channels, label = line.split(":")
        if not channels:
            raise ValueError(f"{at}: no ':' between the values and the class label")
        try:
            values = [[float(v) for v in c.split(",")] for c in channels]
        except ValueError:
            raise ValueError(f"{at}: a value is not a number (missing values '?' are not supported)") from None
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"{at}: the channels of a series differ in length: {[len(v) for v in values]}")
        arr = np.asarray(values, dtype=np.float64).T  # [length, channels]
        if not np.isfinite(arr).all():
            raise ValueError(f"{at}: a value is not finite")
        series.append(arr)
        labels.append(label.strip())
    if not in_data:
        raise ValueError(f"{where}: no @data line")
    if not series:
        raise ValueError(f"{where}: no series after @data")
    class_labels = header["classlabel"].split()[1:]
    unknown = sorted(set(labels) - set(class_labels))
    if unknown:
        raise ValueError(f"{where}: class labels {unknown[:5]} are not among @classLabel {class_labels}")
    counts = sorted({s.shape[1] for s in series})
    if len(counts) != 1:
        raise ValueError(f"{where}: the series have different numbers of channels: {counts}")
    if _ts_bool(header, "univariate", where) and counts[0] != 1:
        raise ValueError(f"{where}: @univariate true but the series have {counts[0]} channels")
    if "dimensions" in header and header["dimensions"] != str(counts[0]):
        raise ValueError(f"{where}: @dimensions {header['dimensions']} but the series have {counts[0]} channels")
    lengths = sorted({len(s) for s in series})
    if _ts_bool(header, "equallength", where):
        if len(lengths) != 1:
            raise ValueError(f"{where}: @equalLength true but the series lengths range from "
                             f"{lengths[0]} to {lengths[-1]}")
        if "serieslength" in header and header["serieslength"] != str(lengths[0]):
            raise ValueError(f"{where}: @seriesLength {header['serieslength']} but the series have "
                             f"length {lengths[0]}")
    return TsData(series, labels, class_labels, header)


def pad_series(series: list[np.ndarray], length: int) -> np.ndarray:
    """``[n, length, channels]``: each series right-aligned, zeros in front
    (so that the last step, the one an LSTM classifies from, is a real one)."""
    if any(len(s) > length for s in series):
        raise ValueError(f"a series is longer than {length} steps")
    out = np.zeros((len(series), length, series[0].shape[1]), dtype=series[0].dtype)
    for i, s in enumerate(series):
        out[i, length - len(s):] = s
    return out


def sequence_data_dir(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding ``<name>_TRAIN.ts`` and ``<name>_TEST.ts`` inside the
    aeon package (``aeon/datasets/data/<name>``), or None when it is not
    there. ``root``: the aeon package folder; default: that of the installed
    package, found without importing it (``importlib.util.find_spec``)."""
    if root is None:
        try:
            spec = importlib.util.find_spec("aeon")
        except (ImportError, ValueError):
            return None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            return None
        root = locations[0]
    folder = Path(root) / "datasets" / "data" / name
    if all((folder / f"{name}_{part}.ts").is_file() for part in ("TRAIN", "TEST")):
        return folder
    return None


def japanese_vowels(num_noise: int, seed: int, root: str | os.PathLike | None = None,
                    name: str = "JapaneseVowels") -> Splits:
    """JapaneseVowels (UCI, as shipped inside aeon): 9 male speakers saying
    "ae"; each series is an utterance, 12 channels of LPC cepstrum
    coefficients over 7 to 29 frames; the class is the speaker. 270 training
    series (30 per speaker) and 370 test series, which are split here
    (seeded, half and half) into validation and test.

    The 12 real channels are standardized with the training split's
    statistics over its frames, then ``num_noise`` N(0, 1) channels (seeded)
    are appended: columns ``0 .. 11`` are real, ``12 ..`` noise. Every series
    is right-aligned to the longest one with zeros in front (all channels;
    zero is each real channel's training mean). Raises FileNotFoundError when
    the files are not found (see :func:`sequence_data_dir`).
    """
    folder = sequence_data_dir(name, root)
    if folder is None:
        raise FileNotFoundError(f"{name}_TRAIN.ts / _TEST.ts not found in the aeon package "
                                '(pip install "pyreg[sequences]")')
    train, test = (read_ts(folder / f"{name}_{part}.ts") for part in ("TRAIN", "TEST"))
    if train.class_labels != test.class_labels or train.num_channels != test.num_channels:
        raise ValueError(f"{name}: the training and test files differ in class labels or channels")
    index = {c: i for i, c in enumerate(train.class_labels)}
    frames = np.concatenate(train.series)
    mean, std = frames.mean(axis=0), frames.std(axis=0)
    std[std == 0] = 1.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test.series))
    half = len(order) // 2
    parts = {"train": (train, np.arange(len(train.series))), "val": (test, order[:half]),
             "test": (test, order[half:])}
    length = max(train.lengths + test.lengths)
    real = train.num_channels
    out = {}
    for split, (ts, idx) in parts.items():
        series = [np.concatenate([(ts.series[i] - mean) / std,
                                  rng.standard_normal((len(ts.series[i]), num_noise))], axis=1) for i in idx]
        out[f"x_{split}"] = _f32(pad_series(series, length))
        out[f"y_{split}"] = _i64(np.array([index[ts.labels[i]] for i in idx]))
    return Splits("vowels", **out, num_classes=len(train.class_labels), informative=list(range(real)),
                  num_features=real + num_noise)
