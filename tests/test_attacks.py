"""PGD / TRADES attacks: agreement with hand-written torchattacks-style loops, constraints,
no parameter gradients, mode handling."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from awpfast.attacks import PGD, TRADESAttack, attack_mode, pgd
from awpfast.models.small_cnn import SmallCNN

BACKENDS = ["reference", "foreach"]


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = SmallCNN(num_classes=10, width=8, hidden=32).to(dtype)
    # non-trivial BN statistics so eval and train mode differ
    with torch.no_grad():
        m.train()
        for _ in range(2):
            m(torch.rand(16, 3, 12, 12, dtype=dtype))
    return m.eval()


def _batch(n=6, size=12, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


# torchattacks-style loops written from their documented algorithm (not imported)
def _hand_pgd_linf(model, images, labels, eps, alpha, steps):
    adv = images.clone().detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = nn.CrossEntropyLoss()(model(adv), labels)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


def _hand_pgd_l2(model, images, labels, eps, alpha, steps):
    b = images.shape[0]
    adv = images.clone().detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = nn.CrossEntropyLoss()(model(adv), labels)
        grad = torch.autograd.grad(cost, adv)[0]
        gn = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
        grad = grad / gn.view(b, 1, 1, 1)
        adv = adv.detach() + alpha * grad
        delta = adv - images
        dn = torch.norm(delta.view(b, -1), p=2, dim=1)
        factor = torch.min(eps / dn, torch.ones_like(dn))
        delta = delta * factor.view(-1, 1, 1, 1)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_linf_matches_torchattacks_style(backend, seed):
    model = _model(seed)
    x, y = _batch(seed=seed + 10)
    eps, alpha, steps = 8 / 255, 2 / 255, 7
    ours = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False, backend=backend)(x, y)
    ref = _hand_pgd_linf(model, x, y, eps, alpha, steps)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert not torch.equal(ours, x)  # it moved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_l2_matches_torchattacks_style(backend, seed):
    model = _model(seed)
    x, y = _batch(seed=seed + 20)
    eps, alpha, steps = 0.5, 0.1, 8
    ours = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False, norm="L2", backend=backend)(x, y)
    ref = _hand_pgd_l2(model, x, y, eps, alpha, steps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert not torch.equal(ours, x)


def test_pgd_float64_matches_exactly():
    model = _model(3, torch.float64)
    x, y = _batch(seed=5, dtype=torch.float64)
    ours = PGD(model, eps=0.03, alpha=0.01, steps=5, random_start=False, backend="reference")(x, y)
    ref = _hand_pgd_linf(model, x, y, 0.03, 0.01, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_pgd_constraints_and_loss_increase(norm, eps):
    model = _model(4)
    x, y = _batch(n=16, seed=7)
    x_adv = PGD(model, eps=eps, alpha=eps / 4, steps=10, norm=norm)(x, y)
    assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    d = (x_adv - x).reshape(len(x), -1)
    if norm == "Linf":
        assert float(d.abs().max()) <= eps + 1e-6
        assert float(d.abs().max()) > eps / 2
    else:
        assert float(d.norm(dim=1).max()) <= eps + 1e-5
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_random_start_in_ball(norm):
    x, _ = _batch(n=32, seed=8)
    eps = 8 / 255 if norm == "Linf" else 0.5
    x0 = PGD(nn.Identity(), eps=eps, norm=norm).init(x)
    d = (x0 - x).reshape(len(x), -1)
    assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0
    if norm == "Linf":
        assert float(d.abs().max()) <= eps + 1e-7
    else:
        assert float(d.norm(dim=1).max()) <= eps + 1e-6
    assert float(d.abs().max()) > 0


def test_no_parameter_gradients_computed_or_accumulated():
    model = _model(5)
    x, y = _batch(seed=9)
    fired = []
    hooks = [p.register_hook(lambda g, n=n: fired.append(n)) for n, p in model.named_parameters()]
    pre = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = pre[n].clone()
    PGD(model, steps=3)(x, y)
    TRADESAttack(model, steps=3)(x)
    for h in hooks:
        h.remove()
    assert fired == []  # no parameter gradient was even computed
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, pre[n])
    # and with no .grad at all, none appears
    model.zero_grad(set_to_none=True)
    PGD(model, steps=2)(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_output_detached_and_input_untouched():
    model = _model(6)
    x, y = _batch(seed=11)
    x.requires_grad_(True)
    x_copy = x.detach().clone()
    out = PGD(model, steps=2)(x, y)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(x.detach(), x_copy) and x.grad is None
    out2 = TRADESAttack(model, steps=2)(x)
    assert not out2.requires_grad and out2.grad_fn is None


def _record_modes(model):
    seen = []
    h = model.features[0][1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    return seen, h


@pytest.mark.parametrize("cls", [PGD, TRADESAttack])
def test_mode_restored_and_eval_during_attack(cls):
    model = _model(7).train()
    model.features[1][1].eval()  # a caller-frozen BN stays frozen
    x, y = _batch(seed=12)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    seen, h = _record_modes(model)
    cls(model, steps=2)(x, y)
    h.remove()
    assert seen and not any(seen)  # eval during the attack
    assert model.training and not model.features[1][1].training and model.features[0][1].training
    for k, v in model.state_dict().items():  # BN running stats untouched in eval mode
        assert torch.equal(v, stats[k]), k
    model.eval()
    cls(model, steps=1)(x, y)
    assert not model.training


def test_bn_train_option():
    model = _model(8).eval()
    x, y = _batch(seed=13)
    seen, h = _record_modes(model)
    PGD(model, steps=2, bn_train=True)(x, y)
    h.remove()
    assert seen and all(seen)
    assert not model.training


def test_mode_restored_on_exception():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    m = nn.Sequential(nn.Identity(), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(m, steps=1)(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    assert m.training and m[0].training
    with attack_mode(m, False):
        assert not m[1].training
    assert m[1].training


def _hand_trades(model, x, eps, alpha, steps):
    model.eval()
    p_nat = F.softmax(model(x), dim=1).detach()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(model(x_adv), dim=1), p_nat)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("backend", BACKENDS)
def test_trades_attack_matches_reference_loop(backend):
    model = _model(9)
    x, y = _batch(n=8, seed=14)
    eps, alpha = 8 / 255, 2 / 255
    torch.manual_seed(123)
    ours = TRADESAttack(model, eps=eps, alpha=alpha, steps=5, backend=backend)(x)
    torch.manual_seed(123)
    ref = _hand_trades(model, x, eps, alpha, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert float((ours - x).abs().max()) <= eps + 1e-6
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(ours), 1), p, reduction="sum")
        x_rand = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        kl_rand = F.kl_div(F.log_softmax(model(x_rand), 1), p, reduction="sum")
    assert kl_adv > 2 * kl_rand


def test_functional_and_validation():
    model = _model(10)
    x, y = _batch(seed=15)
    torch.manual_seed(0)
    a = pgd(model, x, y, steps=2)
    torch.manual_seed(0)
    b = PGD(model, steps=2)(x, y)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="norm"):
        PGD(model, norm="L1")
    with pytest.raises(ValueError):
        PGD(model, eps=-1)
    with pytest.raises(ValueError, match="labels"):
        PGD(model)(x, y[:2])
    with pytest.raises(TypeError):
        PGD(model)(torch.zeros(2, 3, 8, 8, dtype=torch.long), y[:2])
    assert torch.equal(PGD(model, steps=0, random_start=False)(x, y), x)


# ----------------------------------------------------------------------------- a new user's attack checks
@pytest.mark.parametrize("cls", [PGD, TRADESAttack])
def test_inputs_outside_unit_box_are_refused(cls):
    model = _model()
    x, y = _batch()
    normalized = (x - 0.5) / 0.25  # a normalized batch: values in [-2, 2]
    with pytest.raises(ValueError, match=r"\[0, 1\].*inside the model"):
        cls(model, steps=2)(normalized, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cls(model, steps=0, random_start=False)(x + 1.5, y)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cls(model, steps=1)(nan, y)
    # deliberate: check_range=False lets it through (no host sync)
    out = cls(model, steps=1, check_range=False)(normalized, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_zero_steps_stays_in_the_box_and_ball():
    model = _model()
    x, y = _batch()
    for rs in (False, True):
        out = PGD(model, eps=8 / 255, steps=0, random_start=rs)(x, y)
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert float((out - x).abs().max()) <= 8 / 255 + 1e-7
        if not rs:
            assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


class _IgnoresInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return self.w.expand(x.shape[0], 10)


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 12 * 12, 10)

    def forward(self, x):
        with torch.no_grad():
            return self.lin(x.flatten(1))


@pytest.mark.parametrize("cls", [PGD, TRADESAttack])
def test_model_that_ignores_its_input_gets_a_clear_error(cls):
    x, y = _batch()
    with pytest.raises(ValueError, match="does not depend on its input"):
        cls(_IgnoresInput(), steps=1)(x, y)
    with pytest.raises(ValueError, match="does not depend on the input"):
        cls(_NoGrad(), steps=1)(x, y)


@pytest.mark.parametrize("cls", [PGD, TRADESAttack])
@pytest.mark.parametrize("name,value", [("eps", float("nan")), ("eps", float("inf")), ("eps", -0.1),
                                        ("alpha", float("nan")), ("alpha", -1.0), ("eps", "0.1")])
def test_non_finite_or_negative_sizes_refused_by_name(cls, name, value):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=f"{cls.__name__}: {name} must be a finite number >= 0") as e:
        cls(model, **{name: value})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        cls(model, steps=-1)
