"""10-split CIFAR-100 (task-incremental, multi-head) with the AlexNet-style network of GPM
and FS-DGPM, read from the standard ``cifar-100-python`` folder. Nothing is downloaded.

    python -m awpfast.continual --preset cifar100-paper --method {sgd,gpm,fs-er,fs-dgpm} \\
        --data-dir /path/to/cifar-100-python --seed S --json PATH [--tasks T] [--epochs E] \\
        [--samples-per-task N] [--device cuda]

Data: ``train`` and ``test`` are pickles (``encoding='bytes'``) of dicts with ``b'data'``
(uint8, N x 3072, channel-major 3 x 32 x 32) and ``b'fine_labels'``; ``meta`` holds
``b'fine_label_names'``. Task ``t`` holds the fine classes ``10t .. 10t+9`` (the split of
both codebases); labels stay global and each task has its own head (a block of 10 outputs
of one 2048 x 100 layer: a sample is scored on its own task's block, as GPM's per-task
heads and FS-DGPM's output masks do). Pixels are scaled to [0, 1] and normalized with
mean (125.3, 123.0, 113.9)/255 and std (63.0, 62.1, 66.7)/255; 5 % of each task's training
images (drawn with the seed) are its validation split.

Network (both codebases): conv 3->64 (4x4), conv 64->128 (3x3), conv 128->256 (2x2), each
followed by ReLU, dropout (0.2, 0.2, 0.5) and 2x2 max pooling, then fc 1024->2048->2048
(ReLU, dropout 0.5) and the heads; no biases. GPM protects the 3 convolutions and the 2
hidden fc layers, never the heads. BatchNorm, as each codebase does it:

* ``bn="gpm"`` (GPM's main_cifar100.py): a BatchNorm after each of the 5 protected layers,
  ``track_running_stats=False`` (batch statistics in training and at test time, so test
  batches of 64 as in its code; no statistics are stored, per task or otherwise); their
  affine parameters learn on the first task only (GPM zeroes their gradients afterwards).
* ``bn="fs-dgpm"`` (FS-DGPM's networks/alexnet.py, ``use_track=True``, no ``--freeze_bn`` for
  10-split CIFAR-100): one BatchNorm after conv2, with running statistics (momentum 0.1)
  shared by all tasks and affine parameters learned on every task.

``--preset cifar100-paper`` (``CIFAR_SETTINGS``): batch 64, lr 0.01, 5 % validation, the
learning rate halved after 6 epochs without a better validation loss, the task stopped when
it falls below 1e-5, the best-validation weights kept (both codebases); thresholds
``0.97 + 0.003 t`` in every layer. GPM: plain SGD, 200 epochs, no clip, bases from the
task's own images (24/100/100/125/125 images per layer, GPM's ``batch_list``). FS-DGPM
(and SGD / FS-ER with its settings): SGD momentum 0.9, gradient-norm clip 2, 50 epochs, one
update per batch, replay 1 000 (filled during a task's first epoch only), eta1 0.001, eta2
0.01 (both halved with the learning rate), second-order FS, 2 inner chunks, bases rebuilt
from 125 replayed samples.
"""
from __future__ import annotations

import copy
import os
import pickle
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .learner import Config, ContinualLearner, acc_bwt

__all__ = ["read_cifar100", "write_synthetic_cifar100", "split_tasks", "AlexNet", "CIFAR_SETTINGS", "run_cifar"]

MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
FILES = ("train", "test", "meta")

_COMMON = {"batch_size": 64, "glances": 1, "lr": 0.01, "task_classes": 10, "eval_batch": 64,
           "thres": 0.97, "thres_add": 0.003, "rep_samples": 125}
_FSDGPM = {**_COMMON, "momentum": 0.9, "epochs": 50, "memory_size": 1000, "eta1": 0.001, "eta2": 0.01,
           "second_order": True, "inner_steps": 2}
#: Config fields per method for ``--preset cifar100-paper`` (see the module docstring)
CIFAR_SETTINGS = {
    "gpm": {**_COMMON, "momentum": 0.0, "epochs": 200, "norm_clip": False, "basis": "task",
            "rep_layer_samples": (24, 100, 100, 125, 125), "freeze_bn_after_first": True},
    "fs-dgpm": _FSDGPM, "fs-er": _FSDGPM, "sgd": {**_FSDGPM, "memory_size": 0},
}
BN_STYLE = {"gpm": "gpm", "fs-dgpm": "fs-dgpm", "fs-er": "fs-dgpm", "sgd": "fs-dgpm"}
SCHEDULE = {"pc_valid": 0.05, "lr_patience": 6, "lr_factor": 2.0, "lr_min": 1e-5}


def _load(path: str, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR-100: {path} is missing; --data-dir must be the extracted "
                                f"'cifar-100-python' folder (files {', '.join(FILES)})") from None
    except Exception as e:
        raise ValueError(f"CIFAR-100: {path} is not a CIFAR-100 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"CIFAR-100: {path} holds a {type(d).__name__}, expected a dict")
    return d


def read_cifar100(data_dir: str):
    """(x_train, y_train, x_test, y_test): uint8 images N x 3 x 32 x 32 and fine labels
    (int64, 0..99), read from the ``cifar-100-python`` folder ``data_dir``. Raises
    FileNotFoundError / ValueError with one line naming the file and what is wrong."""
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CIFAR-100: folder {data_dir!r} does not exist; give the extracted "
                                f"'cifar-100-python' folder with --data-dir (nothing is downloaded)")
    meta = _load(os.path.join(data_dir, "meta"), "meta")
    names = meta.get(b"fine_label_names")
    if names is None or len(names) != 100:
        raise ValueError(f"CIFAR-100: {os.path.join(data_dir, 'meta')} has no 100 b'fine_label_names'")
    out = []
    for split in ("train", "test"):
        path = os.path.join(data_dir, split)
        d = _load(path, split)
        for key in (b"data", b"fine_labels"):
            if key not in d:
                raise ValueError(f"CIFAR-100: {path} has no key {key!r} (keys: {sorted(d)[:6]})")
        x = np.asarray(d[b"data"])
        y = np.asarray(d[b"fine_labels"], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise ValueError(f"CIFAR-100: {path} b'data' must be uint8 N x 3072, got {x.dtype} {x.shape}")
        if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() > 99)):
            raise ValueError(f"CIFAR-100: {path} needs one fine label in 0..99 per image "
                             f"({len(x)} images, {len(y)} labels)")
        out += [torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)]
    return tuple(out)


def write_synthetic_cifar100(data_dir: str, train_per_class: int = 5, test_per_class: int = 2, seed: int = 0) -> str:
    """Write a small random data set in the exact ``cifar-100-python`` format (pickled
    dicts, ``b'data'`` uint8 N x 3072, ``b'fine_labels'`` and ``b'coarse_labels'`` lists of
    ints, ``b'filenames'``; ``meta`` with 100 ``b'fine_label_names'``): for tests and
    smoke runs. Each class gets its own mean colour, so the classes can be learned."""
    rng = np.random.default_rng(seed)
    os.makedirs(data_dir, exist_ok=True)
    centre = rng.integers(40, 216, size=(100, 3072))
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)
        rng.shuffle(labels)
        x = np.clip(centre[labels] + rng.integers(-40, 41, size=(len(labels), 3072)), 0, 255).astype(np.uint8)
        d = {b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))], b"batch_label": split.encode(),
             b"fine_labels": [int(v) for v in labels], b"coarse_labels": [int(v) // 5 for v in labels], b"data": x}
        with open(os.path.join(data_dir, split), "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(os.path.join(data_dir, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f, protocol=2)
    return data_dir


def _normalize(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def split_tasks(data, n_tasks: int = 10, pc_valid: float = 0.05, seed: int = 0,
                samples_per_task: Optional[int] = None):
    """Per task ``t`` (fine classes ``10t..10t+9``): dict of normalized float tensors
    ``x_train, y_train, x_valid, y_valid, x_test, y_test`` (global labels).
    ``samples_per_task`` keeps only that many training images per task (reduced runs)."""
    xtr, ytr, xte, yte = data
    if not 1 <= n_tasks <= 10:
        raise ValueError(f"10-split CIFAR-100 has 1..10 tasks, got {n_tasks}")
    g = torch.Generator().manual_seed(int(seed))
    tasks = []
    for t in range(n_tasks):
        tr = torch.nonzero((ytr // 10) == t).flatten()
        te = torch.nonzero((yte // 10) == t).flatten()
        if len(tr) < 4 or len(te) < 1:
            raise ValueError(f"CIFAR-100: task {t} (classes {10 * t}..{10 * t + 9}) has {len(tr)} training and "
                             f"{len(te)} test images")
        tr = tr[torch.randperm(len(tr), generator=g)]
        nv = max(2, int(pc_valid * len(tr)))  # >= 2: BatchNorm without running statistics needs 2 samples
        va, tr = tr[:nv], tr[nv:]
        if samples_per_task:
            tr = tr[:samples_per_task]
        tasks.append({"x_train": _normalize(xtr[tr]), "y_train": ytr[tr].clone(),
                      "x_valid": _normalize(xtr[va]), "y_valid": ytr[va].clone(),
                      "x_test": _normalize(xte[te]), "y_test": yte[te].clone()})
    return tasks


class AlexNet(nn.Module):
    """The 5-layer AlexNet-style network of GPM / FS-DGPM (see the module docstring);
    ``protected`` lists the layers GPM protects (the heads are left out)."""

    def __init__(self, n_outputs: int = 100, bn: str = "gpm"):
        super().__init__()
        if bn not in ("gpm", "fs-dgpm"):
            raise ValueError(f"bn must be 'gpm' or 'fs-dgpm', got {bn!r}")
        self.conv1 = nn.Conv2d(3, 64, 4, bias=False)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False)
        self.fc1 = nn.Linear(256 * 2 * 2, 2048, bias=False)
        self.fc2 = nn.Linear(2048, 2048, bias=False)
        self.head = nn.Linear(2048, n_outputs, bias=False)
        if bn == "gpm":
            self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(c, track_running_stats=False) for c in (64, 128, 256))
            self.bn4, self.bn5 = (nn.BatchNorm1d(2048, track_running_stats=False) for _ in range(2))
        else:
            self.bn1, self.bn3, self.bn4, self.bn5 = (nn.Identity() for _ in range(4))
            self.bn2 = nn.BatchNorm2d(128, momentum=0.1)
        self.pool, self.relu = nn.MaxPool2d(2), nn.ReLU()
        self.drop1, self.drop2 = nn.Dropout(0.2), nn.Dropout(0.5)
        self.protected = [self.conv1, self.conv2, self.conv3, self.fc1, self.fc2]

    def forward(self, x):
        h = self.pool(self.drop1(self.relu(self.bn1(self.conv1(x)))))
        h = self.pool(self.drop1(self.relu(self.bn2(self.conv2(h)))))
        h = self.pool(self.drop2(self.relu(self.bn3(self.conv3(h)))))
        h = h.flatten(1)
        h = self.drop2(self.relu(self.bn4(self.fc1(h))))
        h = self.drop2(self.relu(self.bn5(self.fc2(h))))
        return self.head(h)


@torch.no_grad()
def _val_loss(learner, x, y) -> float:
    learner.model.eval()
    tot = 0.0
    for i in range(0, len(y), learner.cfg.eval_batch):
        tot += float(learner._loss(learner.model(x[i:i + learner.cfg.eval_batch]), y[i:i + learner.cfg.eval_batch])) \
            * len(y[i:i + learner.cfg.eval_batch])
    return tot / max(len(y), 1)


def _set_rates(learner, lr, eta1, eta2):
    for g in learner.optimizer.param_groups:
        g["lr"] = lr
    learner.cfg.eta1 = eta1
    if learner.opt_theta is not None:
        for g in learner.opt_theta.param_groups:
            g["lr"] = eta2


def run_cifar(method: str, seed: int = 0, data_dir: Optional[str] = None, n_tasks: int = 10,
              epochs: Optional[int] = None, samples_per_task: Optional[int] = None, device: str = "cpu",
              progress: bool = False, data=None, **overrides) -> dict:
    """One run of ``--preset cifar100-paper`` (see the module docstring); ``data`` (the tuple
    of ``read_cifar100``) replaces reading ``data_dir``. Returns the result dict of
    ``run_experiment`` plus ``seconds_per_task`` and ``epochs_run``."""
    if method not in CIFAR_SETTINGS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CIFAR_SETTINGS)}")
    fields = {**CIFAR_SETTINGS[method], **overrides}
    if epochs is not None:
        fields["epochs"] = int(epochs)
    unknown = set(fields) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(method=method, **fields).validate()
    dev = torch.device(device)
    tasks = split_tasks(data if data is not None else read_cifar100(data_dir), n_tasks, SCHEDULE["pc_valid"], seed,
                        samples_per_task)
    tasks = [{k: v.to(dev) for k, v in t.items()} for t in tasks]
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    model = AlexNet(100, BN_STYLE[method]).to(dev)
    learner = ContinualLearner(model, cfg, gen, protect=model.protected)
    eta1, eta2 = cfg.eta1, cfg.eta2
    T = len(tasks)
    acc = [[0.0] * T for _ in range(T)]
    basis_sizes, per_task, epochs_run = [], [], []
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        ts = time.perf_counter()
        learner.begin_task(i)
        lr, patience, best, best_state, n_ep = cfg.lr, SCHEDULE["lr_patience"], float("inf"), None, 0
        _set_rates(learner, lr, eta1, eta2)
        for ep in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(task["y_train"]), generator=gen).to(dev)
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b:b + cfg.batch_size]
                if len(idx) < 2:  # a trailing batch of 1: BatchNorm cannot train on it
                    continue
                learner.observe(task["x_train"][idx], task["y_train"][idx], remember=ep == 0)
            n_ep += 1
            vl = _val_loss(learner, task["x_valid"], task["y_valid"])
            if vl < best:
                best, patience = vl, SCHEDULE["lr_patience"]
                best_state = copy.deepcopy(model.state_dict())
            else:
                patience -= 1
                if patience <= 0:
                    lr /= SCHEDULE["lr_factor"]
                    if lr < SCHEDULE["lr_min"]:
                        break
                    patience = SCHEDULE["lr_patience"]
                    f = cfg.lr / lr
                    _set_rates(learner, lr, eta1 / f, eta2 / f)
        if best_state is not None:
            model.load_state_dict(best_state)
        learner.cfg.eta1 = eta1
        model.eval()
        for j, other in enumerate(tasks):
            acc[i][j] = learner.accuracy(other["x_test"], other["y_test"])
        learner.end_task(task["x_train"])
        if learner.memory is not None:
            basis_sizes.append(learner.memory.sizes())
        per_task.append(time.perf_counter() - ts)
        epochs_run.append(n_ep)
        if progress:
            a, bw = acc_bwt([row[:i + 1] for row in acc[:i + 1]])
            print(f"[{method}] task {i + 1}/{T}: {n_ep} epochs, acc on it {acc[i][i]:.1f}%, running ACC {a:.2f}% "
                  f"BWT {bw:.2f}% ({per_task[-1]:.1f} s)", file=sys.stderr)
    a, bw = acc_bwt(acc)
    return {
        "method": method, "preset": "cifar100-paper", "seed": int(seed), "dataset": "cifar100",
        "n_tasks": T, "samples_per_task": int(len(tasks[0]["y_train"])), "bn": BN_STYLE[method],
        "acc": a, "bwt": bw, "acc_matrix": acc, "seconds": time.perf_counter() - t0,
        "seconds_per_task": per_task, "epochs_run": epochs_run, "steps": learner.stats.steps,
        "memory_bytes": learner.memory_bytes(), "basis_sizes": basis_sizes,
        "basis_dims": learner.memory.dims() if learner.memory is not None else [],
        "soft_weights": {"min_per_task": learner.stats.lam_min, "mean_per_task": learner.stats.lam_mean},
        "config": cfg.as_dict(), "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_end": list(os.getloadavg()),
    }
