"""Parameter selection and the perturb/restore state behind the weight-perturbation wrappers: the
engine's half that knows no rule (the rules' math is in :mod:`awpfast.rules`).

Everything per-layer is prepared once: the selected parameters are grouped by (device,
dtype), flattened to 1-D views of their storage (so channels_last weights work with every
backend), and given persistent backup (and, for the reference restore order, delta)
buffers. On the hot path each (device, dtype) group is one backend call.

For FSDP2 the "storage" of a parameter is the rank's local shard: the views, backups and
deltas are shard-sized, per-layer norms are all-reduced partial sums (one all-reduce for
every layer, :meth:`PerturbState.global_norms`), and a rule applies its scaled update with
``ops.add_scaled_`` and the per-layer scales as a device tensor (no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops as _ops
from .ops._util import is_dense
from .distributed import local_data

Include = Callable[[str, nn.Parameter], bool]


def default_include(name: str, param: torch.Tensor) -> bool:
    """The reference rule: conv and linear weights (ndim > 1 and 'weight' in the name)."""
    return param.ndim > 1 and "weight" in name


def include_matrices(name: str, param: torch.Tensor) -> bool:
    """The include rule for transformers and ViTs: every tensor with ``ndim >= 2``, whatever its
    name (linear and conv weights, embedding tables, ``pos_embed``, ``cls_token``); LayerNorm
    weights and biases (1-D) stay out, as in the reference rule."""
    return param.ndim >= 2


def left_out(named: Sequence[Tuple[str, nn.Parameter]], include: Include, held: set) -> dict:
    """What the selection leaves out of ``named`` (a model's parameters), by category:
    ``"1-D weights"`` and ``"non-'weight' tensors"`` (left out by ``include``; the latter split
    further into those with ``ndim >= 2``, the ones a ViT needs: ``"non-'weight' tensors, ndim >= 2"``),
    ``"other (include rule)"``, ``"frozen"`` (``requires_grad`` False) and ``"not in the optimizer"``.
    Values are lists of names."""
    out = {"1-D weights": [], "non-'weight' tensors": [], "non-'weight' tensors, ndim >= 2": [],
           "other (include rule)": [], "frozen": [], "not in the optimizer": []}
    for n, p in named:
        if id(p) not in held:
            out["not in the optimizer"].append(n)
        elif not include(n, p):
            if "weight" not in n:
                out["non-'weight' tensors"].append(n)
                if p.ndim >= 2:
                    out["non-'weight' tensors, ndim >= 2"].append(n)
            elif p.ndim <= 1:
                out["1-D weights"].append(n)
            else:
                out["other (include rule)"].append(n)
        elif not p.requires_grad:
            out["frozen"].append(n)
    return out


def left_out_message(who: str, n_selected: int, cats: dict, default_rule: bool) -> Tuple[int, str]:
    """``(logging level, message)`` describing ``left_out()``'s result: WARNING when tensors with
    ``ndim >= 2`` are left out by the include rule (a ViT's ``pos_embed``/``cls_token`` under the
    reference rule), INFO otherwise."""
    import logging
    parts = []
    for key in ("1-D weights", "non-'weight' tensors", "other (include rule)", "frozen", "not in the optimizer"):
        names = cats[key]
        if names:
            extra = ""
            if key == "non-'weight' tensors" and cats["non-'weight' tensors, ndim >= 2"]:
                big = cats["non-'weight' tensors, ndim >= 2"]
                extra = f", {len(big)} of them with ndim >= 2: {', '.join(big[:4])}{', ...' if len(big) > 4 else ''}"
            parts.append(f"{len(names)} {key} (e.g. {names[0]}{extra})")
    if not parts:
        return logging.INFO, f"{who} perturbs {n_selected} tensors: all of the model's parameters"
    big = cats["non-'weight' tensors, ndim >= 2"] or cats["other (include rule)"]
    msg = f"{who} perturbs {n_selected} tensors and leaves out " + "; ".join(parts) + "."
    if big:
        msg += (" For transformers / ViTs pass include=awpfast.perturb.include_matrices (every tensor with "
                "ndim >= 2, whatever its name)" if default_rule else " (include= decides)") + "."
        return logging.WARNING, msg
    return logging.INFO, msg


def select_parameters(model: nn.Module, include: Optional[Include] = None) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the include rule picks, in model order; frozen parameters are
    skipped. (The wrappers further intersect this with the optimizer's parameters.)"""
    rule = include or default_include
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and rule(n, p)]


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view over a dense tensor's elements (contiguous or any dense layout such as
    channels_last). Elementwise ops on it write the tensor itself."""
    if t.is_contiguous():
        return t.view(-1)
    if not is_dense(t):
        raise ValueError(
            f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} is not dense; AWP needs "
            "parameters stored densely (call .contiguous() on the parameter's data)")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def flat_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D tensor whose element order matches ``flat(ref)``."""
    if t.stride() == ref.stride() and (t.is_contiguous() or is_dense(t)):
        return flat(t)
    out = torch.empty_like(ref, dtype=t.dtype)  # same layout as the parameter
    out.copy_(t)
    return flat(out)


def join_norms(norms: List[torch.Tensor]) -> torch.Tensor:
    """Per-group direction norms as one vector (selection order within groups)."""
    return norms[0] if len(norms) == 1 else torch.cat([n.float().to(norms[0].device) for n in norms])


@dataclass
class _Group:
    device: torch.device
    dtype: torch.dtype
    index: List[int]                       # positions in the selected list
    params: List[torch.Tensor]             # flat views of the parameters (local shards for FSDP2)
    backups: List[torch.Tensor] = field(default_factory=list)
    deltas: List[torch.Tensor] = field(default_factory=list)


class PerturbState:
    """The selected parameters, their buffers, and whether they are perturbed.

    ``named`` are the candidates (include rule and optimizer already applied); the *selected*
    parameters (``names``/``params``) are the candidates that currently require grad: a
    ``requires_grad`` change is followed at the next ``refresh()`` (``generation`` counts the
    changes of the selected set). ``reduce`` (FSDP2) sums a float64 vector over the ranks:
    given, the parameters are shards and every per-layer norm is all-reduced.
    """

    def __init__(self, named: Sequence[Tuple[str, nn.Parameter]], store_deltas: bool, backend: Optional[str],
                 model: Optional[nn.Module] = None, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.store_deltas = store_deltas
        self.backend = backend
        self.reduce = reduce
        self.active = False
        self.generation = 0
        self.groups: List[_Group] = []
        self._model = model
        self._layout = None
        self._built = self._built_ptrs = None
        self.layout_version = 0  # counts the rebuilds of the groups (a rule's per-group data follows it)
        self.names: List[str] = []
        self.params: List[torch.Tensor] = []
        self.local: List[torch.Tensor] = []
        # steps skipped for non-finite gradients inside compiled code (counted on the device)
        self.skipped_device: Optional[torch.Tensor] = None
        self.set_candidates(named)

    def set_candidates(self, named: Sequence[Tuple[str, nn.Parameter]]) -> None:
        """New candidate list (the optimizer's parameter groups changed)."""
        if self.active:
            raise RuntimeError("AWP: the selection cannot change while the weights are perturbed")
        self.cand_names = [n for n, _ in named]
        self.cand_params = [p for _, p in named]
        # (module, attribute) owning each parameter, to notice a parameter swapped in the model
        self.owners = None
        if self._model is not None:
            self.owners = []
            for n in self.cand_names:
                mod, _, attr = n.rpartition(".")
                self.owners.append((self._model.get_submodule(mod) if mod else self._model, attr))
        self._built = None
        self._sel_key = None
        self.refresh()

    def refresh(self) -> None:
        """Follow the model: re-select when a candidate's ``requires_grad`` changed, and
        rebuild the groups and flat views when parameter storage changed (``model.to(...)``,
        ``.half()``...). A parameter object swapped out of the model cannot be followed (the
        optimizer holds the old one): that raises, naming it."""
        now, ptrs = self.layout(), self._pointers()
        if now == self._built and (ptrs is None or ptrs == self._built_ptrs):
            return
        if self.owners is not None:
            gone = [n for n, p, (m, a) in zip(self.cand_names, self.cand_params, self.owners)
                    if getattr(m, a, None) is not p]
            if gone:
                raise RuntimeError(
                    f"AWP: parameter(s) {gone} were replaced in the model by new Parameter objects after the "
                    "optimizer and AWP were built (e.g. model.load_state_dict(..., assign=True), or "
                    "module.weight = nn.Parameter(...)); the optimizer still holds the old tensors and would "
                    "train parameters the model no longer uses. Load with assign=False (the default copies "
                    "into the existing parameters), or build the optimizer and AWP again after replacing them")
        sel_key = tuple(e[-1] for e in now)
        if sel_key != self._sel_key:
            keep = [i for i, p in enumerate(self.cand_params) if p.requires_grad]
            self.names = [self.cand_names[i] for i in keep]
            self.params = [self.cand_params[i] for i in keep]
            self._sel_key = sel_key
            self.generation += 1
        self.local = [local_data(p) if self.reduce is not None else p.data for p in self.params]
        self.groups = [_Group(dev, dt, idx, [flat(self.local[i]) for i in idx])
                       for (dev, dt), idx in _ops.group_indices(self.local).items()]
        self._built, self._built_ptrs = now, ptrs
        self.layout_version += 1
        for g in self.groups:
            # Here (eagerly, when AWP is built) rather than at the first perturb(): the backend's
            # first import cannot be traced, and buffers allocated inside a compiled step would
            # make the second step recompile (the guards see the lists grow).
            self.backend_of(g)
            self.ensure_buffers(g)
        if self.params:
            dev = self.params[0].device
            if self.skipped_device is None:
                self.skipped_device = torch.zeros((), dtype=torch.int64, device=dev)
            elif self.skipped_device.device != dev:
                self.skipped_device = self.skipped_device.to(dev)

    # ------------------------------------------------------------------ helpers
    def backend_of(self, g: _Group):
        """The seam backend of one (device, dtype) group."""
        return _ops.get_backend(self.backend, g.device, g.dtype)

    def begin(self) -> None:
        """A rule starts perturbing: record the layout that ``restore()`` checks against."""
        self._layout = (self._built, self._built_ptrs)

    def layout(self):
        """Per candidate: shape, strides, dtype and device of its storage (the local shard under
        FSDP2), whether the model still owns it, and ``requires_grad`` (last). Data pointers
        are compared separately (``_pointers``): Dynamo cannot trace that comparison, so inside
        a compiled step only this part is checked."""
        if self.reduce is not None:  # FSDP2 swaps unsharded parameters in during forward: no owner check
            return [(t.shape, t.stride(), t.dtype, t.device, p.requires_grad)
                    for p, t in ((p, local_data(p)) for p in self.cand_params)]
        if self.owners is None:
            return [(p.shape, p.stride(), p.dtype, p.device, p.requires_grad) for p in self.cand_params]
        return [(p.shape, p.stride(), p.dtype, p.device, getattr(m, a, None) is p, p.requires_grad)
                for p, (m, a) in zip(self.cand_params, self.owners)]

    def _pointers(self):
        """Data pointers of the candidates' storage; None inside torch.compile."""
        if torch.compiler.is_compiling():
            return None
        if self.reduce is not None:
            return [local_data(p).data_ptr() for p in self.cand_params]
        return [p.data_ptr() for p in self.cand_params]

    def ensure_buffers(self, g: _Group) -> None:
        # Plain loops: code that may run eagerly inside a compiled step (Dynamo resumes frame by
        # frame after the ascent's graph break) has no comprehension over tensors, which Python
        # < 3.12 runs as a frame of its own that Dynamo cannot compile ("falling back to eager").
        if len(g.backups) != len(g.params):
            g.backups = []
            for p in g.params:
                g.backups.append(torch.empty_like(p))
        if self.store_deltas and len(g.deltas) != len(g.params):
            g.deltas = []
            for p in g.params:
                g.deltas.append(torch.empty_like(p))

    def refresh_deltas(self, g: _Group) -> None:
        """deltas <- params - backups (after a projection moved the perturbation)."""
        if self.store_deltas:
            torch._foreach_copy_(g.deltas, g.params)
            torch._foreach_sub_(g.deltas, g.backups)

    def perturbation(self) -> List[torch.Tensor]:
        """While perturbed: ``v = w + v - backup`` per selected parameter, flat, in selection order."""
        out: List[Optional[torch.Tensor]] = [None] * len(self.params)
        for g in self.groups:
            for i, p, b in zip(g.index, g.params, g.backups):
                out[i] = p - b
        return out

    def flat_directions(self, grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
        """Gradients (one per selected parameter, shaped like its local data; None = unused)
        as 1-D tensors in the element order of the parameter views."""
        return [torch.zeros(t.numel(), dtype=t.dtype, device=t.device) if d is None else flat_like(d, t)
                for d, t in zip(grads, self.local)]

    def buffer_numel(self) -> int:
        """Elements held in backups and deltas (the wrapper's own weight-sized memory)."""
        return sum(t.numel() for g in self.groups for t in (*g.backups, *g.deltas))

    # ------------------------------------------------------------------ sharded (FSDP2) helpers
    def global_norms(self, lists: Sequence[Sequence[Sequence[torch.Tensor]]]) -> List[List[torch.Tensor]]:
        """``lists[k][gi]`` is the k-th tensor list of group gi. Returns the global per-layer
        norms ``out[k][gi]`` (float64) from local partial sums: one all-reduce for all."""
        parts = []
        for per_group in lists:
            for g, ts in zip(self.groups, per_group):
                parts.append(self.backend_of(g).norms(list(ts)).to(device=self.groups[0].device,
                                                                 dtype=torch.float64).square())
        vec = self.reduce(torch.cat(parts)).sqrt()
        out, o = [], 0
        for _ in lists:
            row = []
            for g in self.groups:
                row.append(vec[o:o + len(g.index)].to(g.device))
                o += len(g.index)
            out.append(row)
        return out

    def group_dirs(self, dirs, g: _Group) -> List[torch.Tensor]:
        """The directions of one group's parameters (``dirs`` in selection order)."""
        return [dirs[i] for i in g.index]

    def restore_groups(self, groups) -> None:
        """Weights of ``groups`` back from their backups (undoing a partly applied op)."""
        for g in groups:
            self.backend_of(g).restore_(g.params, g.backups)

    def undo(self, done, first: bool) -> None:
        """After a rule's apply pass failed: a first pass restores the groups it wrote (``done``),
        a later one every weight (the backups hold the unperturbed ones)."""
        if first:
            self.restore_groups(done)
        else:
            self.restore()

    # ------------------------------------------------------------------ ops
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
        """Names of selected parameters whose storage was replaced or resized since perturb()."""
        now, ptrs = self.layout(), self._pointers()
        built, built_ptrs = self._layout
        if now == built and (ptrs is None or ptrs == built_ptrs):
            return []
        sel = set(self.names)
        ptrs = ptrs if ptrs is not None and built_ptrs is not None else [0] * len(now)
        built_ptrs = built_ptrs if built_ptrs is not None else [0] * len(now)
        # compare everything but requires_grad: a layer frozen inside the region is still restored
        return [n for n, a, b, pa, pb in zip(self.cand_names, now, built, ptrs, built_ptrs)
                if n in sel and (a[:-1] != b[:-1] or pa != pb)]

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
                    self.backend_of(g).restore_([g.params[k] for k in keep], [g.backups[k] for k in keep])
            else:
                self.backend_of(g).restore_(g.params, g.backups)
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
            self.backend_of(g).unperturb_(g.params, g.deltas)
        self.active = False
