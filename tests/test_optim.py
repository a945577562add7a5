"""The AWP wrapper: reference semantics, state handling, errors, and 'nothing lost'."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import awpfast
import awpfast.ops as ops
from awpfast import AWP

BACKENDS = [b for b in ("reference", "foreach", "native") if b in ops.available_backends()]


def small_net(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).to(dtype)


def batch(dtype=torch.float32, n=6):
    return torch.rand(n, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (n,))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def reference_proxy_perturbation(model, x, y, gamma):
    """The reference algorithm, float64, from the design brief: copy the state into a proxy,
    one plain SGD step on -loss in train mode, diff, scale per layer."""
    proxy = copy.deepcopy(model)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    popt = torch.optim.SGD(proxy.parameters(), lr=0.01)
    popt.zero_grad()
    (-F.cross_entropy(proxy(x), y)).backward()
    popt.step()
    old, new = model.state_dict(), proxy.state_dict()
    v = {}
    for k in old:
        if old[k].dim() > 1 and "weight" in k:
            diff = new[k] - old[k]
            v[k] = gamma * old[k].norm() / (diff.norm() + 1e-20) * diff
    return v


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_proxy_float64(backend):
    torch.manual_seed(1)
    model = small_net(torch.float64).train()
    x, y = batch(torch.float64)
    v_ref = reference_proxy_perturbation(model, x, y, 0.01)
    w0 = snapshot(model)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, backend=backend)
    assert set(awp.perturbed_parameters) == set(v_ref)
    assert awp.perturb(lambda: F.cross_entropy(model(x), y))
    for name, p in model.named_parameters():
        if name in v_ref:
            err = ((p.detach() - w0[name]) - v_ref[name]).norm() / v_ref[name].norm()
            assert err < 1e-10, (name, err.item())
        else:
            assert torch.equal(p.detach(), w0[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ascent_leaves_bn_stats_and_grads(backend):
    model = small_net().train()
    x, y = batch()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.02, backend=backend)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_is_bit_exact_and_before_step_mode(backend):
    torch.manual_seed(2)
    model = small_net().train()
    x, y = batch()
    twin = copy.deepcopy(model)
    w0 = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    awp = AWP(opt, model, gamma=0.01, restore="before_step", backend=backend)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    assert awp.restore() is True
    assert_same(model, w0)
    assert awp.restore() is False  # nothing perturbed any more
    # before_step: grads at w+v, restore w bit-exactly, then the base step from w
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    awp.step()
    topt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for p, g in zip(twin.parameters(), grads):
        p.grad = g
    topt.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_step_equals_formula(backend):
    torch.manual_seed(3)
    model = small_net(torch.float64).train()
    x, y = batch(torch.float64)
    lr, wd, gamma = 0.1, 5e-4, 0.01
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = AWP(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd), model,
              gamma=gamma, backend=backend)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    wv = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    awp.step()
    for n, p in model.named_parameters():
        v = wv[n] - w0[n]
        # w <- (w + v) - lr * (g(w+v) + wd * (w + v)) - v   (first momentum step: buf = update)
        expected = wv[n] - lr * (g[n] + wd * wv[n]) - v
        assert (p.detach() - expected).abs().max() < 1e-12, n
    assert not awp.is_perturbed


def _manual_multistep(model, x, y, gamma, eta, k):
    """float64 multi-step AWP from the brief, one layer at a time."""
    sel = [p for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]
    w = [p.detach().clone() for p in sel]
    v = [torch.zeros_like(p) for p in sel]
    frozen = copy.deepcopy(model)
    for _ in range(k):
        with torch.no_grad():
            for p, wi, vi in zip(frozen_sel(frozen), w, v):
                p.copy_(wi + vi)
        loss = F.cross_entropy(frozen(x), y)
        gs = torch.autograd.grad(loss, frozen_sel(frozen))
        for i, (wi, gi) in enumerate(zip(w, gs)):
            vi = v[i] + eta * wi.norm() / (gi.norm() + 1e-20) * gi
            r = gamma * wi.norm()
            v[i] = vi * min(1.0, (r / vi.norm()).item())
    return w, v


def frozen_sel(m):
    return [p for n, p in m.named_parameters() if p.dim() > 1 and "weight" in n]


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_projection(backend):
    torch.manual_seed(4)
    model = small_net(torch.float64).eval()  # eval: the manual version sees the same BN behaviour
    x, y = batch(torch.float64)
    gamma, eta, k = 0.01, 0.006, 4
    w, v = _manual_multistep(model, x, y, gamma, eta, k)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=gamma, steps=k, step_size=eta,
              backend=backend)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    for p, wi, vi in zip(frozen_sel(model), w, v):
        got = p.detach() - wi
        assert (got - vi).norm() / vi.norm() < 1e-9
        assert got.norm() <= gamma * wi.norm() * (1 + 1e-12)
    awp.restore()
    for p, wi in zip(frozen_sel(model), w):
        assert torch.equal(p.detach(), wi)


def test_gamma_zero_skips_ascent_pass():
    model = small_net()
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.0)
    calls = []
    assert awp.perturb(lambda: calls.append(1)) is False
    assert calls == [] and not awp.is_perturbed
    awp.set_gamma(0.01)
    x, y = batch()
    assert awp.perturb(lambda: (calls.append(1), F.cross_entropy(model(x), y))[1])
    assert calls == [1]


def test_per_group_gamma():
    torch.manual_seed(5)
    model = small_net(torch.float64)
    convs = [model[0].weight, model[3].weight]
    rest = [p for p in model.parameters() if all(p is not c for c in convs)]
    opt = torch.optim.SGD([{"params": convs, "awp_gamma": 0.02}, {"params": rest}], lr=0.1)
    awp = AWP(opt, model, gamma=0.005)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch(torch.float64)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    rel = {n: ((p.detach() - w0[n]).norm() / w0[n].norm()).item() for n, p in model.named_parameters()
           if n in awp.perturbed_parameters}
    assert abs(rel["0.weight"] - 0.02) < 1e-12 and abs(rel["3.weight"] - 0.02) < 1e-12
    assert abs(rel["7.weight"] - 0.005) < 1e-12


def test_training_loop_with_scheduler_gradscaler_autocast():
    torch.manual_seed(6)
    model = small_net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    awp = AWP(opt, model, gamma=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(awp, milestones=[3, 6], gamma=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GradScaler on CPU may warn about its device
        for step in range(8):
            x, y = batch(n=8)
            def ascent():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return F.cross_entropy(model(x), y)
            with awp.perturbed(ascent):
                awp.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(awp)
                scaler.update()
            sched.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(awp.param_groups[0]["lr"] - 0.001) < 1e-12
    assert awp.perturb_count == 8 and not awp.is_perturbed


def _train(model, awp, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(6, 3, 8, 8, generator=g)
        y = torch.randint(0, 5, (6,), generator=g)
        awp.perturb(lambda: F.cross_entropy(model(x), y))
        awp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        awp.step()


def test_state_dict_roundtrip_resumes_identically():
    torch.manual_seed(7)
    model = small_net().train()
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), model, gamma=0.01)
    _train(model, awp, 3, seed=0)
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(awp.state_dict())}
    _train(model, awp, 3, seed=1)
    resumed = small_net().train()
    resumed.load_state_dict(ckpt["model"])
    awp2 = AWP(torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), resumed, gamma=0.01)
    awp2.load_state_dict(ckpt["opt"])
    assert awp2.perturb_count == 3
    _train(resumed, awp2, 3, seed=1)
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_loads_plain_base_optimizer_checkpoint():
    model = small_net()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    base.step()
    sd = base.state_dict()
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, gamma=0.01)
    awp.load_state_dict(sd)
    assert awp.param_groups[0]["lr"] == 0.05 and awp.param_groups[0]["awp_gamma"] == 0.01
    p0 = next(model.parameters())
    assert torch.equal(awp.state[p0]["momentum_buffer"], base.state[p0]["momentum_buffer"])
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        awp.load_state_dict({"foo": 1})


def test_is_an_optimizer_sharing_base_state():
    model = small_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    awp = AWP(base, model)
    assert isinstance(awp, torch.optim.Optimizer)
    assert awp.param_groups is base.param_groups and awp.state is base.state
    hooks = []
    awp.register_step_post_hook(lambda opt, a, k: hooks.append(1))
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    with pytest.warns(UserWarning, match="without perturb"):
        awp.step()
    assert hooks == [1]


# ----------------------------------------------------------------------------- errors
def test_constructor_errors():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        AWP(opt, model, gamma=-0.1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        AWP(opt, model, steps=0)
    with pytest.raises(ValueError, match="selected no parameters.*include="):
        AWP(opt, model, include=lambda n, p: False)
    with pytest.raises(ValueError, match="restore must be one of"):
        AWP(opt, model, restore="never")
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        AWP(model, model)
    awp = AWP(opt, model)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        awp.set_gamma(float("nan"))


def _setup():
    torch.manual_seed(8)
    model = small_net().train()
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
    x, y = batch()
    return model, awp, x, y


def test_perturb_twice_and_state_dict_while_perturbed():
    model, awp, x, y = _setup()
    w0 = snapshot(model)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    wv = snapshot(model)
    with pytest.raises(RuntimeError, match="already perturbed.*step\\(\\) or restore\\(\\)"):
        awp.perturb(lambda: F.cross_entropy(model(x), y))
    assert_same(model, wv)
    with pytest.raises(RuntimeError, match="state_dict\\(\\) called while the weights are perturbed"):
        awp.state_dict()
    with pytest.raises(RuntimeError, match="load_state_dict\\(\\) called while"):
        awp.load_state_dict({})
    awp.restore()
    assert_same(model, w0)


@pytest.mark.parametrize("closure,exc,msg", [
    (lambda m, x, y: 3.0, TypeError, "returned float, not a tensor"),
    (lambda m, x, y: F.cross_entropy(m(x), y).detach(), ValueError, "does not depend on the selected"),
    (lambda m, x, y: torch.zeros((), requires_grad=True) * 2, ValueError, "not connected to any selected"),
    (lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"), ValueError, "scalar loss"),
    (lambda m, x, y: 1 / 0, ZeroDivisionError, "division"),
])
def test_bad_closures_leave_everything(closure, exc, msg):
    model, awp, x, y = _setup()
    w0 = snapshot(model)
    with pytest.raises(exc, match=msg):
        awp.perturb(lambda: closure(model, x, y))
    assert_same(model, w0)
    assert not awp.is_perturbed
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_nonfinite_gradient_skip_and_raise():
    model, awp, x, y = _setup()
    w0 = snapshot(model)
    bad = lambda: F.cross_entropy(model(x), y) * float("inf")
    with pytest.warns(RuntimeWarning, match="not finite.*1 skipped so far"):
        assert awp.perturb(bad) is False
    assert_same(model, w0)
    assert awp.skipped_steps == 1 and not awp.is_perturbed
    awp2 = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="not finite"):
        awp2.perturb(bad)
    assert_same(model, w0)


def test_exception_inside_perturbed_region_restores_exactly():
    model, awp, x, y = _setup()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyError):
        with awp.perturbed(lambda: F.cross_entropy(model(x), y)):
            assert awp.is_perturbed
            F.cross_entropy(model(x), y).backward()
            raise KeyError("boom")
    for n, p in model.named_parameters():  # the user's own forward did move BN statistics
        assert torch.equal(p.detach(), w0[n]), n
    # exit without step(): restored too (e.g. a GradScaler-skipped step)
    with awp.perturbed(lambda: F.cross_entropy(model(x), y)):
        pass
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n]), n


def test_exception_in_base_step_restores_exactly():
    model, awp, x, y = _setup()
    w0 = snapshot(model)

    def failing_step(*a, **k):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # half-done update
        raise RuntimeError("optimizer exploded")
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    awp.optimizer.step = failing_step
    with pytest.raises(RuntimeError, match="exploded"):
        awp.step()
    # the perturbation is gone and the weights are what they were before perturb()
    perturbed = set(awp.perturbed_parameters)
    for n, p in model.named_parameters():
        if n in perturbed:
            assert torch.equal(p.detach(), w0[n]), n


def test_parameter_replaced_or_resized_between_perturb_and_restore():
    model, awp, x, y = _setup()
    w0 = snapshot(model)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    model[7].weight = nn.Parameter(torch.randn(5, 128))
    with pytest.raises(RuntimeError, match=r"\['7.weight'\] were replaced or resized"):
        awp.step()
    for n in ("0.weight", "3.weight"):
        assert torch.equal(model.state_dict()[n], w0[n])

    model, awp, x, y = _setup()
    w0 = snapshot(model)
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    model[0].weight.data = torch.randn(8, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"\['0.weight'\] were replaced or resized"):
        awp.restore()
    for n in ("3.weight", "7.weight"):
        assert torch.equal(model.state_dict()[n], w0[n])


def test_channels_last_model():
    torch.manual_seed(9)
    model = small_net().train()
    x, y = batch()
    ref = copy.deepcopy(model)
    model = model.to(memory_format=torch.channels_last)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, backend="foreach")
    awp_ref = AWP(torch.optim.SGD(ref.parameters(), lr=0.1), ref, gamma=0.01, backend="reference")
    awp.perturb(lambda: F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y))
    awp_ref.perturb(lambda: F.cross_entropy(ref(x), y))
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), n
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_follows_model_conversion_after_construction():
    torch.manual_seed(10)
    model = small_net()
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
    model.double()  # new storage for the same Parameter objects
    x, y = batch(torch.float64)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert awp.perturb(lambda: F.cross_entropy(model(x), y))
    for n, p in model.named_parameters():
        if n in awp.perturbed_parameters:
            assert p.dtype == torch.float64
            assert abs((p.detach() - w0[n]).norm() / w0[n].norm() - 0.01) < 1e-12
    awp.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n])
    model[0].weight = nn.Parameter(torch.randn(8, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\[.0.weight.\] were replaced in the model by new Parameter objects"):
        awp.perturb(lambda: F.cross_entropy(model(x), y))


# ----------------------------------------------------------------------------- a new user's wrapper points
def test_selection_is_include_rule_and_optimizer_params():
    """Only what the optimizer trains is perturbed (the old code perturbed every conv weight)."""
    torch.manual_seed(11)
    model = small_net().train()
    x, y = batch()
    awp = AWP(torch.optim.SGD(model[7].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), model, gamma=0.01)
    assert awp.perturbed_parameters == ["7.weight"]
    w0 = snapshot(model)
    _train(model, awp, 2, seed=3)
    for n in ("0.weight", "3.weight", "3.bias"):
        assert torch.equal(model.state_dict()[n], w0[n]), n      # never trained, never touched
    assert not torch.equal(model.state_dict()["7.weight"], w0["7.weight"])


def test_optimizer_of_another_model_is_refused():
    model, other = small_net(), small_net()
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        AWP(torch.optim.SGD(other.parameters(), lr=0.1), model)


def test_requires_grad_changes_after_wrapping_are_followed():
    torch.manual_seed(12)
    model = small_net(torch.float64).train()
    x, y = batch(torch.float64)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
    model[0].weight.requires_grad_(False)               # frozen after wrapping
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert awp.perturb(lambda: F.cross_entropy(model(x), y))   # old code: torch's raw error
    assert torch.equal(model[0].weight, w0["0.weight"])
    assert awp.perturbed_parameters == ["3.weight", "7.weight"]
    model[0].weight.requires_grad_(True)                # unfrozen inside the region: still restored
    awp.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n]), n
    assert awp.perturb(lambda: F.cross_entropy(model(x), y))   # now followed: perturbed again
    rel = (model[0].weight - w0["0.weight"]).norm() / w0["0.weight"].norm()
    assert abs(rel.item() - 0.01) < 1e-12               # old code left it silently unperturbed
    awp.restore()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.warns(UserWarning, match="no selected parameter requires grad"):
        assert awp.perturb(lambda: F.cross_entropy(model(x), y)) is False


def test_load_state_dict_assign_true_after_wrapping_says_what_happened():
    model, awp, x, y = _setup()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)              # new Parameter objects in the model
    w0 = snapshot(model)
    calls = []
    with pytest.raises(RuntimeError, match=r"replaced in the model by new Parameter objects.*assign=True"):
        awp.perturb(lambda: (calls.append(1), F.cross_entropy(model(x), y))[1])
    assert calls == []                                  # raised before the ascent pass
    assert_same(model, w0) and not awp.is_perturbed


def test_plain_steps_warn_once():
    model, awp, x, y = _setup()
    model(x).sum().backward()
    with pytest.warns(UserWarning, match=r"step\(closure\) without perturb\(\).*not SAM's"):
        awp.step(lambda: F.cross_entropy(model(x), y))
    with pytest.warns(UserWarning, match=r"step\(\) without perturb\(\) since the last step"):
        awp.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        awp.step()                                      # once only
        awp.perturb(lambda: F.cross_entropy(model(x), y))
        awp.step()
        awp.set_gamma(0.0)                              # a warm-up: perturb() returns False, no warning
        assert awp.perturb(lambda: F.cross_entropy(model(x), y)) is False
        awp.step()


def test_state_dict_loads_into_the_plain_base_optimizer():
    model, awp, x, y = _setup()
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, gamma=0.01)
    _train(model, awp, 2, seed=4)
    sd = copy.deepcopy(awp.state_dict())
    plain = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    plain.load_state_dict(sd)                           # old code: KeyError: 'param_groups'
    assert plain.param_groups[0]["lr"] == 0.05
    for p in model.parameters():
        assert torch.equal(plain.state[p]["momentum_buffer"], awp.state[p]["momentum_buffer"])
    assert sd["awpfast"]["rule"] == "AWP" and sd["awpfast"]["perturb_count"] == 2


def test_checkpoint_settings_mismatch_warns_and_other_layouts_are_refused():
    model, awp, x, y = _setup()
    _train(model, awp, 1, seed=5)
    sd = copy.deepcopy(awp.state_dict())
    other = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, steps=3, restore="before_step")
    with pytest.warns(UserWarning, match=r"saved with restore='after_step', steps=1.*restore='before_step', steps=3"):
        other.load_state_dict(sd)
    assert other.steps == 3 and other.perturb_count == 1
    same = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.02)  # gammas live in param groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)
    assert same.param_groups[0]["awp_gamma"] == 0.01
    nested = {"base_optimizer": {"state": sd["state"], "param_groups": sd["param_groups"]}, "awp": {}}
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        same.load_state_dict(nested)  # a layout awpfast no longer writes nor reads
    assert same.perturb_count == 1  # unchanged


@pytest.mark.parametrize("bad", ["0.01", None, True, float("nan"), -1.0, [0.01]])
def test_gamma_must_be_a_number(bad):
    model = small_net()
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=bad)
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        awp.set_gamma(bad)
    awp.param_groups[0]["awp_gamma"] = bad
    x, y = batch()
    with pytest.raises(ValueError, match="awp_gamma in a param group must be a finite number"):
        awp.perturb(lambda: F.cross_entropy(model(x), y))


# ----------------------------------------------------------------------------- micro-batched ascent
@pytest.mark.parametrize("restore", ["after_step", "before_step"])
def test_micro_batches_equal_one_big_batch(restore):
    torch.manual_seed(13)
    model = small_net(torch.float64).eval()            # eval: BN identical for halves and the whole batch
    x, y = batch(torch.float64, n=8)
    results = []
    for mode in ("one", "accumulate", "list"):
        m = copy.deepcopy(model)
        awp = AWP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), m, gamma=0.01,
                  restore=restore)
        halves = [lambda a=a, b=b: F.cross_entropy(m(a), b) / 2 for a, b in zip(x.chunk(2), y.chunk(2))]
        if mode == "one":
            awp.perturb(lambda: F.cross_entropy(m(x), y))
        elif mode == "accumulate":
            for c in halves:
                awp.accumulate(c)
            assert not awp.is_perturbed
            awp.perturb()
        else:
            awp.perturb(halves)
        awp.zero_grad()
        F.cross_entropy(m(x), y).backward()
        awp.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert rel(a, b) < 1e-12


def rel(a, b):
    d = (a - b).norm() / b.norm() if b.norm() > 0 else (a - b).norm()
    return float("inf") if not torch.isfinite(a).all() else d.item()


def test_micro_batch_multistep_and_misuse():
    torch.manual_seed(14)
    model = small_net(torch.float64).eval()
    x, y = batch(torch.float64, n=8)
    halves = [lambda a=a, b=b: F.cross_entropy(model(a), b) / 2 for a, b in zip(x.chunk(2), y.chunk(2))]
    ref = copy.deepcopy(model)
    a1 = AWP(torch.optim.SGD(ref.parameters(), lr=0.1), ref, gamma=0.01, steps=3)
    a1.perturb(lambda: F.cross_entropy(ref(x), y))
    a2 = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, steps=3)
    a2.perturb(halves)                                   # each ascent step re-runs both micro-batches
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel(p.detach(), q.detach()) < 1e-12
    a2.restore()
    a2.accumulate(halves[0])
    with pytest.raises(ValueError, match="3 ascent steps.*perturb\\(\\[c1, c2"):
        a2.perturb()
    a2.accumulate(halves[0])
    with pytest.raises(RuntimeError, match="after accumulate\\(\\)"):
        a2.perturb(halves[0])
    with pytest.raises(TypeError, match="nothing was accumulated"):
        a2.perturb()
    with pytest.raises(TypeError, match="needs a closure"):
        a2.perturb([1, 2])


def test_syncbatchnorm_stats_untouched_single_process():
    """SyncBatchNorm is a _BatchNorm: its running stats are frozen by the ascent pass too (with
    no process group it normalizes like BatchNorm; torch supports its synced path on GPUs only)."""
    torch.manual_seed(15)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(small_net()).train()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x, y = batch()
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01)
    assert awp.perturb(lambda: F.cross_entropy(model(x), y))
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n]), n


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_step_breaks_graph_in_awpfast_only_at_autograd_grad():
    """Every graph break Dynamo logs (not only those torch._dynamo.explain reports) inside
    awpfast's files: only at torch.autograd.grad (and the base optimizer's zero_grad, which torch
    marks as never traced). The old code also broke at a data-pointer comparison in perturb.py."""
    import logging
    import os
    import torch._dynamo.symbolic_convert as sc
    torch._dynamo.reset()
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    awp = AWP(torch.optim.SGD(model.parameters(), lr=0.1), model, gamma=0.01, backend="foreach")
    x, y = batch()

    def step(x, y):
        awp.perturb(lambda: F.cross_entropy(model(x), y))
        awp.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        awp.step()
        return loss

    step(x, y)                                           # eager warm-up (lazy backend import)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    torch._logging.set_logs(graph_breaks=True)
    sc.graph_break_log.addHandler(handler)
    try:
        torch.compile(step, backend="eager")(x, y)
    finally:
        sc.graph_break_log.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    pkg = os.path.dirname(awpfast.__file__)
    ours = [r for r in records if f"{pkg}{os.sep}" in r.split("\n")[0]]
    assert ours, "expected the torch.autograd.grad break to be logged"
    bad = [r.split("\n")[:5] for r in ours if "torch.autograd.grad" not in r and "Optimizer.zero_grad" not in r]
    assert not bad, bad
    assert not awp.is_perturbed and all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- load_state_dict refusals
def _stepped(opt_cls, model, **kw):
    awp = AWP(opt_cls(model.parameters(), lr=0.1, **kw), model, gamma=0.01)
    x, y = batch()
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.step()
    return awp


def _state(awp):
    return [{k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)} for st in awp.state.values()]


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "stepped"])
def test_load_state_dict_refuses_another_optimizer_type(fresh):
    """An Adam state dict into AWP(SGD) (and back) is refused at load time, one line, wrapper unchanged."""
    adam = _stepped(torch.optim.Adam, small_net()).optimizer.state_dict()
    sgd_model = small_net()
    awp = AWP(torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9), sgd_model) if fresh else \
        _stepped(torch.optim.SGD, sgd_model, momentum=0.9)
    before = _state(awp)
    with pytest.raises(ValueError, match=r"not a SGD one \(its param groups lack \['dampening', 'momentum', "
                                         r"'nesterov'\].*load a state dict saved from SGD") as e:
        awp.load_state_dict(adam)
    assert "\n" not in str(e.value)
    after = _state(awp)
    assert awp.param_groups[0]["lr"] == 0.1 and len(after) == len(before)
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(after, before))
    sgd = _stepped(torch.optim.SGD, small_net(), momentum=0.9).state_dict()
    m = small_net()
    with pytest.raises(ValueError, match="not a Adam one"):
        AWP(torch.optim.Adam(m.parameters(), lr=0.1), m).load_state_dict(sgd)


def test_load_state_dict_refuses_other_parameter_shapes():
    src = small_net()
    sd = _stepped(torch.optim.SGD, src, momentum=0.9).state_dict()
    k = max(sd["state"], key=lambda i: sd["state"][i]["momentum_buffer"].dim())
    sd["state"][k]["momentum_buffer"] = torch.zeros(*[s + 1 for s in sd["state"][k]["momentum_buffer"].shape])
    m = small_net()
    awp = AWP(torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9), m)
    with pytest.raises(ValueError, match="'momentum_buffer' of parameter .* has shape .* the parameter .*"
                                         "load it into the same architecture"):
        awp.load_state_dict(sd)
    assert awp.param_groups[0]["lr"] == 0.5 and not awp.state  # unchanged


def test_load_state_dict_still_accepts_its_layouts():
    """state_dict() output, a plain base state dict and an SGD state dict without the flags that
    newer torch versions added to the param groups."""
    src = small_net()
    a = _stepped(torch.optim.SGD, src, momentum=0.9)
    full = a.state_dict()
    plain = a.optimizer.state_dict()
    older = copy.deepcopy(plain)
    for g in older["param_groups"]:
        for k in ("fused", "differentiable", "foreach", "maximize"):
            g.pop(k, None)
    for sd in (full, plain, older):
        m = small_net()
        b = AWP(torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), m)
        b.load_state_dict(sd)
        assert b.param_groups[0]["lr"] == 0.1
