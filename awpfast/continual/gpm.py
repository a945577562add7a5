"""Gradient Projection Memory (GPM, Saha et al., ICLR 2021) with soft weights (FS-DGPM).

For every protected layer (``nn.Linear`` and ``nn.Conv2d`` weights) the memory holds an
orthonormal basis ``M`` (``in_features x k``; ``C*kh*kw x k`` for a convolution) of the
input space that past tasks used. A gradient ``g`` of that weight (reshaped to
``out x in``) is projected as

    g  <-  g - (g M) diag(lam) M^T            (``project_out_``: the update keeps off M)
    d   =      (g M) diag(lam) M^T            (``project_onto``: FS-DGPM's perturbation)

with ``lam = 1`` for plain GPM and a learned ``lam in (0, 1)`` per basis vector for DGPM.

Bases come from the SVD of the layer inputs on a few hundred stored samples (conv inputs
unfolded to patches, the same column order as ``weight.reshape(out, -1)``). ``update``
follows GPM: the part of the new representation already spanned by ``M`` counts towards
the energy, and new directions are taken from the residual ``R - M M^T R`` until the
captured share of ``||R||_F^2`` reaches the threshold. ``update(..., rebuild=True)`` forgets
the old bases first and keeps the top directions of ``R`` alone (the rule of the official
FS-DGPM code, which rebuilds the memory from the replay buffer after every task).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPMMemory", "energy_rank", "layer_representation"]


def energy_rank(s: torch.Tensor, threshold: float, total: Optional[float] = None,
                accumulated: float = 0.0) -> int:
    """How many leading directions (singular values ``s``, descending) to keep so that
    ``(accumulated + sum(s[:r]**2)) / total >= threshold``.

    ``total`` defaults to ``sum(s**2)`` (a fresh SVD); GPM's incremental rule passes the
    energy of the whole new representation and, as ``accumulated``, the part of it already
    inside the stored basis. Returns 0 when the stored basis already reaches the threshold.
    Directions with energy below ``1e-12 * total`` (round-off of an already-spanned
    residual) are never kept, so ``threshold=1`` keeps exactly the numerical rank.
    """
    s2 = s.detach().to(torch.float64) ** 2
    tot = float(s2.sum()) + accumulated if total is None else float(total)
    if not tot > 0.0:
        return 0
    if accumulated / tot >= threshold:
        return 0
    cum = (accumulated + torch.cumsum(s2, 0)) / tot
    r = int(torch.searchsorted(cum, torch.tensor([float(threshold)], dtype=torch.float64)).item()) + 1
    useful = int((s2 > 1e-12 * tot).sum())
    return min(r, useful)


def _conv_padding(conv: nn.Conv2d):
    if conv.groups != 1:
        raise ValueError(f"GPM: grouped convolutions (groups={conv.groups}) are not supported; use groups=1")
    if conv.padding_mode != "zeros":
        raise ValueError(f"GPM: padding_mode={conv.padding_mode!r} is not supported; use 'zeros'")
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return 0
        raise ValueError("GPM: padding='same' is not supported; give the padding as numbers")
    return pad


def layer_representation(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The representation matrix ``R`` (``in_features x n_columns``) of one layer's input:
    the samples themselves for ``nn.Linear``, every receptive-field patch for ``nn.Conv2d``
    (``F.unfold``, rows in the order of ``weight.reshape(out, -1)``)."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(inp, layer.kernel_size, dilation=layer.dilation, padding=_conv_padding(layer),
                        stride=layer.stride)  # n, C*kh*kw, L
        return cols.transpose(0, 1).reshape(cols.shape[1], -1)
    if isinstance(layer, nn.Linear):
        return inp.reshape(-1, inp.shape[-1]).t()
    raise TypeError(f"GPM protects nn.Linear and nn.Conv2d layers, got {type(layer).__name__}")


Thresholds = Union[float, Sequence[float]]


class GPMMemory:
    """Per-layer orthonormal bases of past tasks' input spaces, and the projections.

    ``GPMMemory(model, params)`` protects every ``nn.Linear`` / ``nn.Conv2d`` of ``model``
    whose weight is in ``params`` (the list the optimizer and the FS step use; default: all
    trainable parameters); ``layers`` narrows the protected modules (e.g. leave out task heads).
    Gradient lists passed to the projections are aligned with
    ``params``; entries of parameters that are not protected are left alone.
    """

    def __init__(self, model: nn.Module, params: Optional[Sequence[torch.Tensor]] = None,
                 layers: Optional[Sequence[nn.Module]] = None):
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        index = {id(p): i for i, p in enumerate(self.params)}
        chosen = None if layers is None else {id(m) for m in layers}
        self.layers: List[nn.Module] = []
        self.param_index: List[int] = []
        for m in model.modules():
            if chosen is not None and id(m) not in chosen:
                continue
            if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m.weight) in index:
                if isinstance(m, nn.Conv2d):
                    _conv_padding(m)
                self.layers.append(m)
                self.param_index.append(index[id(m.weight)])
        if not self.layers:
            raise ValueError("GPM: the model has no nn.Linear or nn.Conv2d weight among the given parameters")
        self.model = model
        self.bases: List[Optional[torch.Tensor]] = [None] * len(self.layers)

    # ------------------------------------------------------------------ bases
    def sizes(self) -> List[int]:
        """Number of basis vectors stored per protected layer."""
        return [0 if b is None else b.shape[1] for b in self.bases]

    def dims(self) -> List[int]:
        """Input dimension of each protected layer (the most basis vectors it can hold)."""
        return [layer.weight[0].numel() for layer in self.layers]

    def is_empty(self) -> bool:
        """True while no layer holds a basis vector."""
        return not any(self.sizes())

    def memory_bytes(self) -> int:
        """Bytes held by the stored bases."""
        return sum(b.numel() * b.element_size() for b in self.bases if b is not None)

    @torch.no_grad()
    def representations(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One forward pass of ``x`` (no grad); the representation matrix of every protected
        layer's input (see ``layer_representation``)."""
        captured: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        hooks = []
        for i, layer in enumerate(self.layers):
            def hook(mod, args, i=i):
                captured[i] = layer_representation(mod, args[0].detach())
            hooks.append(layer.register_forward_pre_hook(hook))
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        missing = [i for i, c in enumerate(captured) if c is None]
        if missing:
            raise RuntimeError(f"GPM: layers {missing} saw no input in the forward pass; protect only used layers")
        return captured  # type: ignore[return-value]

    @torch.no_grad()
    def update(self, reps: Sequence[torch.Tensor], threshold: Thresholds, rebuild: bool = False) -> List[int]:
        """Add the directions that the new representations ``reps`` need (GPM's rule; see
        the module docstring); ``rebuild=True`` drops the old bases first. ``threshold`` is
        one energy fraction or one per layer. SVDs run in float64. Returns the number of
        vectors added per layer."""
        if len(reps) != len(self.layers):
            raise ValueError(f"GPM: got {len(reps)} representations for {len(self.layers)} layers")
        ths = [float(threshold)] * len(reps) if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
        if len(ths) != len(reps):
            raise ValueError(f"GPM: got {len(ths)} thresholds for {len(reps)} layers; give one or one per layer")
        added = []
        for i, (R, th) in enumerate(zip(reps, ths)):
            w = self.layers[i].weight
            d = w[0].numel()
            if R.shape[0] != d:
                raise ValueError(f"GPM: representation {i} has {R.shape[0]} rows, layer input has {d}")
            R = R.detach().to(torch.float64)
            old = None if rebuild or self.bases[i] is None else self.bases[i].to(R.device, torch.float64)
            total = float((R * R).sum())
            if old is not None:
                resid = R - old @ (old.t() @ R)
                accumulated = total - float((resid * resid).sum())
            else:
                resid, accumulated = R, 0.0
            if min(resid.shape) == 0:
                U, S = resid.new_zeros(d, 0), resid.new_zeros(0)
            else:
                U, S, _ = torch.linalg.svd(resid, full_matrices=False)
            r = energy_rank(S, th, total=total, accumulated=accumulated)
            k_old = 0 if old is None else old.shape[1]
            r = min(r, d - k_old)
            if r > 0:
                new = U[:, :r]
                if old is not None:  # one more Gram-Schmidt pass, then orthonormalize the block
                    new = new - old @ (old.t() @ new)
                    M = torch.linalg.qr(torch.cat([old, new], 1)).Q
                else:
                    M = new
            else:
                M = old
            if M is None or (rebuild and r == 0):
                self.bases[i] = None
            else:
                self.bases[i] = M.to(device=w.device, dtype=w.dtype).contiguous()
            added.append(r)
        return added

    # ------------------------------------------------------------------ projections
    def _matrix(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1)

    def project_out_(self, grads: List[Optional[torch.Tensor]],
                     lambdas: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[Optional[torch.Tensor]]:
        """In place: ``g <- g - (g M) diag(lam) M^T`` for every protected layer with a basis
        (``lam = 1`` when ``lambdas`` is None). ``grads`` is aligned with ``params``."""
        for j, (pi, M) in enumerate(zip(self.param_index, self.bases)):
            g = grads[pi]
            if M is None or g is None:
                continue
            c = self._matrix(g) @ M
            if lambdas is not None and lambdas[j] is not None:
                c = c * lambdas[j].to(c.dtype)
            g.sub_((c @ M.t()).reshape(g.shape))
        return grads

    def project_onto(self, grads: Sequence[Optional[torch.Tensor]],
                     lambdas: Optional[Sequence[Optional[torch.Tensor]]] = None,
                     coeffs: Optional[list] = None) -> List[Optional[torch.Tensor]]:
        """A new list: ``(g M) diag(lam) M^T`` for protected layers (zero where a layer has
        no basis yet), ``g`` unchanged for parameters that are not protected.
        Differentiable in ``g`` and ``lambdas``. If ``coeffs`` is a list, the coefficients
        ``g M`` (``out x k``, before ``lam``) of each protected layer are appended to it
        (``None`` for a layer without a basis)."""
        out = list(grads)
        for j, (pi, M) in enumerate(zip(self.param_index, self.bases)):
            g = grads[pi]
            if g is None or M is None:
                if g is not None:
                    out[pi] = torch.zeros_like(g)
                if coeffs is not None:
                    coeffs.append(None)
                continue
            c = self._matrix(g) @ M
            if coeffs is not None:
                coeffs.append(c)
            if lambdas is not None and lambdas[j] is not None:
                c = c * lambdas[j].to(c.dtype)
            out[pi] = (c @ M.t()).reshape(g.shape)
        return out
