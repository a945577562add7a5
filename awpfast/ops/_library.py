"""torch.library registration shared by the kernel backends (triton, native).

Each backend registers the seven seam ops as custom ops ``awpfast::<prefix><op>`` with
fake implementations, so ``torch.compile`` keeps each call as one opaque node (no graph
break on ``data_ptr()`` or kernel launches) and CUDA graphs can capture it. Eager calls
skip the dispatcher: its round trip is pure overhead next to a few microseconds of GPU work.

Optional list arguments (backups, deltas) travel through the custom op as empty lists.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

Tensors = List[torch.Tensor]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_norms(ts):
    return ts[0].new_empty(len(ts), dtype=_acc_dtype(ts[0].dtype))


class SeamOps:
    """The seam ops of one backend, as custom ops when this torch supports them.

    ``impls`` maps op names to the backend's implementations with the seam's group-level
    signatures (``backups``/``deltas`` given as lists, empty for none).
    """

    NAMES = ("norms", "perturb_", "restore_", "unperturb_", "ascent_step_", "project_", "pgd_step_")

    def __init__(self, prefix: str, impls: Dict[str, Callable]):
        missing = set(self.NAMES) - set(impls)
        if missing:
            raise ValueError(f"backend implementations missing for {sorted(missing)}")
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

    def op(self, name: str) -> Callable:
        """The custom op while Dynamo traces, else the implementation itself."""
        if self.ok and torch.compiler.is_compiling():
            return getattr(torch.ops.awpfast, self.prefix + name)
        return self.impls[name]


def as_list(ts: Optional[Tensors]) -> Tensors:
    """An optional tensor list in the form the custom ops take (empty for none)."""
    return [] if ts is None else list(ts)


def floats(v, n: int) -> List[float]:
    """Per-tensor floats (the seam passes lists; a single float is accepted too)."""
    if isinstance(v, (int, float)):
        return [float(v)] * n
    return [float(x) for x in v]
