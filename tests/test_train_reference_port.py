"""Trajectory fidelity: awpfast's public API against a port of the reference AWP training loop.

The port is written from ``design.md`` section 1 (Wu et al. 2020): a *proxy* model receives a
state-dict copy of the model, takes one plain SGD step on ``-loss``, the per-layer difference
``diff_l = ||w_l|| / (||w_proxy_l - w_l|| + 1e-20) * (w_proxy_l - w_l)`` (layers with ``ndim > 1``
and ``weight`` in the name) is added with coefficient ``gamma``, the base optimizer steps at
``w + v`` and the same ``gamma * diff`` is subtracted. Its attacks are written the reference way
(a ``delta`` variable with box clamps for PGD; ``min/max`` projection for the TRADES attack).

awpfast runs the same steps through ``awpfast.AWP`` + ``awpfast.attacks`` + ``awpfast.losses``
(no proxy: the ascent gradient is taken on the model with BN statistics frozen). In float64 the
weights and the BatchNorm statistics must agree to 1e-10 after 3 AT-AWP and 3 TRADES-AWP steps,
with both sides seeded identically before each attack and feeding BatchNorm in the same order:

* ``order="awpfast"``: awpfast-train's loop. Eval-mode attack; at ``w + v`` AT runs one train-mode
  forward on ``x_adv``, TRADES two (clean, then adversarial).
* ``order="reference"``: the reference scripts. AT (Rice et al. / AWP ``train_cifar10``): the attack
  runs in **train** mode (its ``steps`` forwards plus the final loss forward that picks the best
  restart move the running statistics), then the forward at ``w + v``, then, after the restore, a
  clean train-mode forward for logging. TRADES-AWP: eval-mode attack, then at ``w + v`` the
  forwards adversarial, clean (KL target), clean (CE). awpfast reproduces these with
  ``PGD(bn_train=True)`` and extra forwards written in the test: what the
  ``--recipe at-awp-reference`` / ``trades-awp-reference`` presets do; ``test_train_recipes.py`` runs
  this port against ``awpfast.train``'s own loop under those presets.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import awpfast
from awpfast import ops
from awpfast.attacks import PGD, TRADESAttack
from awpfast.losses import ATLoss, TRADESLoss, trades_loss_from_logits
from awpfast.models.small_cnn import SmallCNN

EPS, STEP, ATTACK_STEPS = 8 / 255, 2 / 255, 3
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
N_STEPS, BATCH = 3, 8
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


# ============================================================================ the port
class ReferenceAWP:
    """The reference weight adversary: proxy model + state-dict copy + one plain SGD step."""

    def __init__(self, model: nn.Module, gamma: float, proxy_lr: float):
        self.model, self.gamma = model, gamma
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=proxy_lr)

    def calc(self, loss_of):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = -loss_of(self.proxy)
        self.proxy_opt.zero_grad()
        loss.backward()
        self.proxy_opt.step()
        moved = self.proxy.state_dict()
        diff = {}
        for key, w in self.model.state_dict().items():
            if w.dim() > 1 and "weight" in key:
                dw = moved[key] - w
                diff[key] = w.norm() / (dw.norm() + 1e-20) * dw
        return diff

    def add(self, diff, coeff):
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in diff:
                    p.add_(coeff * diff[name])


def ref_pgd(model, x, y, eps, alpha, steps, final_forward):
    """L-inf PGD the reference way: uniform delta, box-clamped delta; ``final_forward``: the loss
    forward on the final point that the reference uses to keep the best restart."""
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), -x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, [delta])
        d = torch.clamp(delta.detach() + alpha * torch.sign(g), -eps, eps)
        delta = torch.max(torch.min(d, 1 - x), -x)
    delta = delta.detach()
    if final_forward:
        with torch.no_grad():
            model(x + delta)
    return torch.clamp(x + delta, 0, 1)


def ref_trades_attack(model, x, eps, step, steps):
    """The TRADES inner maximization, the reference way (eval mode, KL summed, min/max projection).
    The start noise is drawn like awpfast's (``randn_like``: in the input dtype)."""
    model.eval()
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        (g,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step * torch.sign(g)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv


def port_at(model, batches, gamma, order, *, eps=EPS, alpha=STEP, steps=ATTACK_STEPS, reseed=True):
    """The reference AT(-AWP) loop on ``batches``. ``reseed``: seed the global RNG with ``100 + k``
    before the attack of step ``k`` (both sides do); ``False``: draw from the RNG as it is (to follow
    a training loop that seeds once)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    adv = ReferenceAWP(model, gamma, proxy_lr=0.01)
    xs = []
    for k, (x, y) in enumerate(batches):
        model.train(order == "reference")
        if reseed:
            torch.manual_seed(100 + k)
        x_adv = ref_pgd(model, x, y, eps, alpha, steps, final_forward=True)
        xs.append(x_adv)
        model.train()
        diff = adv.calc(lambda net: F.cross_entropy(net(x_adv), y))
        adv.add(diff, gamma)
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        adv.add(diff, -gamma)
        if order == "reference":
            model(x)  # the clean forward for logging, after the restore
    return xs


def port_trades(model, batches, gamma, order, beta=6.0, attack="reference", *, eps=EPS, alpha=STEP,
                steps=ATTACK_STEPS, reseed=True):
    """``attack="reference"``: the port's own float64 TRADES attack; ``"awpfast"``: awpfast's
    ``TRADESAttack`` built on the port's model (the same attack on both sides). ``reseed``: as
    :func:`port_at`."""
    theirs = TRADESAttack(model, eps=eps, alpha=alpha, steps=steps) if attack == "awpfast" else None
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    adv = ReferenceAWP(model, gamma, proxy_lr=LR)

    def objective(net, x, x_adv, y):
        if order == "reference":
            logits_adv = net(x_adv)
            robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(net(x), dim=1), reduction="batchmean")
            natural = F.cross_entropy(net(x), y)
        else:
            logits_nat = net(x)
            logits_adv = net(x_adv)
            robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
            natural = F.cross_entropy(logits_nat, y)
        return natural + beta * robust

    xs = []
    for k, (x, y) in enumerate(batches):
        if reseed:
            torch.manual_seed(100 + k)
        x_adv = theirs(x) if theirs is not None else ref_trades_attack(model, x, eps, alpha, steps)
        xs.append(x_adv)
        model.train()
        diff = adv.calc(lambda net: objective(net, x, x_adv, y))
        adv.add(diff, gamma)
        loss = objective(model, x, x_adv, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        adv.add(diff, -gamma)
    return xs


# ============================================================================ awpfast
def awpfast_at(model, batches, gamma, order, backend, restore="after_step", final_forward=True):
    awp = awpfast.AWP(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD), model,
                      gamma=gamma, backend=backend, restore=restore)
    attack = PGD(model, eps=EPS, alpha=STEP, steps=ATTACK_STEPS, bn_train=(order == "reference"), backend=backend)
    loss_fn = ATLoss()
    xs = []
    for k, (x, y) in enumerate(batches):
        model.train()
        torch.manual_seed(100 + k)
        x_adv = attack(x, y)
        xs.append(x_adv)
        if order == "reference" and final_forward:
            with torch.no_grad():
                model(x_adv)  # the reference attack's final loss forward (train mode)
        model.train()
        with awp.perturbed(lambda: loss_fn(model, x, x_adv, y)):
            awp.zero_grad()
            loss_fn(model, x, x_adv, y).backward()
            awp.step()
        if order == "reference":
            with torch.no_grad():
                model(x)  # the reference's clean logging forward
    return xs


def awpfast_trades(model, batches, gamma, order, backend, beta=6.0):
    awp = awpfast.AWP(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD), model,
                      gamma=gamma, backend=backend)
    attack = TRADESAttack(model, eps=EPS, alpha=STEP, steps=ATTACK_STEPS, backend=backend)
    loss_fn = TRADESLoss(beta)

    def reference_order_loss(x, x_adv, y):
        logits_adv = model(x_adv)
        logits_nat = model(x)
        with torch.no_grad():
            model(x)  # the reference's second clean forward (its CE), for the BN statistics
        return trades_loss_from_logits(logits_nat, logits_adv, y, beta)

    objective = loss_fn if order == "awpfast" else (lambda m, x, x_adv, y: reference_order_loss(x, x_adv, y))
    xs = []
    for k, (x, y) in enumerate(batches):
        torch.manual_seed(100 + k)
        x_adv = attack(x, y)
        xs.append(x_adv)
        model.train()
        with awp.perturbed(lambda: objective(model, x, x_adv, y)):
            awp.zero_grad()
            objective(model, x, x_adv, y).backward()
            awp.step()
    return xs


# ============================================================================ the tests
def _setup(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(width=4, hidden=16).double()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.rand(BATCH, 3, 8, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(N_STEPS)]
    return model, batches


def _max_diff(a: nn.Module, b: nn.Module) -> dict:
    sa, sb = a.state_dict(), b.state_dict()
    out = {}
    for k in sa:
        if sa[k].is_floating_point():
            out[k] = float((sa[k] - sb[k]).abs().max())
        else:
            out[k] = float((sa[k] != sb[k]).any())
    return out


def _check(ours, port, start, xs_ours, xs_port):
    diffs = _max_diff(ours, port)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{worst} differs by {diffs[worst]:.3g}"
    for a, b in zip(xs_ours, xs_port):
        assert float((a - b).abs().max()) <= TOL
    # not vacuous: the weights and the BN statistics moved
    moved = _max_diff(ours, start)
    assert max(v for k, v in moved.items() if "running_mean" in k) > 1e-3
    assert max(v for k, v in moved.items() if k.endswith("weight")) > 1e-3


def _backends():
    return [b for b in ("reference", "foreach", "native") if b in ops.available_backends()]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("order", ["awpfast", "reference"])
def test_at_awp_steps_equal_the_reference_port(order, backend):
    model, batches = _setup(0)
    start = copy.deepcopy(model)
    port, ours = copy.deepcopy(model), copy.deepcopy(model)
    xs_port = port_at(port, batches, 0.01, order)
    xs_ours = awpfast_at(ours, batches, 0.01, order, backend)
    _check(ours, port, start, xs_ours, xs_port)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("order", ["awpfast", "reference"])
def test_trades_awp_steps_equal_the_reference_port(order, backend):
    """The same attack on both sides (awpfast's ``TRADESAttack``, seeded identically): the AWP
    loop, the losses and the BN feeding order are what is compared."""
    model, batches = _setup(1)
    start = copy.deepcopy(model)
    port, ours = copy.deepcopy(model), copy.deepcopy(model)
    xs_port = port_trades(port, batches, 0.005, order, attack="awpfast")
    xs_ours = awpfast_trades(ours, batches, 0.005, order, backend)
    _check(ours, port, start, xs_ours, xs_port)


def test_trades_awp_steps_equal_the_port_with_the_reference_attack():
    model, batches = _setup(1)
    start = copy.deepcopy(model)
    port, ours = copy.deepcopy(model), copy.deepcopy(model)
    xs_port = port_trades(port, batches, 0.005, "reference", attack="reference")
    xs_ours = awpfast_trades(ours, batches, 0.005, "reference", None)
    _check(ours, port, start, xs_ours, xs_port)


def test_the_comparison_sees_awp_and_the_bn_order():
    """The 1e-10 agreement is not vacuous: without AWP, or with the other BN feeding order,
    awpfast lands far from the port."""
    model, batches = _setup(0)
    port = copy.deepcopy(model)
    port_at(port, batches, 0.01, "reference")
    no_awp = copy.deepcopy(model)
    awpfast_at(no_awp, batches, 0.0, "reference", None)
    assert max(_max_diff(no_awp, port).values()) > 1e-6
    other = copy.deepcopy(model)
    awpfast_at(other, batches, 0.01, "awpfast", None)  # eval-mode attack, no logging forward
    assert max(_max_diff(other, port).values()) > 1e-6
    # PGD(bn_train=True) alone feeds BN `steps` times; the reference attack one more time
    short = copy.deepcopy(model)
    awpfast_at(short, batches, 0.01, "reference", None, final_forward=False)
    assert max(v for k, v in _max_diff(short, port).items() if "running" in k) > 1e-6


def test_restore_before_step_differs_by_the_weight_decay_term_only():
    """The second restore order (exact restore from a backup, then step) is not the reference
    trajectory: its weight decay sees ``w`` instead of ``w + v``, a difference of about
    ``lr * wd * v`` per step. It must stay that small (and be visible, i.e. the orders differ)."""
    model, batches = _setup(2)
    port = copy.deepcopy(model)
    port_at(port, batches, 0.01, "awpfast")
    ours = copy.deepcopy(model)
    awpfast_at(ours, batches, 0.01, "awpfast", None, restore="before_step")
    worst = max(_max_diff(ours, port).values())
    assert 1e-12 < worst < 1e-5
