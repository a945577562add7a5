"""Extra training data mixed into every batch (``awpfast-train --extra-data PATH --extra-fraction F``).

The recipes behind the strongest robust CIFAR-10 models train on a second, much larger source:
RST / RST-AWP (Carmon et al. 2019; Wu et al. 2020) on 500k pseudo-labelled Tiny Images, the
generated-data recipes (Wang et al. 2023; Bartoldson et al. 2024) on millions of diffusion-model
images. Each batch then takes a fixed fraction ``F`` of its images from the extra set and the rest
from the base training split.

Formats, read as they are shipped (no conversion step):

* the RST pickle (``ti_500K_pseudo_labeled.pickle``): a dict with ``data`` (uint8, N x 32 x 32 x 3)
  and ``extrapolated_targets`` (N integer labels). A pickle cannot be memory-mapped: it is read into
  memory once (1.5 GB for the 500k set); convert it to ``.npz`` (:func:`save_npz`) to stream it;
* the ``.npz`` of the generated-data releases: ``image`` (uint8, N x 32 x 32 x 3) and ``label``. An
  uncompressed ``.npz`` (``np.savez``) is memory-mapped member by member: only the rows a batch uses
  are read from disk. A compressed one (``np.savez_compressed``) cannot be mapped and is refused
  above :data:`MAX_COMPRESSED_BYTES` with the one-line fix;
* a ``.npy`` pair is not a format of these releases and is not read.

Sampling follows RST's ``SemiSupervisedSampler``: per batch, ``round(F * B)`` extra images drawn
uniformly *with replacement* and ``B - round(F * B)`` base images taken in order from a fresh
permutation of the base split (a new permutation starts whenever one is used up). An epoch is
``--steps-per-epoch`` batches; by default one pass over the base split
(``ceil(len(base) / (B - round(F * B)))`` batches). RST defines an epoch as 50,000 images
(``ceil(50000 / B)`` batches), which ``--recipe rst-awp-reference`` sets.

Every random draw of an epoch (the base permutations, the extra indices, the augmentation) is made
from two seeded generators when the epoch starts, so the batches do not depend on the background
worker that reads the next batch's extra rows while the current one trains, and
:meth:`MixedBatches.state_dict` can resume exactly, even in the middle of an epoch. Under torchrun
each process reads only its positions ``rank, rank + world_size, ...`` of every global batch, from
both sources.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import pickle
import zipfile
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .data import Split, _crop_at, _flip_where, crop_padding, to_float
from .errors import UsageError

__all__ = ["ExtraData", "MixedBatches", "open_extra", "save_npz", "DEFAULT_FRACTION", "MAX_COMPRESSED_BYTES"]

DEFAULT_FRACTION = 0.5
"""RST's ``unsup_fraction`` (pseudo-labelled data); the generated-data recipes use 0.7."""
MAX_COMPRESSED_BYTES = 1 << 30
"""A compressed ``.npz`` member larger than this (uncompressed) is refused: it would be read whole."""


class ExtraData:
    """An extra training set: ``x`` (N x H x W x C uint8, a ``np.memmap`` when the file allows) and
    ``y`` (N int64), checked against the base data's classes and image size."""

    def __init__(self, x: np.ndarray, y: np.ndarray, path: str, mapped: bool):
        self.x, self.y, self.path, self.mapped = x, y, path, mapped

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def gather(self, idx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rows ``idx`` (any order, repeats allowed) as an NCHW uint8 tensor and int64 labels;
        reads each distinct row once, in file order."""
        uniq, inv = np.unique(idx, return_inverse=True)
        rows = np.ascontiguousarray(self.x[uniq])          # one sorted read from the map
        x = torch.from_numpy(rows[inv]).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(self.y[idx].astype(np.int64))


def _npz_member(path: str, name: str) -> Tuple[np.ndarray, bool]:
    """Member ``name`` of an ``.npz``, memory-mapped when it is stored uncompressed."""
    with zipfile.ZipFile(path) as zf:
        member = f"{name}.npy"
        if member not in zf.namelist():
            have = ", ".join(sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))) or "none"
            raise UsageError(f"--extra-data {path}: no key {name!r} in the .npz (it has: {have}); expected 'image' "
                             "(uint8 N x 32 x 32 x 3) and 'label'")
        info = zf.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise UsageError(f"--extra-data {path}: member {member} has no local zip header")
                name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            if fortran or dtype.hasobject:
                raise UsageError(f"--extra-data {path}: {name!r} is a Fortran-ordered or object array; save it "
                                 "C-ordered with np.savez")
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype), False
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), True
        if info.file_size > MAX_COMPRESSED_BYTES:
            raise UsageError(f"--extra-data {path}: {name!r} is compressed ({info.file_size / 2**30:.1f} GiB "
                             "unpacked) and cannot be memory-mapped; re-save it with np.savez (not "
                             "np.savez_compressed)")
        with zf.open(member) as f:
            return np.lib.format.read_array(f), False


def _read_pickle(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f)
        except Exception as e:  # truncated, not a pickle
            raise UsageError(f"--extra-data {path}: not a readable pickle ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--extra-data {path}: the pickle holds a {type(obj).__name__}, expected RST's dict with "
                         "'data' and 'extrapolated_targets'")
    for key in ("data", "extrapolated_targets"):
        if key not in obj:
            raise UsageError(f"--extra-data {path}: no key {key!r} in the pickle (it has: "
                             f"{', '.join(map(str, obj)) or 'none'}); expected RST's 'data' (uint8 N x 32 x 32 x 3) "
                             "and 'extrapolated_targets'")
    return np.asarray(obj["data"]), np.asarray(obj["extrapolated_targets"])


def open_extra(path: str, num_classes: int, image_size: int, channels: int = 3) -> ExtraData:
    """Open an extra data file (RST pickle or ``.npz``), checking keys, shapes, dtypes and labels;
    every problem is a one-line :class:`UsageError` naming the key."""
    if not os.path.isfile(path):
        raise UsageError(f"--extra-data {path}: no such file (an RST .pickle or a .npz with 'image' and 'label')")
    if zipfile.is_zipfile(path):
        (x, mapped), (y, _) = _npz_member(path, "image"), _npz_member(path, "label")
        kx, ky = "image", "label"
    else:
        x, y = _read_pickle(path)
        mapped, kx, ky = False, "data", "extrapolated_targets"
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (image_size, image_size, channels):
        raise UsageError(f"--extra-data {path}: {kx!r} is {x.dtype} {tuple(x.shape)}, expected uint8 "
                         f"N x {image_size} x {image_size} x {channels} (the base data's images, channels last)")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"--extra-data {path}: {ky!r} is {y.dtype} {tuple(y.shape)}, expected {x.shape[0]} "
                         "integer labels (one per image)")
    if len(y) == 0:
        raise UsageError(f"--extra-data {path}: {kx!r} holds no images")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise UsageError(f"--extra-data {path}: {ky!r} has labels in [{lo}, {hi}], outside the base data's "
                         f"0..{num_classes - 1}")
    return ExtraData(x, np.ascontiguousarray(y, dtype=np.int64), path, mapped)


def save_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``images`` (uint8 N x H x W x C) and ``labels`` as an uncompressed ``.npz`` that
    :func:`open_extra` memory-maps (e.g. to convert RST's pickle once)."""
    np.savez(path, image=np.ascontiguousarray(images, dtype=np.uint8), label=np.asarray(labels, dtype=np.int64))


class MixedBatches:
    """Batches of ``base`` (a :class:`~awpfast.data.Split`) with a fixed fraction drawn from ``extra``
    (see the module docstring). Float32 [0, 1] NCHW tensors on ``device``; the same augmentation
    for both sources. ``generator`` (base permutations, augmentation) and ``extra_generator`` (extra
    indices) hold the sampler's randomness; :meth:`state_dict` / :meth:`load_state_dict` resume it."""

    def __init__(self, base: Split, extra: ExtraData, batch_size: int, fraction: float = DEFAULT_FRACTION,
                 steps_per_epoch: Optional[int] = None, augment: str = "none", seed: int = 0, device="cpu",
                 pad_mode: str = "reflect", rank: int = 0, world_size: int = 1, prefetch: bool = True):
        if not 0.0 < float(fraction) < 1.0:
            raise UsageError(f"--extra-fraction must be in (0, 1), got {fraction}")
        self.base, self.extra, self.batch_size = base, extra, int(batch_size)
        self.n_extra = int(round(float(fraction) * self.batch_size))
        self.n_base = self.batch_size - self.n_extra
        if self.n_extra < 1 or self.n_base < 1:
            raise UsageError(f"--extra-fraction {fraction} of --batch-size {batch_size} leaves no room for one of "
                             f"the sources ({self.n_base} base + {self.n_extra} extra images)")
        self.steps = int(steps_per_epoch) if steps_per_epoch else math.ceil(len(base) / self.n_base)
        self.augment, self.device, self.pad_mode = augment, torch.device(device), pad_mode
        self.rank, self.world_size, self.prefetch = int(rank), int(world_size), bool(prefetch)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.extra_generator = torch.Generator().manual_seed(int(seed) + 0x5EED)
        self._epoch_start = None   # (base state, extra state) of the epoch in progress
        self._pos = 0              # batches of that epoch already handed out
        self._skip = 0

    def __len__(self) -> int:
        return self.steps

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """The sampler's position: exact also in the middle of an epoch."""
        if self._epoch_start is not None and 0 < self._pos < self.steps:
            base, extra = self._epoch_start
            return {"base": base.clone(), "extra": extra.clone(), "pos": self._pos}
        return {"base": self.generator.get_state(), "extra": self.extra_generator.get_state(), "pos": 0}

    def load_state_dict(self, sd: dict) -> None:
        self.generator.set_state(sd["base"])
        self.extra_generator.set_state(sd["extra"])
        self._skip, self._epoch_start, self._pos = int(sd.get("pos", 0)), None, 0

    # ------------------------------------------------------------------ one epoch
    def _draw_epoch(self):
        """Every random draw of one epoch, in a fixed order."""
        n, steps = len(self.base), self.steps
        need, perms = steps * self.n_base, []
        while sum(len(p) for p in perms) < need:
            perms.append(torch.randperm(n, generator=self.generator))
        base_idx = torch.cat(perms)[:need].view(steps, self.n_base)
        extra_idx = torch.randint(len(self.extra), (steps, self.n_extra), generator=self.extra_generator)
        aug = None
        if self.augment != "none":
            pad = crop_padding(self.base.x.shape[-1])
            shape = (steps, self.batch_size)
            oy = torch.randint(0, 2 * pad + 1, shape, generator=self.generator)
            ox = torch.randint(0, 2 * pad + 1, shape, generator=self.generator)
            flip = torch.rand(shape, generator=self.generator) < 0.5 if "flip" in self.augment else None
            aug = (pad, oy, ox, flip)
        return base_idx, extra_idx.numpy(), aug

    def _positions(self) -> torch.Tensor:
        """This process's positions in a global batch (padded as DistributedSampler pads)."""
        m = self.batch_size
        if self.world_size == 1:
            return torch.arange(m)
        per = -(-m // self.world_size)
        return (torch.arange(per * self.world_size) % m)[self.rank::self.world_size]

    def _split_positions(self, pos: torch.Tensor):
        is_base = pos < self.n_base
        return pos, is_base, pos[is_base], pos[~is_base] - self.n_base

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_start = (self.generator.get_state(), self.extra_generator.get_state())
        base_idx, extra_idx, aug = self._draw_epoch()
        pos, is_base, pb, pe = self._split_positions(self._positions())
        start, self._skip = self._skip, 0
        self._pos = start

        def read_extra(i):
            return self.extra.gather(extra_idx[i][pe.numpy()])

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="awpfast-extra") if self.prefetch else None
        try:
            nxt = pool.submit(read_extra, start) if (pool and start < self.steps) else None
            for i in range(start, self.steps):
                xe, ye = nxt.result() if nxt is not None else read_extra(i)
                nxt = pool.submit(read_extra, i + 1) if (pool and i + 1 < self.steps) else None
                jb = base_idx[i][pb]
                x = torch.empty((len(pos),) + tuple(self.base.x.shape[1:]), dtype=torch.uint8) \
                    if self.base.x.dtype == torch.uint8 else None
                xb, yb = self.base.x[jb], self.base.y[jb]
                if x is None:  # a float base split: bring the extra rows to its scale
                    x = torch.empty((len(pos),) + tuple(self.base.x.shape[1:]), dtype=xb.dtype)
                    xe = to_float(xe).to(xb.dtype)
                x[is_base], x[~is_base] = xb, xe
                y = torch.empty(len(pos), dtype=torch.int64)
                y[is_base], y[~is_base] = yb, ye
                x = to_float(x)
                if aug is not None:
                    pad, oy, ox, flip = aug
                    x = _crop_at(x, pad, oy[i][pos], ox[i][pos], self.pad_mode)
                    if flip is not None:
                        x = _flip_where(x, flip[i][pos])
                self._pos = i + 1
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
