"""torch.library registration and group functions of the kernel backends (triton, native).

A kernel backend hands ``SeamOps`` one implementation per op of the table (``_spec.OPS``), taking
the custom-op arguments (see ``_spec``: optional lists as empty lists, scales as ``(scales,
scale_t)``, given norms as ``(dnorms, wnorms)``). ``SeamOps`` registers each as a custom op
``awpfast::<prefix><op>`` whose schema, mutated arguments and fake implementation are derived from
the table, so ``torch.compile`` keeps each call as one opaque node (no graph break on
``data_ptr()`` or kernel launches) and CUDA graphs can capture it; and it builds the backend's
group functions (``SeamOps.group``), which convert the group-level arguments and call the custom
op while Dynamo traces, the implementation itself otherwise (the dispatcher's round trip is pure
overhead next to a few microseconds of GPU work).

Per-tensor scales travel either as a list of floats or as a float64 tensor on the device
(``scale_t``; the list is then empty), so a scale computed on the device is read by the kernels
without a host sync.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional

import torch

from . import _spec
from ._spec import CHOICE, FIRST, FLAG, FLOATS, NORMS, OPT_TENSORS, PER_TENSOR, SCALAR, SCALES, SUM, TENSOR, TENSORS
from ._util import acc_dtype, floats

Tensors = List[torch.Tensor]

# the custom-op annotation of each argument kind with one parameter (SCALES, NORMS and SCALAR: _schema_params)
_TYPES = {TENSORS: Tensors, OPT_TENSORS: Tensors, FLOATS: List[float], FLAG: bool, CHOICE: str,
          TENSOR: torch.Tensor}


def _schema_params(arg: _spec.Arg) -> list:
    """(name, annotation) of the custom-op parameters of one argument."""
    if arg.kind == SCALES:
        return [(arg.group_name, List[float]), ("scale_t", Optional[torch.Tensor])]
    if arg.kind == NORMS:
        return [("dnorms", Optional[torch.Tensor]), ("wnorms", Optional[torch.Tensor])]
    if arg.kind == SCALAR:
        return [(arg.name, Optional[float] if arg.default is None else float)]
    return [(arg.group_name, _TYPES[arg.kind])]


def _prototype(op: _spec.Op, impl: Callable) -> Callable:
    """``impl`` under the custom-op signature derived from the table (``torch.library``
    infers the schema from it)."""
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann)
              for a in op.args for name, ann in _schema_params(a)]
    ret = torch.Tensor if op.returns in (PER_TENSOR, SUM) else None

    def fn(*args):
        return impl(*args)
    fn.__name__ = fn.__qualname__ = op.name
    fn.__signature__ = inspect.Signature(params, return_annotation=ret)
    return fn


def _fake(op: _spec.Op) -> Callable:
    if op.returns == PER_TENSOR:
        return lambda lead, *a: lead[0].new_empty(len(lead), dtype=acc_dtype(lead[0].dtype))
    if op.returns == SUM:
        return lambda lead, *a: lead[0].new_empty((), dtype=acc_dtype(lead[0].dtype))
    return lambda *a: None


def _empty(op: _spec.Op):
    """The group function's result for an empty list (the public functions never pass one)."""
    if op.returns == PER_TENSOR:
        return torch.empty(0, dtype=torch.float32)
    if op.returns == SUM:
        return torch.zeros((), dtype=torch.float32)
    return None


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


def _op_args(op: _spec.Op, args: tuple) -> list:
    """The custom-op arguments of ``op`` from its group-level ones."""
    lead = args[0]
    n = len(lead) if op.args[0].kind == TENSORS else 1
    dev = lead[0].device if op.args[0].kind == TENSORS else lead.device
    out = []
    for a, x in zip(op.args, args):
        if a.kind == TENSORS:
            out.append(list(x))
        elif a.kind == OPT_TENSORS:
            out.append(as_list(x))
        elif a.kind == FLOATS:
            out.append(floats(x, n))
        elif a.kind == SCALES:
            out += scale_args(x, n, dev)
        elif a.kind == NORMS:
            out += norm_args(x, dev)
        elif a.kind == SCALAR:
            out.append(None if x is None else float(x))
        elif a.kind == FLAG:
            out.append(bool(x))
        elif a.kind == CHOICE:
            out.append(str(x))
        else:
            out.append(x)
    return out


class SeamOps:
    """The ops of one kernel backend: custom ops ``awpfast::<prefix><op>`` over ``impls`` (op
    name -> implementation taking the custom-op arguments, one for every op of the table), and
    the backend's group functions.

    ``check``: called by every group function with the (name, tensor list) pairs of its tensor
    arguments (one-tensor arguments as one-element lists) before anything runs; the triton
    backend checks memory layouts there. ``register=False`` (the backend cannot load here)
    registers nothing; the group functions then call the implementations directly.
    """

    def __init__(self, prefix: str, impls: Dict[str, Callable], check: Optional[Callable] = None,
                 register: bool = True):
        if set(impls) != set(_spec.NAMES):
            raise ValueError(f"implementations missing for {sorted(set(_spec.NAMES) - set(impls))}, "
                             f"unknown: {sorted(set(impls) - set(_spec.NAMES))}")
        self.prefix, self.impls, self.check, self.registered = prefix, impls, check, register
        if register:
            for op in _spec.OPS:
                mutates = tuple(name for a in op.args if a.mutates for name, _ in _schema_params(a))
                custom = torch.library.custom_op("awpfast::" + prefix + op.name, _prototype(op, impls[op.name]),
                                                 mutates_args=mutates)
                custom.register_fake(_fake(op))

    def op(self, name: str) -> Callable:
        """The custom op while Dynamo traces, else the implementation itself."""
        if self.registered and torch.compiler.is_compiling():
            return getattr(torch.ops.awpfast, self.prefix + name)
        return self.impls[name]

    def group(self, name: str) -> Callable:
        """The backend's group function of op ``name`` (the signature of ``_spec.group_signature``)."""
        op = _spec.SPEC[name]
        tensor_args = [a for a in op.args if a.kind in (TENSORS, OPT_TENSORS, TENSOR)]
        one = op.args[0].kind == TENSOR

        def group_fn(*args):
            if not one and len(args[0]) == 0:
                return _empty(op)
            if self.check is not None:
                values = dict(zip((a.name for a in op.args), args))
                self.check(*[(a.name, [values[a.name]] if a.kind == TENSOR else values[a.name])
                             for a in tensor_args if values[a.name] is not None])
            out = self.op(name)(*_op_args(op, args))
            return None if op.returns == FIRST else out
        group_fn.__name__ = group_fn.__qualname__ = name
        group_fn.__doc__ = f"``{_spec.group_signature(op)}`` on this backend's kernels (see ``_spec``)."
        return group_fn

    def group_functions(self) -> Dict[str, Callable]:
        """{op name: group function} for every op of the table."""
        return {name: self.group(name) for name in _spec.NAMES}
