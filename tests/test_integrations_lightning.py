"""The PyTorch Lightning recipe of README.md / docs/family.md (manual optimization, the awpfast
wrapper returned from configure_optimizers), trained by Lightning's Trainer and compared with
the same steps written as a plain PyTorch loop. Skipped where Lightning is not installed (CI)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning", reason="PyTorch Lightning is an optional extra, not installed")

from awpfast import SAM, BoxAWP  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.norm(self.embed(ids))).mean(1))


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)


# --- the recipe (as in the docs) ----------------------------------------------------------
class LitBoxAWP(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.automatic_optimization = False          # the step has two backward passes

    def configure_optimizers(self):
        return BoxAWP(torch.optim.AdamW(self.parameters(), lr=1e-2), self, adv_lr=0.5, adv_eps=0.05)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        opt = self.optimizers()                      # Lightning's wrapper: precision, strategy
        awp = opt.optimizer                          # the awpfast.BoxAWP itself
        opt.zero_grad()
        loss = F.cross_entropy(self.net(ids), y)
        self.manual_backward(loss)                   # the clean gradient, in .grad
        with awp.perturbed():                        # w <- box step; w restored exactly on any exit
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.net(ids), y))
            opt.step()                               # restore w, then AdamW's step
        return loss


class LitSAM(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.automatic_optimization = False

    def configure_optimizers(self):
        return SAM(torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9), self, rho=0.05)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        opt = self.optimizers()
        sam = opt.optimizer
        with sam.perturbed(lambda: F.cross_entropy(self.net(ids), y)):
            opt.zero_grad()
            loss = F.cross_entropy(self.net(ids), y)
            self.manual_backward(loss)
            opt.step()
        return loss


def _fit(module, ids, y, steps):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=4, shuffle=False)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


def _plain_box(net, ids, y, steps):
    awp = BoxAWP(torch.optim.AdamW(net.parameters(), lr=1e-2), net, adv_lr=0.5, adv_eps=0.05)
    for s in range(steps):
        xb, yb = ids[4 * s:4 * s + 4], y[4 * s:4 * s + 4]
        awp.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        assert awp.perturb()
        awp.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        awp.step()
    return awp


def _plain_sam(net, ids, y, steps):
    sam = SAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, rho=0.05)
    for s in range(steps):
        xb, yb = ids[4 * s:4 * s + 4], y[4 * s:4 * s + 4]
        sam.perturb(lambda: F.cross_entropy(net(xb), yb))
        sam.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        sam.step()
    return sam


@pytest.mark.parametrize("lit,plain", [(LitBoxAWP, _plain_box), (LitSAM, _plain_sam)])
def test_lightning_recipe_equals_the_plain_loop(lit, plain):
    ids, y = _data()
    torch.manual_seed(0)
    a = Net()
    torch.manual_seed(0)
    b = Net()
    module = lit(a)
    _fit(module, ids, y, steps=3)
    wrapper = plain(b, ids, y, steps=3)
    rule = module.optimizers().optimizer if hasattr(module.optimizers(), "optimizer") else module.optimizers()
    assert rule.perturb_count == 3 and not rule.is_perturbed
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all()
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n
    assert wrapper.perturb_count == 3
