"""torch.library registration shared by the kernel backends (triton, native).

Each backend registers the seven seam ops (and, where it has kernels for them, the
weight-perturbation family ops ``add_scaled_``, ``global_sqnorm``, ``asam_apply_`` and
``box_perturb_``) as custom ops ``awpfast::<prefix><op>`` with fake implementations, so
``torch.compile`` keeps each call as one opaque node (no graph break on ``data_ptr()`` or
kernel launches) and CUDA graphs can capture it. Eager calls skip the dispatcher: its round
trip is pure overhead next to a few microseconds of GPU work.

Optional list arguments (backups, deltas, base, weights) travel through the custom op as
empty lists. Per-tensor scales travel either as a list of floats or as a float64 tensor on
the device (``scale_t``; the list is then empty), so a scale computed on the device is read
by the kernels without a host sync.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ._util import acc_dtype, floats

Tensors = List[torch.Tensor]


def _fake_norms(ts):
    return ts[0].new_empty(len(ts), dtype=acc_dtype(ts[0].dtype))


class SeamOps:
    """The seam ops of one backend, as custom ops when this torch supports them.

    ``impls`` maps op names to the backend's implementations with the seam's group-level
    signatures (``backups``/``deltas`` given as lists, empty for none).
    """

    NAMES = ("norms", "perturb_", "restore_", "unperturb_", "ascent_step_", "project_", "pgd_step_")
    # registered when the backend implements them (others use the foreach fallback of the seam)
    OPTIONAL = ("add_scaled_", "global_sqnorm", "asam_apply_", "box_perturb_")

    def __init__(self, prefix: str, impls: Dict[str, Callable]):
        missing = set(self.NAMES) - set(impls)
        if missing:
            raise ValueError(f"backend implementations missing for {sorted(missing)}")
        unknown = set(impls) - set(self.NAMES) - set(self.OPTIONAL)
        if unknown:
            raise ValueError(f"unknown seam ops {sorted(unknown)}")
        self.prefix, self.impls = prefix, impls
        self.ok = False
        if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
            try:
                self._register()
                self.ok = True
            except Exception:  # pragma: no cover - a torch without these registration features
                self.ok = False

    def _register(self):
        p, f = "awpfast::" + self.prefix, self.impls

        @torch.library.custom_op(p + "norms", mutates_args=())
        def _norms(tensors: Tensors) -> torch.Tensor:
            return f["norms"](tensors)
        _norms.register_fake(_fake_norms)

        @torch.library.custom_op(p + "perturb_", mutates_args=("params", "backups", "deltas"))
        def _perturb(params: Tensors, directions: Tensors, gammas: List[float], eps: float,
                     backups: Tensors, deltas: Tensors) -> torch.Tensor:
            return f["perturb_"](params, directions, gammas, eps, backups, deltas)
        _perturb.register_fake(lambda params, *a: _fake_norms(params))

        @torch.library.custom_op(p + "restore_", mutates_args=("params",))
        def _restore(params: Tensors, backups: Tensors) -> None:
            f["restore_"](params, backups)
        _restore.register_fake(lambda *a: None)

        @torch.library.custom_op(p + "unperturb_", mutates_args=("params",))
        def _unperturb(params: Tensors, deltas: Tensors) -> None:
            f["unperturb_"](params, deltas)
        _unperturb.register_fake(lambda *a: None)

        @torch.library.custom_op(p + "ascent_step_", mutates_args=("params",))
        def _ascent(params: Tensors, backups: Tensors, directions: Tensors, step_sizes: List[float],
                    gammas: List[float], eps: float) -> torch.Tensor:
            return f["ascent_step_"](params, backups, directions, step_sizes, gammas, eps)
        _ascent.register_fake(lambda params, *a: _fake_norms(params))

        @torch.library.custom_op(p + "project_", mutates_args=("params",))
        def _project(params: Tensors, backups: Tensors, gammas: List[float]) -> None:
            f["project_"](params, backups, gammas)
        _project.register_fake(lambda *a: None)

        @torch.library.custom_op(p + "pgd_step_", mutates_args=("x_adv",))
        def _pgd(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float,
                 norm: str) -> None:
            f["pgd_step_"](x_adv, grad, x, alpha, eps, norm)
        _pgd.register_fake(lambda *a: None)

        if "add_scaled_" in f:
            @torch.library.custom_op(p + "add_scaled_", mutates_args=("params", "backups", "deltas"))
            def _add_scaled(params: Tensors, directions: Tensors, scales: List[float], scale_t: Optional[torch.Tensor],
                            clip: Optional[float], base: Tensors, backups: Tensors, deltas: Tensors) -> None:
                f["add_scaled_"](params, directions, scales, scale_t, clip, base, backups, deltas)
            _add_scaled.register_fake(lambda *a: None)

        if "global_sqnorm" in f:
            @torch.library.custom_op(p + "global_sqnorm", mutates_args=())
            def _global_sqnorm(tensors: Tensors, weights: Tensors, eta: float) -> torch.Tensor:
                return f["global_sqnorm"](tensors, weights, eta)
            _global_sqnorm.register_fake(
                lambda tensors, *a: tensors[0].new_empty((), dtype=acc_dtype(tensors[0].dtype)))

        if "asam_apply_" in f:
            @torch.library.custom_op(p + "asam_apply_", mutates_args=("params", "backups"))
            def _asam(params: Tensors, directions: Tensors, scales: List[float], scale_t: Optional[torch.Tensor],
                      eta: float, backups: Tensors) -> None:
                f["asam_apply_"](params, directions, scales, scale_t, eta, backups)
            _asam.register_fake(lambda *a: None)

        if "box_perturb_" in f:
            @torch.library.custom_op(p + "box_perturb_", mutates_args=("params", "origins"))
            def _box(params: Tensors, directions: Tensors, adv_lrs: List[float], adv_epss: List[float],
                     origins: Tensors, first: bool, eps: float, dnorms: Optional[torch.Tensor],
                     wnorms: Optional[torch.Tensor]) -> torch.Tensor:
                return f["box_perturb_"](params, directions, adv_lrs, adv_epss, origins, first, eps, dnorms, wnorms)
            _box.register_fake(lambda params, *a: _fake_norms(params))

    def op(self, name: str) -> Callable:
        """The custom op while Dynamo traces, else the implementation itself."""
        if self.ok and torch.compiler.is_compiling():
            return getattr(torch.ops.awpfast, self.prefix + name)
        return self.impls[name]


def as_list(ts: Optional[Tensors]) -> Tensors:
    """An optional tensor list in the form the custom ops take (empty for none)."""
    return [] if ts is None else list(ts)


def scale_args(scales, n: int, device):
    """(list of floats, None) or ([], float64 contiguous tensor on ``device``) for the
    per-tensor scales of the seam (a float, a list, or a float tensor with one value per
    tensor, possibly an expanded 0-dim one): the tensor form stays on the device."""
    if isinstance(scales, torch.Tensor):
        t = scales.to(device=device, dtype=torch.float64)
        if t.dim() == 0:
            t = t.reshape(1).expand(n)
        return [], t.contiguous()
    return floats(scales, n), None


def norm_args(norms, device):
    """Given (direction_norms, param_norms) of box_perturb_ as float64 contiguous tensors on
    ``device`` (or (None, None))."""
    if norms is None:
        return None, None
    return tuple(n.to(device=device, dtype=torch.float64).contiguous() for n in norms)
