"""SAM / ASAM and Box AWP on the engine, against the published code's formulas in float64.

The comparisons are written from the formulas as davda54/sam (``first_step``, plain and
adaptive), SamsungLabs/ASAM (``ascent_step``) and the Kaggle "AWP" class (``_save``,
``_attack_step``, ``_restore``) compute them, per parameter, in plain PyTorch.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import awpfast
import awpfast.ops as ops
from awpfast import SAM, BoxAWP

BACKENDS = [b for b in ops.BACKENDS if b in ops.available_backends()]
TOL = 1e-10


class ConvNet(nn.Module):
    """Conv + BatchNorm + biases + a linear head: weights, 1-D weights and biases."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, bias=False)
        self.fc = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.conv2(h)).flatten(1))


class TinyLM(nn.Module):
    """Transformer-shaped: embedding, LayerNorm (1-D weight), linear layers with biases, and a
    layer whose gradient is exactly zero (its output is multiplied by 0)."""

    def __init__(self, vocab=13, d=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.dead = nn.Linear(d, classes)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.norm(self.embed(ids)))).mean(1)
        return self.head(h) + 0.0 * self.dead(h)


def _data(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _tokens(seed, n=5, t=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (n, t), generator=g), torch.randint(0, 3, (n,), generator=g)


def _convnet(seed=0):
    torch.manual_seed(seed)
    return ConvNet().double()


def _lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM().double()


def _max_rel(a_params, b_params):
    worst = 0.0
    for a, b in zip(a_params, b_params):
        a, b = a.detach().double(), b.detach().double()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return float("inf")
        den = b.norm().item()
        worst = max(worst, (a - b).norm().item() / (den if den > 0 else 1.0))
    return worst


def _two_groups(model, lr=0.05):
    """Two param groups (the second: conv2 and fc) with different rhos."""
    second = {id(p) for p in (*model.conv2.parameters(), *model.fc.parameters())}
    g1 = [p for p in model.parameters() if id(p) not in second]
    g2 = [p for p in model.parameters() if id(p) in second]
    return torch.optim.SGD([{"params": g1}, {"params": g2, "sam_rho": 0.2}], lr=lr, momentum=0.9,
                           weight_decay=5e-4)


def _snapshot(store, model):
    store.setdefault("w", [p.detach().clone() for p in model.parameters()])


def _reference_step(ref, ref_opt, x, y, ascent):
    """One step of a published SAM loop on ``ref``: gradients at w, ``ascent()`` (the published
    first/ascent step) moves to w + e, gradients there, w restored, the base optimizer steps.
    Returns the weights at w + e."""
    F.cross_entropy(ref(x), y).backward()
    w_ref = [p.detach().clone() for p in ref.parameters()]
    ascent()
    perturbed_ref = [p.detach().clone() for p in ref.parameters()]
    ref_opt.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p, w in zip(ref.parameters(), w_ref):
            p.copy_(w)
    ref_opt.step()
    ref_opt.zero_grad()
    return perturbed_ref


# ----------------------------------------------------------------------------- published formulas
def davda54_first_step(model, groups, adaptive):
    """davda54/sam ``first_step``: one global norm of ``(|p| if adaptive else 1) * grad``, then
    per group ``scale = rho / (norm + 1e-12)``, ``p += (p^2 if adaptive else 1) * grad * scale``.
    ``groups``: [(rho, [params])]; gradients in ``.grad``."""
    with torch.no_grad():
        norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2)
                                       for _, ps in groups for p in ps if p.grad is not None]), p=2)
        for rho, ps in groups:
            scale = rho / (norm + 1e-12)
            for p in ps:
                if p.grad is None:
                    continue
                p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p))


def samsung_asam_ascent_step(model, rho, eta):
    """SamsungLabs/ASAM ``ascent_step``: for parameters whose name has 'weight',
    ``T = |p| + eta``, ``grad *= T``; norm of all (scaled) gradients + 1e-16; then
    ``grad *= T`` again on those parameters and ``p += grad * rho / norm``."""
    with torch.no_grad():
        t_ws, wgrads = {}, []
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            if "weight" in n:
                t_ws[n] = p.abs() + eta
                p.grad.mul_(t_ws[n])
            wgrads.append(torch.norm(p.grad, p=2))
        wgrad_norm = torch.norm(torch.stack(wgrads), p=2) + 1.e-16
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            if "weight" in n:
                p.grad.mul_(t_ws[n])
            p.add_(p.grad * (rho / wgrad_norm))


class NotebookAWP:
    """The Kaggle "AWP" class's arithmetic: backup + box on the first call, then per tensor
    ``r = adv_lr * g / (||g|| + e) * (||w|| + e)``, ``w += r``, ``w = min(max(w, lo), hi)``,
    skipping ``||g|| == 0`` or NaN; restore by rebinding ``param.data``."""

    def __init__(self, model, adv_lr=1.0, adv_eps=0.2, adv_param="weight"):
        self.model, self.adv_lr, self.adv_eps, self.adv_param = model, adv_lr, adv_eps, adv_param
        self.backup, self.backup_eps = {}, {}

    def save(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                    grad_eps = self.adv_eps * param.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)

    def attack_step(self):
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                norm1 = torch.norm(param.grad)
                norm2 = torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    r_at = self.adv_lr * param.grad / (norm1 + e) * (norm2 + e)
                    param.data.add_(r_at)
                    param.data = torch.min(torch.max(param.data, self.backup_eps[name][0]),
                                           self.backup_eps[name][1])

    def restore(self):
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup, self.backup_eps = {}, {}

    def attack_backward(self, loss_fn, adv_step=1):
        self.save()
        for _ in range(adv_step):
            self.attack_step()
            adv_loss = loss_fn()
            self.model.zero_grad()
            adv_loss.backward()
        self.restore()


# ----------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("form", ["closure", "first_step"])
def test_sam_equals_davda54_first_step_and_step(adaptive, form):
    """Per-group rho, plain and adaptive (eta = 0), through the closure (BN stats frozen) and
    through first_step on .grad; then the base step from the restored w with the gradient at
    w + v, for three steps."""
    ours, ref = _convnet(), _convnet()
    opt = _two_groups(ours)
    sam = SAM(opt, ours, rho=0.05, adaptive=adaptive)
    ref_opt = _two_groups(ref)
    groups = [(0.05, ref_opt.param_groups[0]["params"]), (0.2, ref_opt.param_groups[1]["params"])]
    for step in range(3):
        x, y = _data(step)
        # reference: davda54's loop (train-mode BN normalizes with batch statistics, so the
        # running statistics, which the closure form leaves untouched, do not enter the gradients)
        perturbed_ref = _reference_step(ref, ref_opt, x, y, lambda: davda54_first_step(ref, groups, adaptive))

        if form == "closure":
            assert sam.perturb(lambda: F.cross_entropy(ours(x), y))
        else:
            F.cross_entropy(ours(x), y).backward()
            assert sam.first_step(zero_grad=True)
        assert _max_rel(ours.parameters(), perturbed_ref) < TOL
        F.cross_entropy(ours(x), y).backward()
        sam.second_step(zero_grad=True)
        assert _max_rel(ours.parameters(), ref.parameters()) < TOL, step


def test_sam_equals_samsung_asam_ascent_step():
    """SamsungLabs' ASAM: eta = 0.01, T only on parameters named '*weight*' (BN weight
    included, biases not), norm + 1e-16; awpfast restores w exactly before the step where ASAM
    subtracts eps (equal to rounding)."""
    ours, ref = _convnet(1), _convnet(1)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    asam = SAM(opt, ours, rho=0.5, adaptive=True, eta=0.01, adaptive_include=lambda n, p: "weight" in n,
               eps=1e-16)
    for step in range(3):
        x, y = _data(10 + step)
        perturbed_ref = _reference_step(ref, ref_opt, x, y, lambda: samsung_asam_ascent_step(ref, 0.5, 0.01))

        F.cross_entropy(ours(x), y).backward()
        asam.perturb()
        assert _max_rel(ours.parameters(), perturbed_ref) < TOL
        asam.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        asam.step()
        asam.zero_grad()
        assert _max_rel(ours.parameters(), ref.parameters()) < TOL, step


def test_sam_restores_w_exactly_before_the_base_step():
    model = _convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sam = SAM(opt, model, rho=0.1, adaptive=True, eta=0.01)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: _snapshot(seen, model))
    x, y = _data(3)
    w = [p.detach().clone() for p in model.parameters()]
    assert sam.perturb(lambda: F.cross_entropy(model(x), y))
    assert sam.is_perturbed and not all(torch.equal(a, b) for a, b in zip(model.parameters(), w))
    F.cross_entropy(model(x), y).backward()
    sam.step()
    assert all(torch.equal(a, b) for a, b in zip(seen["w"], w)), "the base step must see w bit for bit"
    assert not sam.is_perturbed


def test_sam_davda54_step_closure_form():
    """step(closure): the clean gradient from .grad (or from a first closure call when there is
    none), the closure at w + v, restore, base step; equal to first_step/second_step."""
    a, b = _convnet(2), _convnet(2)
    sa = SAM(torch.optim.SGD(a.parameters(), lr=0.1), a, rho=0.05)
    sb = SAM(torch.optim.SGD(b.parameters(), lr=0.1), b, rho=0.05)
    calls = []
    for step in range(2):
        x, y = _data(20 + step)

        def closure():
            calls.append(step)
            loss = F.cross_entropy(a(x), y)
            loss.backward()
            return loss
        if step == 0:
            F.cross_entropy(a(x), y).backward()  # davda54's usage: the first backward by hand
        loss = sa.step(closure)  # step 1: no .grad (zeroed below) -> the closure runs twice
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
        sa.zero_grad()
        F.cross_entropy(b(x), y).backward()
        sb.first_step(zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        sb.second_step(zero_grad=True)
        assert _max_rel(a.parameters(), b.parameters()) < TOL
    assert calls == [0, 1, 1]
    # an exception inside the closure at w + v restores w exactly
    w = [p.detach().clone() for p in a.parameters()]
    x, y = _data(30)
    F.cross_entropy(a(x), y).backward()

    def bad():
        raise KeyError("boom")
    with pytest.raises(KeyError):
        sa.step(bad)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), w)) and not sa.is_perturbed


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_all_backends_agree(adaptive):
    results = {}
    for be in BACKENDS:
        model = _convnet(4)
        sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1, adaptive=adaptive, eta=0.01,
                  backend=be)
        x, y = _data(5)
        sam.perturb(lambda: F.cross_entropy(model(x), y))
        results[be] = [p.detach().clone() for p in model.parameters()]
    ref = results["reference"]
    for be, ps in results.items():
        assert _max_rel(ps, ref) < 1e-12, be


def test_sam_rho_zero_nonfinite_and_checkpoint():
    model = _convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sam = SAM(opt, model, rho=0.0)
    x, y = _data(6)
    calls = []
    assert sam.perturb(lambda: calls.append(1) or F.cross_entropy(model(x), y)) is False
    assert calls == [] and sam.perturb_count == 0     # rho 0: no ascent pass at all
    sam.step()
    sam.set_rho(0.05)
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert sam.perturb(lambda: F.cross_entropy(model(x), y) * float("nan")) is False
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w)) and sam.skipped_steps == 1
    sam.perturb(lambda: F.cross_entropy(model(x), y))
    F.cross_entropy(model(x), y).backward()
    sam.step()
    sd = sam.state_dict()
    assert sd["awpfast"]["rule"] == "SAM" and sd["param_groups"][0]["sam_rho"] == 0.05
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict({k: v for k, v in sd.items() if k != "awpfast"})  # loadable by the base class
    other = _convnet()
    sam2 = SAM(torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), other, rho=0.3)
    sam2.load_state_dict(copy.deepcopy(sd))
    assert sam2.param_groups[0]["sam_rho"] == 0.05 and sam2.perturb_count == 1 and sam2.skipped_steps == 1
    with pytest.warns(UserWarning, match="adaptive=False"):
        SAM(torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), other, adaptive=True).load_state_dict(sd)


def test_sam_errors():
    model = _convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM(opt, model, rho=-1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        SAM(opt, model, eps=0)
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        SAM(opt, model, adaptive="yes")
    sam = SAM(opt, model)
    with pytest.raises(ValueError, match="no selected parameter has a gradient"):
        sam.perturb()
    assert not sam.is_perturbed


# ----------------------------------------------------------------------------- Box AWP
def _lm_loss(model, ids, y):
    return F.cross_entropy(model(ids), y)


@pytest.mark.parametrize("adv_step", [1, 2])
def test_box_awp_equals_the_notebook(adv_step):
    """The notebook's training step (clean backward, attack_backward with zero_grad + adversarial
    backward, restore, optimizer.step) against BoxAWP's, float64, four steps; with adv_step=2 the
    second step's direction is the gradient at the perturbed weights (``later=``)."""
    ours, ref = _lm(), _lm()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    box = BoxAWP(opt, ours, adv_lr=0.5, adv_eps=0.05, steps=adv_step)
    nb = NotebookAWP(ref, adv_lr=0.5, adv_eps=0.05)
    assert box.perturbed_parameters == ["embed.weight", "norm.weight", "proj.weight", "dead.weight",
                                        "head.weight"]   # 'weight' in the name, 1-D included
    for step in range(4):
        ids, y = _tokens(step)
        _lm_loss(ref, ids, y).backward()
        if adv_step == 1:  # the perturbed weights after one attack step, before the adversarial pass
            nb.save()
            nb.attack_step()
            perturbed_ref = [p.detach().clone() for p in ref.parameters()]
            nb.restore()
        nb.attack_backward(lambda: _lm_loss(ref, ids, y), adv_step)
        ref_opt.step()
        ref_opt.zero_grad()

        _lm_loss(ours, ids, y).backward()
        dead = ours.dead.weight.detach().clone()
        assert box.perturb(later=(lambda: _lm_loss(ours, ids, y)) if adv_step > 1 else None)
        if adv_step == 1:
            assert _max_rel(ours.parameters(), perturbed_ref) < TOL
        assert torch.equal(ours.dead.weight, dead), "a zero-gradient tensor is not perturbed"
        box.zero_grad()
        _lm_loss(ours, ids, y).backward()
        box.step()
        box.zero_grad()
        assert _max_rel(ours.parameters(), ref.parameters()) < TOL, step
    assert box.steps_taken == 4 and box.perturb_count == 4


def test_box_awp_box_binds_and_restore_is_exact():
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    box = BoxAWP(opt, model, adv_lr=1.0, adv_eps=0.01)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: _snapshot(seen, model))
    ids, y = _tokens(1)
    _lm_loss(model, ids, y).backward()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert box.perturb()
    for n, p in model.named_parameters():
        if n in box.perturbed_parameters and n != "dead.weight":
            dev = (p - w[n]).abs()
            assert torch.all(dev <= 0.01 * w[n].abs() * (1 + 1e-12))
            assert (dev >= 0.01 * w[n].abs() * (1 - 1e-12)).float().mean() > 0.5  # most elements on the box
        elif n not in box.perturbed_parameters:
            assert torch.equal(p, w[n]), n
    box.zero_grad()
    _lm_loss(model, ids, y).backward()
    box.step()
    assert all(torch.equal(a, b) for a, b in zip(seen["w"], w.values()))


def test_box_awp_skips_nonfinite_tensors_without_skipping_the_step():
    model = _lm()
    box = BoxAWP(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ids, y = _tokens(2)
    _lm_loss(model, ids, y).backward()
    model.proj.weight.grad[0, 0] = float("inf")
    model.norm.weight.grad[1] = float("nan")
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # per-tensor skip: no whole-step warning
        assert box.perturb()
    assert torch.equal(model.proj.weight, w["proj.weight"]) and torch.equal(model.norm.weight, w["norm.weight"])
    assert not torch.equal(model.head.weight, w["head.weight"])
    dn = box.last_direction_norms
    assert math.isinf(float(dn[2])) and math.isnan(float(dn[1])) and box.skipped_steps == 0
    box.restore()
    assert all(torch.equal(p, w[n]) for n, p in model.named_parameters())


def test_box_awp_closure_gives_the_direction_and_grad_is_untouched():
    a, b = _lm(3), _lm(3)
    ba = BoxAWP(torch.optim.SGD(a.parameters(), lr=0.1), a, adv_lr=0.3, adv_eps=0.1)
    bb = BoxAWP(torch.optim.SGD(b.parameters(), lr=0.1), b, adv_lr=0.3, adv_eps=0.1)
    ids, y = _tokens(4)
    _lm_loss(a, ids, y).backward()
    ba.perturb()
    ids2, y2 = _tokens(5)
    _lm_loss(b, ids2, y2).backward()          # some other gradient in .grad
    g = [p.grad.clone() for p in b.parameters()]
    bb.perturb(lambda: _lm_loss(b, ids, y))   # the closure's gradient wins
    assert all(torch.equal(p.grad, q) for p, q in zip(b.parameters(), g))
    assert _max_rel(a.parameters(), b.parameters()) < 1e-12


def test_box_awp_gating_start_enable_disable_and_checkpoint():
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    box = BoxAWP(opt, model, start=2)
    results = []
    for step in range(4):
        ids, y = _tokens(step)
        _lm_loss(model, ids, y).backward()
        on = box.perturb()
        results.append(on)
        if on:
            box.zero_grad()
            _lm_loss(model, ids, y).backward()
        box.step()
        box.zero_grad()
    assert results == [False, False, True, True] and box.steps_taken == 4
    box.disable()
    ids, y = _tokens(9)
    _lm_loss(model, ids, y).backward()
    assert box.perturb() is False and not box.enabled
    box.step()
    sd = box.state_dict()
    other = _lm()
    box2 = BoxAWP(torch.optim.SGD(other.parameters(), lr=0.1), other, start=2)
    box2.load_state_dict(sd)
    assert box2.steps_taken == 5 and box2.enabled is False
    box2.enable()
    assert box2.enabled
    box.adv_lr = 0.0
    box.enable()
    _lm_loss(model, ids, y).backward()
    assert box.perturb() is False  # adv_lr 0: off, no pass


def test_box_awp_all_backends_agree():
    results = {}
    for be in BACKENDS:
        model = _lm(6)
        box = BoxAWP(torch.optim.SGD(model.parameters(), lr=0.1), model, adv_lr=0.7, adv_eps=0.05, steps=3,
                     backend=be)
        ids, y = _tokens(7)
        box.perturb(lambda: _lm_loss(model, ids, y))
        results[be] = [p.detach().clone() for p in model.parameters()]
    ref = results["reference"]
    for be, ps in results.items():
        assert _max_rel(ps, ref) < 1e-12, be


def test_box_awp_errors():
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="adv_eps must be a finite number >= 0"):
        BoxAWP(opt, model, adv_eps=-0.1)
    with pytest.raises(ValueError, match="start must be an integer"):
        BoxAWP(opt, model, start=1.5)
    with pytest.raises(ValueError, match="steps must be an integer"):
        BoxAWP(opt, model, steps=0)
    box = BoxAWP(opt, model, steps=2)
    ids, y = _tokens(0)
    _lm_loss(model, ids, y).backward()
    with pytest.raises(ValueError, match=r"perturb\(later=lambda"):
        box.perturb()
    with pytest.raises(TypeError, match="later must be a closure"):
        box.perturb(later=3)
    assert not box.is_perturbed


def test_exports():
    assert awpfast.SAM is SAM and awpfast.BoxAWP is BoxAWP
    assert issubclass(SAM, awpfast.WeightPerturbation) and issubclass(BoxAWP, awpfast.WeightPerturbation)
