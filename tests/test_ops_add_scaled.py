"""``ops.add_scaled_``, the general apply op, against an independent float64 formula, on
every CPU backend and (on a CUDA machine) every backend on CUDA."""

import pytest
import torch

import awpfast.ops as ops
from conftest import backend_device_params, many_mixed, on_device, poisoned, rand_tensors, rel_err, tol

BACKENDS = [b for b in ops.BACKENDS if b in ops.available_backends()]
BD = backend_device_params(BACKENDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ODD_SHAPES = [(3, 5), (1,), (0,), (7, 3, 3, 3), (1023,), (1025,), (4097,), (2, 1, 1)]


def _ref(ps, ds, scales, clip=None, base=None):
    out, vs = [], []
    for i, (p, d) in enumerate(zip(ps, ds)):
        d64 = d.double()
        if clip is not None:
            d64 = d64.clamp(-clip, clip)
        v = float(scales[i]) * d64
        vs.append(v)
        out.append((base[i] if base is not None else p).double() + v)
    return out, vs


@pytest.mark.parametrize("backend,device", BD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [None, 0.7])
def test_add_scaled_matches_float64(backend, device, dtype, clip):
    ps = rand_tensors(ODD_SHAPES, dtype)
    ds = rand_tensors(ODD_SHAPES, dtype)
    scales = (torch.rand(len(ps), dtype=torch.float64) * 0.1 - 0.05).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    ref, ref_v = _ref(ps, ds, scales.tolist(), clip)
    work = on_device(ps, device)
    backups, deltas = poisoned(work), poisoned(work)
    ds_dev = on_device(ds, device)
    ops.add_scaled_(work, ds_dev, scales.to(device), clip=clip, backups=backups, deltas=deltas, backend=backend)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ds_dev, ds)), "directions must not be written"
    for i, p in enumerate(ps):
        assert torch.equal(backups[i].cpu(), p), "backup must be a bit-exact copy"
        assert rel_err(work[i], ref[i]) <= tol(dtype), (i, rel_err(work[i], ref[i]))
        if p.numel():
            assert rel_err(deltas[i], ref_v[i]) <= max(tol(dtype), 1e-6), i


@pytest.mark.parametrize("backend,device", BD)
def test_add_scaled_from_base_with_float_and_list_scales(backend, device):
    ps = rand_tensors(ODD_SHAPES, torch.float32)
    base = rand_tensors(ODD_SHAPES, torch.float32)
    ds = rand_tensors(ODD_SHAPES, torch.float32)
    for scale in (-0.3, [0.1 * i for i in range(len(ps))], torch.tensor(0.25)):
        s_list = [float(scale)] * len(ps) if not isinstance(scale, list) else scale
        ref, _ = _ref(ps, ds, s_list, base=base)
        work = poisoned(on_device(ps, device))  # every element must be written from the base
        sc = scale.to(device) if isinstance(scale, torch.Tensor) else scale
        ops.add_scaled_(work, on_device(ds, device), sc, base=on_device(base, device), backend=backend)
        for w, r in zip(work, ref):
            assert rel_err(w, r) <= 1e-6


@pytest.mark.parametrize("backend,device", BD)
def test_add_scaled_zero_scale_from_base_is_bitwise_base(backend, device):
    base = rand_tensors(ODD_SHAPES, torch.float32)
    ds = rand_tensors(ODD_SHAPES, torch.float32)
    work = poisoned(on_device(base, device))
    ops.add_scaled_(work, on_device(ds, device), 0.0, base=on_device(base, device), backend=backend)
    assert all(torch.equal(w.cpu(), b) for w, b in zip(work, base))


def test_add_scaled_many_tensors_mixed_dtypes_and_deterministic():
    ps, ds = many_mixed()
    scales = torch.randn(len(ps), dtype=torch.float64)
    ref, _ = _ref(ps, ds, scales.tolist(), clip=1.5)
    a, b = [p.clone() for p in ps], [p.clone() for p in ps]
    ops.add_scaled_(a, ds, scales, clip=1.5)
    ops.add_scaled_(b, ds, scales, clip=1.5)
    for x, y, r, p in zip(a, b, ref, ps):
        assert torch.equal(x, y)
        assert rel_err(x, r) <= tol(p.dtype) * 10


def test_add_scaled_errors():
    ps = rand_tensors([(3,), (4,)], torch.float32)
    ds = rand_tensors([(3,), (4,)], torch.float32)
    with pytest.raises(ValueError, match="one value per tensor"):
        ops.add_scaled_(ps, ds, torch.ones(3))
    with pytest.raises(ValueError, match="clip"):
        ops.add_scaled_(ps, ds, 1.0, clip=0.0)
    with pytest.raises(ValueError, match="finite"):
        ops.add_scaled_(ps, ds, float("nan"))
    with pytest.raises(TypeError, match="floating-point"):
        ops.add_scaled_(ps, ds, torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        ops.add_scaled_(ps, ds[::-1], 1.0)
