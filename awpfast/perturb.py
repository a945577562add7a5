"""Parameter selection and the perturb/restore state behind the AWP wrapper.

Everything per-layer is prepared once: the selected parameters are grouped by (device,
dtype), flattened to 1-D views of their storage (so channels_last weights work with every
backend), and given persistent backup (and, for the reference restore order, delta)
buffers. On the hot path each (device, dtype) group is one backend call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops as _ops

Include = Callable[[str, nn.Parameter], bool]


def default_include(name: str, param: torch.Tensor) -> bool:
    """The reference rule: conv and linear weights (ndim > 1 and 'weight' in the name)."""
    return param.ndim > 1 and "weight" in name


def select_parameters(model: nn.Module, include: Optional[Include] = None) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) pairs AWP perturbs, in model order; frozen parameters are skipped."""
    rule = include or default_include
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and rule(n, p)]


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view over a dense tensor's elements (contiguous or any dense layout such as
    channels_last). Elementwise ops on it write the tensor itself."""
    if t.is_contiguous():
        return t.view(-1)
    if not _is_dense(t):
        raise ValueError(
            f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} is not dense; AWP needs "
            "parameters stored densely (call .contiguous() on the parameter's data)")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _is_dense(t: torch.Tensor) -> bool:
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def flat_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D tensor whose element order matches ``flat(ref)``."""
    if t.stride() == ref.stride() and (t.is_contiguous() or _is_dense(t)):
        return flat(t)
    out = torch.empty_like(ref, dtype=t.dtype)  # same layout as the parameter
    out.copy_(t)
    return flat(out)


def _join_norms(norms: List[torch.Tensor]) -> torch.Tensor:
    """Per-group direction norms as one vector (selection order within groups)."""
    return norms[0] if len(norms) == 1 else torch.cat([n.float().to(norms[0].device) for n in norms])


@dataclass
class _Group:
    device: torch.device
    dtype: torch.dtype
    index: List[int]                       # positions in the selected list
    params: List[torch.Tensor]             # flat views of the parameters
    backups: List[torch.Tensor] = field(default_factory=list)
    deltas: List[torch.Tensor] = field(default_factory=list)
    gammas: List[float] = field(default_factory=list)     # radius gamma_l of each layer
    etas: List[float] = field(default_factory=list)       # ascent step size of each layer
    project_first: bool = False                           # first step larger than a radius


class PerturbState:
    """Holds the selected parameters, their buffers, and whether they are perturbed."""

    def __init__(self, named: Sequence[Tuple[str, nn.Parameter]], store_deltas: bool, backend: Optional[str],
                 model: Optional[nn.Module] = None):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # (module, attribute) owning each parameter, to notice a parameter swapped in the model
        self.owners = None
        if model is not None:
            self.owners = []
            for n in self.names:
                mod, _, attr = n.rpartition(".")
                self.owners.append((model.get_submodule(mod) if mod else model, attr))
        self.store_deltas = store_deltas
        self.backend = backend
        self.active = False
        self._layout = None
        self.groups: List[_Group] = []
        self._built = None
        self._sizes = None
        # steps skipped for non-finite gradients inside compiled code (counted on the device)
        self.skipped_device: Optional[torch.Tensor] = None
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the groups and flat views when parameter storage changed since the last
        build (``model.to(...)``, ``.half()``, a loaded checkpoint with ``assign=True``...).
        A parameter object swapped out of the model cannot be followed: that raises."""
        now = self.layout()
        if now == self._built:
            return
        if self.owners is not None:
            gone = [n for n, p, (m, a) in zip(self.names, self.params, self.owners) if getattr(m, a, None) is not p]
            if gone:
                raise RuntimeError(
                    f"AWP: parameter(s) {gone} of the model are no longer the objects AWP (and the base "
                    "optimizer) were built with; build the optimizer and the AWP wrapper again after "
                    "replacing parameters")
        self.groups = [_Group(dev, dt, idx, [flat(self.params[i].data) for i in idx])
                       for (dev, dt), idx in _ops.group_indices(self.params).items()]
        self._built = now
        dev = self.params[0].device
        if self.skipped_device is None:
            self.skipped_device = torch.zeros((), dtype=torch.int64, device=dev)
        elif self.skipped_device.device != dev:
            self.skipped_device = self.skipped_device.to(dev)
        if self._sizes is not None:
            self.set_sizes(*self._sizes)

    def set_sizes(self, gammas: Sequence[float], etas: Sequence[float]) -> None:
        """Per-layer radius and step size (in selection order), split by group once."""
        self._sizes = (list(gammas), list(etas))
        for g in self.groups:
            g.gammas = [gammas[i] for i in g.index]
            g.etas = [etas[i] for i in g.index]
            g.project_first = any(e > r for e, r in zip(g.etas, g.gammas))

    # ------------------------------------------------------------------ helpers
    def _backend(self, g: _Group):
        return _ops.get_backend(self.backend, g.device, g.dtype)

    def layout(self):
        if self.owners is None:
            return [(p.data_ptr(), p.shape, p.stride()) for p in self.params]
        return [(p.data_ptr(), p.shape, p.stride(), getattr(m, a, None) is p)
                for p, (m, a) in zip(self.params, self.owners)]

    def _ensure_buffers(self, g: _Group) -> None:
        if len(g.backups) != len(g.params):
            g.backups = [torch.empty_like(p) for p in g.params]
        if self.store_deltas and len(g.deltas) != len(g.params):
            g.deltas = [torch.empty_like(p) for p in g.params]

    def _refresh_deltas(self, g: _Group) -> None:
        """deltas <- params - backups (after a projection moved the perturbation)."""
        if self.store_deltas:
            torch._foreach_copy_(g.deltas, g.params)
            torch._foreach_sub_(g.deltas, g.backups)

    def directions(self, grads: Sequence[torch.Tensor], g: _Group) -> List[torch.Tensor]:
        return [flat_like(grads[i], self.params[i]) for i in g.index]

    # ------------------------------------------------------------------ ops
    def perturb(self, grads, eps) -> torch.Tensor:
        """First ascent step: backups <- w, w += step * ||w|| g / (||g|| + eps); for a first step
        larger than the radius, project. Returns all direction norms (one vector)."""
        self.refresh()
        self._layout = self._built
        done, norms = [], []
        try:
            for g in self.groups:
                self._ensure_buffers(g)
                be = self._backend(g)
                deltas = g.deltas if self.store_deltas else None
                norms.append(be.perturb_(g.params, self.directions(grads, g), g.etas, eps, g.backups, deltas))
                done.append(g)
                if g.project_first:
                    be.project_(g.params, g.backups, g.gammas)
                    self._refresh_deltas(g)
        except BaseException:
            for g in done:
                self._backend(g).restore_(g.params, g.backups)
            raise
        self.active = True
        return _join_norms(norms)

    def ascent_step(self, grads, eps) -> torch.Tensor:
        """A later multi-step ascent step around the backed-up weights, with projection."""
        norms = []
        try:
            for g in self.groups:
                be = self._backend(g)
                norms.append(be.ascent_step_(g.params, g.backups, self.directions(grads, g), g.etas, g.gammas, eps))
                self._refresh_deltas(g)
        except BaseException:
            self.restore()
            raise
        return _join_norms(norms)

    def keep_if(self, ok: torch.Tensor) -> None:
        """Device-side select without a host sync: where ``ok`` is False, params <- backups and
        deltas <- 0 (the perturbation is dropped). Meant for compiled code, where this per-layer
        loop is traced once and fused. Counts a skip in ``skipped_device``."""
        self.skipped_device.add_((~ok).to(torch.int64))
        for g in self.groups:
            for i, (p, b) in enumerate(zip(g.params, g.backups)):
                p.copy_(torch.where(ok, p, b))
                if self.store_deltas:
                    g.deltas[i].copy_(torch.where(ok, g.deltas[i], torch.zeros_like(g.deltas[i])))

    def check_layout(self) -> List[str]:
        """Names of parameters whose storage was replaced or resized since perturb()."""
        now = self.layout()
        if now == self._layout:
            return []
        return [n for n, a, b in zip(self.names, now, self._layout) if a != b]

    def restore(self) -> None:
        """Exact restore from the backups (bit for bit). Skips parameters whose storage was
        replaced and raises afterwards, naming them."""
        if not self.active:
            return
        bad = set(self.check_layout())
        for g in self.groups:
            if bad:
                keep = [k for k, i in enumerate(g.index) if self.names[i] not in bad]
                if keep:
                    self._backend(g).restore_([g.params[k] for k in keep], [g.backups[k] for k in keep])
            else:
                self._backend(g).restore_(g.params, g.backups)
        self.active = False
        if bad:
            raise RuntimeError(
                f"AWP: parameter(s) {sorted(bad)} were replaced or resized between perturb() and "
                "restore(); every other parameter was restored exactly. Do not replace or resize "
                "parameters inside a perturbed region: call restore() (or step()) first.")

    def unperturb(self) -> None:
        """Reference order: remove v (w <- w - v) after the optimizer stepped at w + v."""
        bad = self.check_layout()
        if bad:
            self.restore()  # raises, naming them
        for g in self.groups:
            self._backend(g).unperturb_(g.params, g.deltas)
        self.active = False
