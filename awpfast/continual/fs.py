"""The flattening-sharpness (FS) step of FS-DGPM (Deng et al., NeurIPS 2021).

For one incoming batch split into ``K`` inner chunks ``B_1..B_K`` and a meta batch ``B``
(the incoming batch plus replayed samples), starting from ``w~_0 = w``:

    g_k   = grad L(w~_{k-1}; B_k)                             (first order: a constant)
    w~_k  = w~_{k-1} + eta1 * clamp(P(g_k), -clip, clip)
    loss  = mean_k L(w~_k; B)

``P`` is the projection onto the GPM subspace with soft weights,
``P(g) = (g M) diag(lam) M^T`` for protected layers (identity when there is no memory yet,
or for FS-ER, which has none). The step returns ``grad_w loss = mean_k grad L(w~_k; B)``
and, for DGPM, ``d loss / d lam``; the caller projects the gradient, updates ``lam`` and
takes the optimizer step at ``w``.

The first-order path perturbs the model's own parameters with the seam's fused
absolute-step op (``ops.add_scaled_``: clip, scale and the backup in one call), evaluates
the meta loss on the model as it is, and puts ``w`` back bit-exactly with ``ops.restore_``
(also on an exception). No functional copy of the model is made. ``d loss / d lam`` has a
closed form there: with ``A_j = g_j M``, ``m_j`` the mask of entries the clamp let
through and ``G_k = grad L(w~_k; B)``,
``d loss / d lam_r = eta1/K * sum_j sum_a A_j[a, r] * ((m_j * sum_{k>=j} G_k) M)[a, r]``.

``second_order=True`` differentiates through ``g_k`` as well (Hessian-vector terms); that
path builds the perturbed weights functionally (``torch.func.functional_call``).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import ops
from .gpm import GPMMemory

__all__ = ["FSResult", "fs_step"]

Batch = Tuple[torch.Tensor, torch.Tensor]


class FSResult(NamedTuple):
    """What one FS step returns."""
    grads: List[torch.Tensor]            #: mean_k grad_w L(w~_k; B), aligned with ``params``
    lambda_grads: Optional[List[Optional[torch.Tensor]]]  #: d loss / d lam per protected layer
    loss: torch.Tensor                   #: the mean meta loss (detached)


def _fill(grads, params):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def fs_step(model: nn.Module, params: Sequence[torch.Tensor], criterion: Callable, chunks: Sequence[Batch],
            meta_batch: Batch, *, eta1: float, clip: Optional[float] = 2.0, memory: Optional[GPMMemory] = None,
            lambdas: Optional[Sequence[Optional[torch.Tensor]]] = None, lambda_grad: bool = False,
            backups: Optional[List[torch.Tensor]] = None, second_order: bool = False,
            backend: Optional[str] = None) -> FSResult:
    """One FS step (see the module docstring). ``criterion(logits, y)`` is the loss;
    ``params`` the parameters that are perturbed (and whose gradients come back);
    ``memory``/``lambdas`` the GPM subspace and its soft weights (``None``: no projection);
    ``lambda_grad`` asks for ``d loss / d lam``; ``backups`` optional preallocated buffers
    (one per parameter). The model's weights are the same bits after the call."""
    params = list(params)
    if not chunks:
        raise ValueError("fs_step: needs at least one inner chunk")
    if eta1 < 0:
        raise ValueError(f"fs_step: eta1 must be >= 0, got {eta1}")
    project = memory is not None and not memory.is_empty()
    want_lam = bool(lambda_grad and project and lambdas is not None)
    if second_order:
        return _fs_second_order(model, params, criterion, chunks, meta_batch, eta1, clip, memory if project else None,
                                lambdas, want_lam)
    if backups is None:
        backups = [torch.empty_like(p) for p in params]
    K = len(chunks)
    acc = [torch.zeros_like(p) for p in params]
    bases = memory.bases if project else []
    pidx = memory.param_index if project else []
    lam_g = [None if M is None else M.new_zeros(M.shape[1]) for M in bases] if want_lam else None
    records = []  # per chunk: [(A = g M, clamp mask) or None per protected layer]
    metas = []    # per chunk: the meta-loss gradients of the protected layers
    losses = []
    perturbed = False
    mx, my = meta_batch
    try:
        for k, (xc, yc) in enumerate(chunks):
            g = _fill(torch.autograd.grad(criterion(model(xc), yc), params, allow_unused=True), params)
            coeffs = [] if want_lam else None
            d = memory.project_onto(g, lambdas, coeffs) if project else g
            if want_lam:
                rec = []
                for pi, A in zip(pidx, coeffs):
                    mask = None if (A is None or clip is None) else d[pi].reshape(A.shape[0], -1).abs() <= clip
                    rec.append(None if A is None else (A, mask))
                records.append(rec)
            with torch.no_grad():
                ops.add_scaled_(params, d, float(eta1), clip=clip, backups=backups if k == 0 else None,
                                backend=backend)
            perturbed = True
            meta = criterion(model(mx), my)
            G = _fill(torch.autograd.grad(meta, params, allow_unused=True), params)
            torch._foreach_add_(acc, G, alpha=1.0 / K)
            if want_lam:
                metas.append([G[pi] for pi in pidx])
            losses.append(meta.detach())
    finally:
        if perturbed:
            with torch.no_grad():
                ops.restore_(params, backups, backend=backend)
    if want_lam:
        # d loss/d lam = eta1/K sum_j rowsum(A_j * ((m_j * H_j) M)),  H_j = sum_{k>=j} G_k:
        # one matmul per chunk and layer (suffix sums instead of every (j, k) pair)
        for j, M in enumerate(bases):
            if M is None:
                continue
            H = None
            for rec, Gs in zip(reversed(records), reversed(metas)):
                G2 = Gs[j].reshape(Gs[j].shape[0], -1)
                H = G2 if H is None else H + G2
                A, mask = rec[j]
                lam_g[j].add_((A * ((H if mask is None else H * mask) @ M)).sum(0), alpha=float(eta1) / K)
    return FSResult(acc, lam_g, torch.stack(losses).mean())


def _fs_second_order(model, params, criterion, chunks, meta_batch, eta1, clip, memory, lambdas, want_lam):
    from torch.func import functional_call
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        keys = [names[id(p)] for p in params]
    except KeyError:
        raise ValueError("fs_step(second_order=True): every parameter must belong to the model") from None
    lam = None
    if lambdas is not None:
        lam = [None if l is None else (l.detach().requires_grad_(True) if want_lam else l.detach())
               for l in lambdas]
    fast = list(params)
    metas = []
    mx, my = meta_batch
    for xc, yc in chunks:
        out = functional_call(model, dict(zip(keys, fast)), (xc,))
        g = _fill(torch.autograd.grad(criterion(out, yc), fast, create_graph=True, allow_unused=True), fast)
        d = memory.project_onto(g, lam) if memory is not None else g
        if clip is not None:
            d = [torch.clamp(t, -clip, clip) for t in d]
        fast = [f + eta1 * t for f, t in zip(fast, d)]
        metas.append(criterion(functional_call(model, dict(zip(keys, fast)), (mx,)), my))
    loss = torch.stack(metas).mean()
    lam_leaves = [l for l in (lam or []) if l is not None and l.requires_grad]
    out = torch.autograd.grad(loss, list(params) + lam_leaves, allow_unused=True)
    grads = _fill(out[:len(params)], params)
    lam_g = None
    if want_lam:
        it = iter(out[len(params):])
        lam_g = []
        for l in lam:
            if l is None or not l.requires_grad:
                lam_g.append(None)
            else:
                gl = next(it)
                lam_g.append(torch.zeros_like(l) if gl is None else gl)
    return FSResult([g.detach() for g in grads], lam_g, loss.detach())
