"""AT / TRADES / MART losses against their formulas written out per sample (float64)."""
import math

import pytest
import torch

from awpfast.losses import (ATLoss, MARTLoss, TRADESLoss, at_loss_from_logits, get_loss,
                            mart_loss_from_logits, trades_loss_from_logits)
from awpfast.models.small_cnn import SmallCNN


def _logits(seed, b=7, c=10):
    g = torch.Generator().manual_seed(seed)
    nat = torch.randn(b, c, generator=g, dtype=torch.float64) * 2
    adv = nat + torch.randn(b, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    return nat, adv, y


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_at_formula(seed):
    _, adv, y = _logits(seed)
    want = sum(-math.log(_softmax(adv[i].tolist())[y[i]]) for i in range(len(y))) / len(y)
    assert abs(float(at_loss_from_logits(adv, y)) - want) < 1e-6 * max(1, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades_formula(seed, beta):
    nat, adv, y = _logits(seed)
    b = len(y)
    ce = sum(-math.log(_softmax(nat[i].tolist())[y[i]]) for i in range(b)) / b
    kl = 0.0
    for i in range(b):
        p, q = _softmax(nat[i].tolist()), _softmax(adv[i].tolist())
        kl += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))  # KL(p_nat || p_adv)
    want = ce + beta * kl / b
    got = float(trades_loss_from_logits(nat, adv, y, beta))
    assert abs(got - want) < 1e-6 * max(1, abs(want))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("beta", [6.0, 2.5])
def test_mart_formula(seed, beta):
    nat, adv, y = _logits(seed)
    if seed == 3:  # make some adversarial argmax equal the label, some not
        adv[::2, y[::2]] += 10
    b = len(y)
    total = 0.0
    for i in range(b):
        pa, pn = _softmax(adv[i].tolist()), _softmax(nat[i].tolist())
        ce = -math.log(pa[y[i]])
        wrong = max((j for j in range(len(pa)) if j != y[i]), key=lambda j: pa[j])
        bce = ce - math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(pn[j] * (math.log(pn[j]) - math.log(pa[j] + 1e-12)) for j in range(len(pa)))
        total += bce + beta * kl * (1.0000001 - pn[y[i]])
    want = total / b
    got = float(mart_loss_from_logits(nat, adv, y, beta))
    assert abs(got - want) < 1e-6 * max(1, abs(want))


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN(width=8, hidden=16).eval()
    x = torch.rand(5, 3, 10, 10)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (5,))
    return m, x, x_adv, y


@pytest.mark.parametrize("method", ["at", "trades", "mart"])
def test_loss_objects_match_formulas_and_backprop(method):
    m, x, x_adv, y = _model_and_batch(3)
    fn = get_loss(method, beta=6.0)
    loss, logits_adv = fn(m, x, x_adv, y, return_logits=True)
    with torch.no_grad():
        ln, la = m(x), m(x_adv)
    want = {"at": lambda: at_loss_from_logits(la, y),
            "trades": lambda: trades_loss_from_logits(ln, la, y, 6.0),
            "mart": lambda: mart_loss_from_logits(ln, la, y, 6.0)}[method]()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits_adv.detach(), la)
    assert fn.needs_clean == (method != "at")
    assert fn.attack == ("trades" if method == "trades" else "pgd")
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_get_loss_errors_and_types():
    assert isinstance(get_loss("AT"), ATLoss)
    assert isinstance(get_loss("trades", 3.0), TRADESLoss) and get_loss("trades", 3.0).beta == 3.0
    assert isinstance(get_loss("mart"), MARTLoss)
    with pytest.raises(ValueError, match="at, trades, mart"):
        get_loss("pgd")


@pytest.mark.parametrize("method", ["at", "trades", "mart"])
def test_usable_as_awp_ascent_loss(method):
    awpfast = pytest.importorskip("awpfast")
    if not hasattr(awpfast, "AWP"):
        pytest.skip("awpfast.AWP (optim.py, the lead's) is not in the tree yet")
    m, x, x_adv, y = _model_and_batch(4)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    awp = awpfast.AWP(opt, m, gamma=0.01)
    fn = get_loss(method)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    bn0 = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    awp.perturb(lambda: fn(m, x, x_adv, y))
    moved = [n for n, p in m.named_parameters() if not torch.equal(p, w0[n])]
    assert moved and all("weight" in n and m.get_parameter(n).dim() > 1 for n in moved)
    for n in moved:  # ||v_l|| = gamma ||w_l||
        v = (m.get_parameter(n).detach().double() - w0[n].double()).norm()
        assert abs(float(v) / float(w0[n].double().norm()) - 0.01) < 1e-4
    for k, v in bn0.items():
        assert torch.equal(m.state_dict()[k], v), k
    awp.zero_grad()
    fn(m, x, x_adv, y).backward()
    awp.step()  # lr 0: weights come back to w
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), w0[n], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- precision
def _want_at(adv, y):
    return sum(-math.log(_softmax(adv[i].tolist())[y[i]]) for i in range(len(y))) / len(y)


def _want_trades(nat, adv, y, beta):
    b = len(y)
    ce = sum(-math.log(_softmax(nat[i].tolist())[y[i]]) for i in range(b)) / b
    kl = 0.0
    for i in range(b):
        p, q = _softmax(nat[i].tolist()), _softmax(adv[i].tolist())
        kl += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))
    return ce + beta * kl / b


@pytest.mark.parametrize("seed", [0, 5])
def test_float64_logits_give_float64_losses_to_1e12(seed):
    """The losses follow a float64 model in float64 (a float32 cast would miss by ~1e-7)."""
    nat, adv, y = _logits(seed, b=9, c=13)
    adv = adv * 7  # large logits: a float32 cast loses ~1e-7 relative here
    at = at_loss_from_logits(adv, y)
    tr = trades_loss_from_logits(nat, adv, y, 6.0)
    ma = mart_loss_from_logits(nat, adv, y, 6.0)
    assert at.dtype == tr.dtype == ma.dtype == torch.float64
    want = _want_at(adv, y)
    assert abs(float(at) - want) <= 1e-12 * max(1.0, abs(want))
    want = _want_trades(nat, adv, y, 6.0)
    assert abs(float(tr) - want) <= 1e-12 * max(1.0, abs(want))
    # MART against itself evaluated on float64 inputs rounded through float32: must differ,
    # i.e. the float64 path really is float64 (a cast inside would make them equal).
    ma32 = mart_loss_from_logits(nat.float().double(), adv.float().double(), y, 6.0)
    assert float(ma) != float(ma32) and abs(float(ma) - float(ma32)) < 1e-4


@pytest.mark.parametrize("dtype,want_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                              (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("method", ["at", "trades", "mart"])
def test_loss_dtype_is_input_dtype_or_float32(dtype, want_dtype, method):
    nat, adv, y = _logits(11, b=6, c=10)
    nat_d, adv_d = nat.to(dtype), adv.to(dtype)
    fn = {"at": lambda n, a: at_loss_from_logits(a, y),
          "trades": lambda n, a: trades_loss_from_logits(n, a, y, 6.0),
          "mart": lambda n, a: mart_loss_from_logits(n, a, y, 6.0)}[method]
    got = fn(nat_d, adv_d)
    assert got.dtype == want_dtype
    # half inputs are computed in float32: equal to the float64 formula on the rounded inputs
    ref = fn(nat_d.double(), adv_d.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(got) - float(ref)) <= tol * max(1.0, abs(float(ref)))


def test_mixed_dtypes_and_nan_propagate():
    nat, adv, y = _logits(2)
    got = trades_loss_from_logits(nat.float(), adv, y, 6.0)  # float32 and float64: computed in float64
    assert got.dtype == torch.float64
    bad = adv.clone()
    bad[0, 0] = float("nan")
    for v in (at_loss_from_logits(bad, y), trades_loss_from_logits(nat, bad, y),
              mart_loss_from_logits(nat, bad, y)):
        assert torch.isnan(v), "a NaN logit must not give a finite loss"


def test_float64_model_loss_and_gradient_stay_float64():
    torch.manual_seed(7)
    m = SmallCNN(width=4, hidden=8).double().train()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (4,))
    for method in ("at", "trades", "mart"):
        m.zero_grad()
        loss = get_loss(method)(m, x, x_adv, y)
        assert loss.dtype == torch.float64
        loss.backward()
        assert all(p.grad.dtype == torch.float64 for p in m.parameters())
