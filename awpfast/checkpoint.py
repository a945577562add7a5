"""Checkpoints on disk: the ``awpfast-train/1`` format, reading any checkpoint a CLI is given, atomic
writes, the RNG state, and the one-process layout of model and optimizer state dicts (FSDP2
gathered / re-sharded).

This module reads and writes plain dicts; the training loop assembles what goes into them.
Every failure to read is a one-line :class:`~awpfast.errors.UsageError`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import socket
import time
from typing import Iterator, List, Optional

import numpy as np
import torch

from .errors import UsageError, deferred_interrupts

__all__ = ["run_lock", "LOCK_FILE", "folder_run_id", "check_belongs", "repair_best", "remove_stale_tmp", "checkpoint_epoch", "copy_atomic", "CKPT_FORMAT", "RUN_FILES", "TRAIN_KEYS", "read_checkpoint", "read_model_checkpoint", "atomic_save",
           "run_files", "rng_state", "set_rng_state", "full_state_dicts", "load_optimizer"]

CKPT_FORMAT = "awpfast-train/1"
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.png", "args.json")
TRAIN_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best", "args")
"""The entries every ``awpfast-train`` checkpoint has (``last.pt`` and ``best.pt``)."""


def read_checkpoint(path: str, what: str = "checkpoint", require_train: bool = True) -> dict:
    """Load a checkpoint file (on the CPU), turning every failure into one-line :class:`UsageError`.

    With ``require_train`` the file must be an ``awpfast-train`` checkpoint (``last.pt``/``best.pt``)."""
    if not os.path.exists(path):
        raise UsageError(f"{what}: no such file {path} (give a checkpoint such as runs/NAME/last.pt)")
    if os.path.isdir(path):
        raise UsageError(f"{what}: {path} is a folder; give the checkpoint file (e.g. {os.path.join(path, 'last.pt')})")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{what}: {path} is empty (0 bytes); it was probably cut off while being written")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, a text file, a pickle of something else, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise UsageError(f"{what}: {path} is not a readable PyTorch checkpoint (truncated or another kind of "
                         f"file: {reason})") from None
    if require_train:
        if not (isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT):
            kind = f"format {obj.get('format')!r}" if isinstance(obj, dict) and "format" in obj else \
                ("a plain state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}")
            raise UsageError(f"{what}: {path} is not an awpfast-train checkpoint ({kind}); give a last.pt or "
                             "best.pt written by awpfast-train")
        missing = [k for k in TRAIN_KEYS if k not in obj]
        if missing or not isinstance(obj["args"], dict) or "model" not in obj["args"]:
            raise UsageError(f"{what}: {path} is an incomplete awpfast-train checkpoint (no "
                             f"{', '.join(missing or ['args.model'])})")
    return obj


def read_model_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """``{"model": state_dict, "args": {...} or {}, "epoch", "num_classes", "in_channels"}`` from an
    awpfast-train checkpoint or a bare state_dict (also under a ``model`` / ``state_dict`` /
    ``model_state_dict`` key, ``module.`` prefixes dropped, as reference and RobustBench files are);
    a one-line :class:`UsageError` for anything else."""
    obj = read_checkpoint(path, what, require_train=False)
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        return {"model": obj["model"], "args": dict(obj["args"]), "epoch": obj.get("epoch"),
                "num_classes": obj.get("num_classes", 10), "in_channels": obj.get("in_channels", 3)}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
            return {"model": sd, "args": {}, "epoch": None, "num_classes": None, "in_channels": 3}
    raise UsageError(f"{path}: not an awpfast-train checkpoint nor a model state_dict")


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path.tmp``, then an atomic rename: a reader never sees half a file. A full
    disk (or another write failure) removes the partial ``.tmp`` and raises a one-line
    :class:`UsageError` naming the folder; ``path`` keeps what it held."""
    tmp = path + ".tmp"
    try:
        with deferred_interrupts():  # Ctrl-C / SIGTERM: the write finishes first
            torch.save(obj, tmp)
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if _disk_full(e):
            raise UsageError(f"the disk holding {os.path.dirname(os.path.abspath(path))} is full: {os.path.basename(path)} "
                             "was not written (the partial file is removed, the previous one kept); free space and "
                             "--resume") from None
        if isinstance(e, OSError):
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)  # torch's zip writer reports a short write as "unexpected pos" / "file write failed"
    return isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)


# ----------------------------------------------------------------------------- one run per folder
LOCK_FILE = ".awpfast.lock"


@contextlib.contextmanager
def run_lock(folder: str, what: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on the run folder ``folder`` (created if needed) for the ``with`` body.

    A second holder is refused with a one-line :class:`UsageError` naming the first's pid and start
    time. The lock is an ``flock`` on ``folder/.awpfast.lock``: the kernel drops it when its process
    dies, so a killed run's lock is stale at once and taken over (with a note in the file). On
    systems without ``fcntl`` it is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_lock(path)
            who = f"pid {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "") + \
                (f", started {holder['started']}" if holder.get("started") else "")
            raise UsageError(f"{what} {folder} is in use by another awpfast-train run ({who}): wait for it to end, "
                             f"or choose another {what}") from None
        try:  # the file may have been replaced between open and flock: lock the one at the path
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race a waiting opener)


def _read_lock(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def folder_run_id(folder: str) -> Optional[str]:
    """The ``run_id`` the run in ``folder`` recorded in its ``args.json`` (None: none recorded)."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _checkpoint_run_id(path: str) -> Optional[str]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("run_id")
    except Exception:
        return None


def check_belongs(ckpt: dict, ckpt_path: str, folder: str) -> None:
    """Refuse (one-line :class:`UsageError`) to resume ``ckpt`` into ``folder`` unless it proves it is
    that folder's run: its ``run_id`` equals the one in the folder's ``args.json`` and ``best.pt``
    (checkpoints from before run ids: the folder it recorded is this one). Reads only."""
    mine = ckpt.get("run_id")
    theirs = {"args.json": folder_run_id(folder)}
    best = os.path.join(folder, "best.pt")
    if os.path.isfile(best) and not os.path.samefile(best, ckpt_path):
        theirs["best.pt"] = _checkpoint_run_id(best)
    recorded = (ckpt.get("args") or {}).get("out")
    for name, rid in theirs.items():
        if rid is not None and rid != mine:
            raise UsageError(f"--resume {ckpt_path} is from another run (run id {mine or 'none'}) than the one in "
                             f"{folder} ({name}: {rid}): resume that run's own last.pt, or continue this checkpoint "
                             "into a new --out")
    if mine is None and recorded and os.path.realpath(recorded) != os.path.realpath(folder) \
            and any(os.path.isfile(os.path.join(folder, f)) for f in ("best.pt", "metrics.jsonl", "args.json")):
        raise UsageError(f"--resume {ckpt_path} was written by the run in {recorded}, not by the one in {folder}: "
                         "resume it into its own folder, or into a new --out")


def copy_atomic(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through ``dst.tmp`` and an atomic rename (byte-identical)."""
    with deferred_interrupts():
        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)


def checkpoint_epoch(path: str) -> Optional[int]:
    """The ``epoch`` a training checkpoint file records; ``None`` when it is missing or unreadable."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(obj["epoch"])
    except Exception:  # missing, truncated, another kind of file
        return None


def repair_best(out: str, last: dict, last_path: str) -> Optional[str]:
    """Make ``best.pt`` hold the epoch that ``last`` (the loaded ``last.pt``, the run's commit point)
    records as best. A run writes ``last.pt`` first, then ``best.pt``: a kill between the two leaves
    ``best.pt`` one best behind, and the missing best is then ``last.pt``'s own epoch, so ``last.pt``
    is copied over it. Returns what was repaired, or ``None`` when ``best.pt`` was right."""
    best_epoch = (last.get("best") or {}).get("epoch")
    if best_epoch is None:
        return None
    path = os.path.join(out, "best.pt")
    have = checkpoint_epoch(path)
    if have == int(best_epoch):
        return None
    if int(best_epoch) != int(last["epoch"]):
        raise UsageError(f"{path} holds epoch {have} but {last_path} records epoch {best_epoch} as the best, and no "
                         "file holds that epoch: the folder was changed by hand; restore best.pt or start over "
                         "with --overwrite")
    copy_atomic(last_path, path)
    return (f"best.pt rewritten from last.pt (epoch {best_epoch}, the best epoch; best.pt held "
            f"{'no readable checkpoint' if have is None else f'epoch {have}'})")


def remove_stale_tmp(out: str) -> List[str]:
    """Remove the ``*.tmp`` files an interrupted write left in ``out``; returns their names."""
    gone = []
    for f in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if f.endswith(".tmp") and f[:-4] in RUN_FILES:
            os.remove(os.path.join(out, f))
            gone.append(f)
    return gone


def run_files(out: str) -> List[str]:
    """The files in ``out`` that make it hold a run: checkpoints and a non-empty metrics log."""
    if not os.path.isdir(out):
        return []
    found = [f for f in ("last.pt", "best.pt") if os.path.isfile(os.path.join(out, f))]
    mp = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(mp) and os.path.getsize(mp) > 0:
        found.append("metrics.jsonl")
    return found


def rng_state(generator: torch.Generator) -> dict:
    """The torch / CUDA / numpy / python RNG states and ``generator``'s (the data loader's)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
          "loader": generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    generator.set_state(st["loader"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _param_names(model: torch.nn.Module) -> List[str]:
    return [n for n, _ in model.named_parameters()]


def full_state_dicts(model: torch.nn.Module, awp, fsdp: bool, is_main: bool = True):
    """``(model_sd, awp_sd)`` in the one-process layout (FSDP2: gathered on rank 0; a collective, so
    every rank calls it), so that any checkpoint resumes on any number of processes."""
    if not fsdp:
        return model.state_dict(), awp.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, awp.optimizer, options=opts)  # keyed by parameter names
    awp_sd = awp.state_dict()  # the base optimizer's (sharded) state dict plus the wrapper's own entries
    if not is_main:
        return msd, awp_sd
    ids = {}
    for g in osd["param_groups"]:
        for name in g["params"]:
            ids.setdefault(name, len(ids))
    full = {"state": {ids[k]: v for k, v in osd["state"].items()},
            "param_groups": [dict(g, params=[ids[n] for n in g["params"]]) for g in osd["param_groups"]]}
    awp_sd.update(full)
    return msd, awp_sd


def load_optimizer(awp, model: torch.nn.Module, sd: dict, fsdp: bool) -> None:
    """Load a one-process-layout AWP state dict (FSDP2: sharded onto this rank's parameters)."""
    if not fsdp:
        awp.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model)
    by_name = {"state": {names[i]: v for i, v in sd["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, awp.optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    sharded = awp.optimizer.state_dict()
    awp.load_state_dict(dict(sharded, **{k: v for k, v in sd.items() if k not in ("state", "param_groups")}))
