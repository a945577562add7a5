"""Data-parallel settings for the weight-perturbation engine: DDP, FSDP2 or a plain module.

The wrapper detects the setting once, from the model it is given (no new class, no user-side
``no_sync``):

* **plain module**: one process (or processes that do not share a model); no collective.
* **DDP** (``DistributedDataParallel``): parameters are replicated. The ascent forward runs
  under ``model.no_sync()`` with DDP's buffer broadcast switched off (so the ascent pass
  neither arms DDP's gradient reducer nor touches any rank's BatchNorm statistics), and the
  ascent gradient is taken with ``torch.autograd.grad`` (which never fires DDP's hooks).
  ``ascent_sync="global"`` then averages the selected weights' ascent gradients over the
  ranks with one all-reduce of one flat buffer per dtype; ``"local"`` uses each rank's own.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on
  dim 0. The ascent gradient comes from an ordinary ``backward()`` (FSDP2's reduce-scatter
  averages it over the ranks into each rank's shard: autograd.grad cannot reach the sharded
  parameters), with every ``.grad`` put back afterwards. Per-layer norms are sums of
  local-shard partial sums: one all-reduce of a vector holding every layer's partial sums.
  Perturbation, backup and restore act in place on each rank's local shard.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .errors import UsageError

__all__ = ["Setting", "detect", "all_reduce_mean_flat", "local_data", "DistInfo", "dist_from_env", "dist_sum"]

_SYNC_MODES = ("global", "local")


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() else None


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def local_data(p: torch.Tensor) -> torch.Tensor:
    """The storage AWP writes for parameter ``p``: ``p.data``, or for a DTensor (FSDP2) the
    rank's local shard (a view sharing its storage; ``p.data`` is never rebound)."""
    d = p.data
    cls = _dtensor_cls()
    if cls is not None and isinstance(d, cls):
        return d.to_local()
    return d


class Setting:
    """How the model is distributed; resolved once when the wrapper is built.

    Attributes: ``kind`` (``"plain"``, ``"ddp"`` or ``"fsdp2"``), ``module`` (the module
    whose parameters are named: ``ddp.module`` for DDP), ``group`` (the process group of the
    collectives, None for a plain module), ``world_size``, ``sync`` (``"global"`` or
    ``"local"``) and ``sharded`` (parameters are shards: norms need an all-reduce).
    """

    def __init__(self, kind: str, model: nn.Module, module: nn.Module, group, world_size: int, sync: str):
        self.kind, self.model, self.module = kind, model, module
        self.group, self.world_size, self.sync = group, world_size, sync
        self.sharded = kind == "fsdp2"

    def __repr__(self):
        return f"Setting(kind={self.kind!r}, world_size={self.world_size}, sync={self.sync!r})"

    @property
    def multi(self) -> bool:
        """More than one rank shares the model."""
        return self.kind != "plain" and self.world_size > 1

    @property
    def averages_ascent(self) -> bool:
        """The wrapper itself must all-reduce the ascent gradients (DDP, global, > 1 rank)."""
        return self.kind == "ddp" and self.sync == "global" and self.world_size > 1

    def check_group(self) -> None:
        """Raise a one-line error when a collective is needed but no process group exists."""
        if not self.multi and not self.sharded:
            return
        dist = _dist()
        if dist is None or not dist.is_initialized():
            raise RuntimeError(
                f"AWP: the model is {self.kind.upper()}-wrapped and the ascent step needs a collective, "
                "but no torch.distributed process group is initialized (was destroy_process_group() "
                "called?). Call torch.distributed.init_process_group(...) before training, or pass the "
                "unwrapped module to AWP for single-process training.")

    @contextlib.contextmanager
    def ascent_context(self):
        """Around the ascent forward: DDP's ``no_sync()`` and no buffer broadcast (DDP would
        otherwise arm its reducer for a backward that never comes, and overwrite the other
        ranks' BatchNorm statistics with rank 0's)."""
        if self.kind != "ddp":
            yield
            return
        ddp = self.model
        old = ddp.broadcast_buffers
        ddp.broadcast_buffers = False
        try:
            with ddp.no_sync():
                yield
        finally:
            ddp.broadcast_buffers = old

    def all_reduce_sum(self, vec: torch.Tensor) -> torch.Tensor:
        """In-place sum of a small vector over the ranks (the per-layer partial sums)."""
        if self.world_size > 1:
            self.check_group()
            _dist().all_reduce(vec, group=self.group)
        return vec


def detect(model: nn.Module, ascent_sync: str = "global") -> Setting:
    """Work out whether ``model`` is DDP-wrapped, FSDP2-sharded or plain; raise a one-line
    error naming the fix for the settings the wrapper cannot handle."""
    if ascent_sync not in _SYNC_MODES:
        raise ValueError(f"ascent_sync must be 'global' or 'local', got {ascent_sync!r}")
    dist = _dist()
    if dist is None:
        return Setting("plain", model, model, None, 1, ascent_sync)
    from torch.nn.parallel import DistributedDataParallel as DDP

    _check_not_fsdp1(model)
    fsdp2 = _fsdp2_modules(model)
    if isinstance(model, DDP):
        if _fsdp2_modules(model.module):
            raise ValueError("AWP: a DDP wrapper around fully_shard (FSDP2) modules is not supported: "
                             "pass a model that is either DDP-wrapped or fully_shard-ed")
        group = model.process_group
        return Setting("ddp", model, model.module, group, dist.get_world_size(group), ascent_sync)
    inner = [n for n, m in model.named_modules() if isinstance(m, DDP)]
    if inner:
        raise ValueError(f"AWP: the DDP wrapper is the submodule {inner[0]!r} of the model passed to AWP; "
                         "pass the DDP-wrapped module itself, e.g. AWP(opt, ddp_model)")
    if fsdp2:
        if ascent_sync == "local":
            raise ValueError(
                "AWP: ascent_sync='local' needs replicated parameters (DDP); under FSDP2 each rank holds "
                "only a shard of every layer, so the perturbation is necessarily global: use "
                "ascent_sync='global' (the default)")
        cls = _dtensor_cls()
        meshes = [p.device_mesh for p in model.parameters() if isinstance(p, cls)]
        if not meshes:
            raise ValueError("AWP: the model has fully_shard (FSDP2) modules but no DTensor parameters; "
                             "call AWP after fully_shard and build the optimizer on model.parameters() then")
        mesh = meshes[0]
        if mesh.ndim != 1 or any(m != mesh for m in meshes[1:]):
            raise ValueError("AWP supports FSDP2 on one 1-D device mesh (every parameter sharded over the same "
                             "ranks); HSDP / 2-D meshes are not supported")
        for n, p in model.named_parameters():
            if isinstance(p, cls) and any(type(pl).__name__ != "Shard" or pl.dim != 0 for pl in p.placements):
                raise ValueError(f"AWP: parameter {n!r} has placements {p.placements}; FSDP2 with Shard(0) "
                                 "placements (the default) is supported")
        group = mesh.get_group()
        return Setting("fsdp2", model, model, group, dist.get_world_size(group), ascent_sync)
    return Setting("plain", model, model, None, 1, ascent_sync)


def _fsdp2_modules(model: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _check_not_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        return
    wrapped = [m for m in model.modules() if isinstance(m, FSDP1)]
    if not wrapped:
        return
    flat = [n for n, _ in model.named_parameters() if n.endswith("_flat_param")]
    if flat:
        raise ValueError(
            f"AWP: the model is FSDP1 (FullyShardedDataParallel) without use_orig_params=True: it exposes "
            f"flat parameters ({flat[0]!r}), not the model's layers, so there is nothing per-layer to "
            "perturb. Shard the model with FSDP2 instead (torch.distributed.fsdp.fully_shard on each block, "
            "then on the model) or use DDP")
    raise ValueError(
        "AWP: FSDP1 (FullyShardedDataParallel) is not supported even with use_orig_params=True (its "
        "parameters are flattened 1-D pieces, the layers' shapes are gone): shard the model with FSDP2 "
        "(torch.distributed.fsdp.fully_shard) or use DDP")


def all_reduce_mean_flat(tensors: List[torch.Tensor], setting: Setting) -> List[torch.Tensor]:
    """The ranks' mean of 1-D tensors with one all-reduce per (device, dtype): the tensors
    are packed into one flat buffer, reduced, scaled by 1/world_size, and returned as views of
    the buffer (same order and sizes as the input)."""
    setting.check_group()
    dist = _dist()
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    by: dict = {}
    for i, t in enumerate(tensors):
        by.setdefault((t.device, t.dtype), []).append(i)
    for idx in by.values():
        buf = torch.cat([tensors[i] for i in idx]) if len(idx) > 1 else tensors[idx[0]].clone()
        dist.all_reduce(buf, group=setting.group)
        buf.div_(setting.world_size)
        for i, part in zip(idx, buf.split([tensors[i].numel() for i in idx])):
            out[i] = part
    return out


# ----------------------------------------------------------------------------- how a CLI process was launched
@dataclass
class DistInfo:
    """How this process was launched: one process, or one of ``world_size`` under torchrun."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: Optional[str] = None  # None (one process), "ddp" or "fsdp"

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env(ddp: bool = False, fsdp: bool = False, prog: str = "awpfast.train") -> DistInfo:
    """The launch read off torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``);
    ``ddp`` / ``fsdp``: the CLI flags asking for one (an error without torchrun)."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        if ddp or fsdp:
            flag = "--fsdp" if fsdp else "--ddp"
            raise UsageError(f"{flag} needs a launch by torchrun: torchrun --nproc_per_node N -m {prog} ...")
        return DistInfo()
    try:
        w, r, lr = int(world), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("WORLD_SIZE / RANK / LOCAL_RANK are not integers: launch with torchrun") from None
    return DistInfo(world_size=w, rank=r, local_rank=lr, mode="fsdp" if fsdp else "ddp")


def dist_sum(values: List[float], device, world_size: int) -> List[float]:
    """``values`` summed over the ``world_size`` processes (float64 all-reduce); itself for one process."""
    if world_size == 1:
        return values
    dist = _dist()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
