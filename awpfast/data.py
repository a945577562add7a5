"""Datasets for awpfast training, all held in memory as tensors, with a seeded batch loader.

``digits`` (default)
    scikit-learn's handwritten digits (1 797 8x8 grey images, 10 classes), shipped inside
    scikit-learn: no download. Scaled to [0, 1], resized (bilinear) to ``image_size`` and
    repeated to 3 channels. A fixed split that does not depend on the training seed:
    1 297 train / 500 test.
``cifar10``
    The standard CIFAR-10 python batches from ``data_dir`` (``data_dir`` itself or
    ``data_dir/cifar-10-batches-py`` holding ``data_batch_1..5`` and ``test_batch``), read
    through torchvision when it is installed and with ``pickle`` otherwise. Nothing is
    downloaded; a missing file is named in the error together with where to get it.
``synthetic``
    Random class-prototype images (a learnable but meaningless task) for benchmarks and
    tests; shape and size configurable.

:func:`split_validation` holds out a fixed (seed-independent) subset of a training split for
model selection. :class:`Batches` iterates over a split with its own ``torch.Generator``
(shuffling and augmentation), so that ``--resume`` can restore its state exactly; with
``world_size > 1`` each process gets its share of every global batch, like
``DistributedSampler``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["Split", "Dataset", "load_dataset", "Batches", "DATASETS", "CIFAR10_URL", "CIFAR10_MEAN", "CIFAR10_STD",
           "random_crop", "random_flip", "split_validation", "to_float", "symmetric_label_noise", "training_splits",
           "LABEL_NOISE_SEED"]

from .choices import DATASETS, PAD_MODES  # noqa: E402  (the names, torch-free)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
DIGITS_TEST = 500
DIGITS_SPLIT_SEED = 20200101  # fixed: the split never depends on --seed
VAL_SPLIT_SEED = 20200202     # fixed: the validation subset never depends on --seed
# per-channel statistics of the CIFAR-10 training images (the AT reference normalizes with them)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
LABEL_NOISE_SEED = 20200303   # fixed: the noisy labels never depend on --seed


@dataclass
class Split:
    x: torch.Tensor  # uint8 (0..255) or float32 in [0, 1], NCHW
    y: torch.Tensor  # int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: Optional[int]) -> "Split":
        """The first ``n`` examples (all of them for ``None``)."""
        if n is None or n >= len(self):
            return self
        return Split(self.x[:n], self.y[:n])

    def shard(self, rank: int, world_size: int) -> "Split":
        """Every ``world_size``-th example from ``rank`` on (evaluation sharding; no padding)."""
        if world_size == 1:
            return self
        return Split(self.x[rank::world_size], self.y[rank::world_size])


def split_validation(train: Split, n: int, seed: int = VAL_SPLIT_SEED) -> Tuple[Split, Split]:
    """Hold out ``n`` training examples, chosen by a fixed permutation (independent of the
    training seed), as a validation split. Returns ``(train_rest, val)``; ``train_rest`` keeps
    the original order. ``n == 0`` returns ``(train, empty)``."""
    if n < 0 or n >= len(train):
        raise ValueError(f"--val-samples must be between 0 and {len(train) - 1} (the training split has "
                         f"{len(train)} images), got {n}")
    if n == 0:
        return train, Split(train.x[:0], train.y[:0])
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, rest = perm[:n], perm[n:].sort().values
    return Split(train.x[rest], train.y[rest]), Split(train.x[val_idx], train.y[val_idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    augment: str  # "none" | "crop" | "crop+flip"


def to_float(x: torch.Tensor) -> torch.Tensor:
    """A batch as float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


# ----------------------------------------------------------------------------- digits
def _digits(image_size: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a declared extra
        raise ImportError("--data digits needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'awpfast[train]')") from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # N,1,8,8 in [0,1]
    y = torch.from_numpy(d.target.astype(np.int64))
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(len(y), generator=g)
    te, tr = perm[:DIGITS_TEST], perm[DIGITS_TEST:]
    return Dataset("digits", Split(x[tr], y[tr]), Split(x[te], y[te]), 10, 3, image_size, "none")


# ----------------------------------------------------------------------------- cifar10
def _cifar_dir(data_dir: Optional[str]) -> str:
    if not data_dir:
        raise FileNotFoundError(
            "--data cifar10 needs --data-dir PATH: a folder holding the CIFAR-10 python batches "
            f"(cifar-10-batches-py/{{{', '.join(CIFAR10_FILES)}}}). Download {CIFAR10_URL} "
            "(~163 MB) and extract it with: tar -xzf cifar-10-python.tar.gz -C PATH")
    root = os.path.abspath(os.path.expanduser(data_dir))
    candidates = [os.path.join(root, "cifar-10-batches-py"), root]
    for c in candidates:
        if all(os.path.isfile(os.path.join(c, f)) for f in CIFAR10_FILES):
            return c
    # name exactly what is missing, in the more likely of the two places
    best = max(candidates, key=lambda c: sum(os.path.isfile(os.path.join(c, f)) for f in CIFAR10_FILES))
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(best, f))]
    raise FileNotFoundError(
        f"CIFAR-10 python batches not found: missing {', '.join(missing)} in {best}"
        + ("" if best.endswith("cifar-10-batches-py") else f" (also looked in {candidates[0]})")
        + f". Download {CIFAR10_URL} (~163 MB) and extract it with: tar -xzf cifar-10-python.tar.gz "
        f"-C {root}  (this creates {candidates[0]}). awpfast never downloads data itself.")


def _read_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise RuntimeError(f"could not read CIFAR-10 batch {path}: {e}. Re-download {CIFAR10_URL}") from e
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise RuntimeError(f"{path} is not a CIFAR-10 python batch (no data/labels); re-download {CIFAR10_URL}")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar10(data_dir: Optional[str]) -> Dataset:
    folder = _cifar_dir(data_dir)
    try:
        import torchvision  # noqa: F401
        from torchvision.datasets import CIFAR10
    except ImportError:
        CIFAR10 = None
    if CIFAR10 is not None:
        root = os.path.dirname(folder) if folder.endswith("cifar-10-batches-py") else None
        if root is not None:
            tr = CIFAR10(root=root, train=True, download=False)
            te = CIFAR10(root=root, train=False, download=False)
            xs = torch.from_numpy(np.ascontiguousarray(tr.data.transpose(0, 3, 1, 2)))
            xt = torch.from_numpy(np.ascontiguousarray(te.data.transpose(0, 3, 1, 2)))
            return Dataset("cifar10", Split(xs, torch.tensor(tr.targets)), Split(xt, torch.tensor(te.targets)),
                           10, 3, 32, "crop+flip")
    parts = [_read_batch(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
    xs = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    ys = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    xt, yt = _read_batch(os.path.join(folder, "test_batch"))
    return Dataset("cifar10", Split(xs, ys), Split(torch.from_numpy(xt), torch.from_numpy(yt)), 10, 3, 32, "crop+flip")


def write_synthetic_cifar10(data_dir: str, train_per_class: int = 10, test_per_class: int = 5, seed: int = 0) -> str:
    """Write a small random data set in the exact ``cifar-10-batches-py`` format into
    ``data_dir/cifar-10-batches-py`` (five pickled ``data_batch_i`` and ``test_batch`` dicts with
    ``b'data'`` uint8 N x 3072 and ``b'labels'``, and ``batches.meta``), for smoke runs and tests of
    ``--data cifar10 --data-dir DATA_DIR``. Each class gets its own mean colour, so the classes can be
    learned. Returns the ``cifar-10-batches-py`` folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    centre = rng.integers(40, 216, size=(10, 3072))

    def batch(labels):
        x = np.clip(centre[labels] + rng.integers(-40, 41, size=(len(labels), 3072)), 0, 255).astype(np.uint8)
        return {b"data": x, b"labels": [int(v) for v in labels]}

    train = np.repeat(np.arange(10), train_per_class)
    rng.shuffle(train)
    for i, part in enumerate(np.array_split(train, 5), 1):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(part), f, protocol=2)
    test = np.repeat(np.arange(10), test_per_class)
    rng.shuffle(test)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(test), f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                              "frog", "horse", "ship", "truck")]}, f, protocol=2)
    return folder


# ----------------------------------------------------------------------------- synthetic
def _synthetic(image_size: int, n_train: int = 512, n_test: int = 256, num_classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(num_classes, 3, image_size, image_size, generator=g)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = (0.6 * protos[y] + 0.4 * torch.rand(n, 3, image_size, image_size, generator=g)).clamp_(0, 1)
        return Split(x, y)

    return Dataset("synthetic", make(n_train), make(n_test), num_classes, 3, image_size, "none")


def load_dataset(name: str = "digits", data_dir: Optional[str] = None, image_size: Optional[int] = None,
                 synthetic_size: Tuple[int, int] = (512, 256)) -> Dataset:
    """Load a dataset by its CLI name (see the module docstring)."""
    name = name.lower()
    if name == "digits":
        return _digits(int(image_size or 16))
    if name == "cifar10":
        if image_size not in (None, 32):
            raise ValueError("CIFAR-10 images are 32x32; drop --image-size")
        return _cifar10(data_dir)
    if name == "synthetic":
        return _synthetic(int(image_size or 32), *synthetic_size)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- loading
def _crop_at(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor, mode: str) -> torch.Tensor:
    b, c, h, w = x.shape
    if mode not in PAD_MODES:
        raise ValueError(f"padding mode must be one of {PAD_MODES}, got {mode!r}")
    if mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflection padding {padding} needs images larger than {padding}px, got {h}x{w}")
    xp = F.pad(x, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    rows = (oy[:, None] + torch.arange(h))[:, :, None]          # b,h,1
    cols = (ox[:, None] + torch.arange(w))[:, None, :]          # b,1,w
    bi = torch.arange(b)[:, None, None]
    return xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator, mode: str = "reflect") -> torch.Tensor:
    """Random crop per sample from the image padded by ``padding`` on each side.

    ``mode="reflect"``: reflection padding (the AT reference of Rice et al. / Wu et al.);
    ``"zeros"``: zero padding (torchvision's ``RandomCrop(size, padding)``, the TRADES / MART
    references)."""
    b = x.shape[0]
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    return _crop_at(x, padding, oy, ox, mode)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Horizontal flip of each sample with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return _flip_where(x, flip)


def _flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[flip] = x[flip].flip(3)
    return out


def crop_padding(image_size: int) -> int:
    """The crop padding used for an image size: 4 at 32px (the references), size/8 below."""
    return 4 if image_size >= 32 else max(1, image_size // 8)


class Batches:
    """Batches of one split as float32 [0, 1] tensors on ``device``.

    Shuffling and augmentation draw from ``self.generator`` only (a CPU ``torch.Generator``
    seeded with ``seed``), never from the global RNG; save ``generator.get_state()`` to
    resume exactly.

    Distributed (``world_size > 1``): ``batch_size`` is the *global* batch. Every process
    draws the same permutation and the same augmentation parameters (so the generators stay
    in lockstep) and keeps positions ``rank, rank + world_size, ...`` of each global batch:
    the processes' batches together are exactly the one-process batch. A last global batch
    that does not split evenly is padded by repeating its first examples, as
    ``DistributedSampler`` pads, so every process gets the same number of examples per step.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, augment: str = "none",
                 seed: int = 0, drop_last: bool = False, device="cpu", pad_mode: str = "reflect",
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.split, self.batch_size, self.shuffle = split, int(batch_size), bool(shuffle)
        self.augment, self.drop_last, self.device = augment, bool(drop_last), torch.device(device)
        self.pad_mode, self.rank, self.world_size = pad_mode, int(rank), int(world_size)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        idx = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size]
            m = len(j)
            x_all = self.split.x  # indexed once, after the augmentation draws
            aug = None
            if self.augment != "none":
                pad = crop_padding(x_all.shape[-1])
                oy = torch.randint(0, 2 * pad + 1, (m,), generator=self.generator)
                ox = torch.randint(0, 2 * pad + 1, (m,), generator=self.generator)
                flip = torch.rand(m, generator=self.generator) < 0.5 if "flip" in self.augment else None
                aug = (pad, oy, ox, flip)
            if self.world_size > 1:
                per = -(-m // self.world_size)
                pos = (torch.arange(per * self.world_size) % m)[self.rank::self.world_size]
                j = j[pos]
                if aug is not None:
                    pad, oy, ox, flip = aug
                    aug = (pad, oy[pos], ox[pos], None if flip is None else flip[pos])
            x = to_float(x_all[j])
            if aug is not None:
                pad, oy, ox, flip = aug
                x = _crop_at(x, pad, oy, ox, self.pad_mode)
                if flip is not None:
                    x = _flip_where(x, flip)
            yield x.to(self.device, non_blocking=True), self.split.y[j].to(self.device, non_blocking=True)


def symmetric_label_noise(split: Split, p: float, num_classes: int, seed: int = LABEL_NOISE_SEED) -> Split:
    """``split`` with symmetric label noise: exactly ``round(p * len(split))`` examples, chosen by a
    seeded permutation, get a label drawn uniformly from the ``num_classes - 1`` other classes.
    The images are shared, the labels copied; the same arguments give the same labels."""
    n = len(split)
    k = int(round(float(p) * n))
    if k == 0 or num_classes < 2:
        return split
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)  # 1..K-1: never the original class
    y = split.y.clone()
    y[idx] = (y[idx] + shift) % num_classes
    return Split(split.x, y)


def heldout_split(ds, val_samples: Optional[int], train_samples: Optional[int] = None) -> Split:
    """Every image a run never trained on nor validated with: the test split, then the training
    images beyond its ``train_samples`` cut (after the validation hold-out; their labels are the
    data set's, never label-noised). Without a cut it is the test split."""
    rest, _ = split_validation(ds.train, int(val_samples or 0))
    if train_samples is None or train_samples >= len(rest):
        return ds.test
    unused = Split(rest.x[train_samples:], rest.y[train_samples:])
    return Split(torch.cat([to_float(ds.test.x), to_float(unused.x)]), torch.cat([ds.test.y, unused.y]))


def training_splits(ds, val_samples: Optional[int], train_samples: Optional[int] = None, label_noise: float = 0.0):
    """``(train, val)``: the images a run trained on and its held-out validation images, from the
    dataset and the run's ``val_samples`` / ``train_samples`` / ``label_noise`` (``checkpoint["args"]``;
    a checkpoint without ``val_samples`` held none out). Label noise applies to the training
    images only (after the hold-out and the ``train_samples`` cut), never to ``val``."""
    try:
        train, val = split_validation(ds.train, int(val_samples or 0))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if train_samples is not None:
        if train_samples > len(train):
            held = f" after the {len(val)} validation images held out" if len(val) else ""
            raise UsageError(f"--train-samples {train_samples} is more than the {len(train)} training images{held}: "
                             f"give at most {len(train)}, or leave it out to train on all of them")
        train = train.subset(train_samples)
    if label_noise:
        train = symmetric_label_noise(train, label_noise, ds.num_classes)
    return train, val
