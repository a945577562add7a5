"""What the include rule leaves out is said once, when the wrapper is built (logger ``awpfast``):
a ViT's ``pos_embed`` / ``cls_token`` (no "weight" in the name) are named in a WARNING, with the
include= recipe that takes them (``awpfast.perturb.include_matrices``)."""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from awpfast import AWP, SAM
from awpfast.perturb import include_matrices


class TinyViT(nn.Module):
    def __init__(self, d=8, n=4, classes=3):
        super().__init__()
        self.patch_embed = nn.Linear(12, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):                                   # x: (B, n, 12)
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1) + self.pos_embed
        q, k, v = self.qkv(self.norm1(t)).chunk(3, -1)
        t = t + F.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1) @ v
        return self.head(self.norm(t)[:, 0])


def _records(caplog):
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "awpfast"]


def test_vit_default_rule_warns_with_counts(caplog):
    torch.manual_seed(0)
    m = TinyViT()
    m.head.bias.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="awpfast"):
        awp = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, gamma=0.01)
    (level, msg), = _records(caplog)
    assert level == logging.WARNING
    assert awp.perturbed_parameters == ["patch_embed.weight", "qkv.weight", "head.weight"]
    assert "perturbs 3 tensors" in msg and "2 1-D weights (e.g. norm1.weight)" in msg
    assert "7 non-'weight' tensors" in msg and "2 of them with ndim >= 2: cls_token, pos_embed" in msg
    assert "include=awpfast.perturb.include_matrices" in msg
    # a perturb() does not log again
    caplog.clear()
    x, y = torch.randn(4, 4, 12), torch.randint(0, 3, (4,))
    with caplog.at_level(logging.INFO, logger="awpfast"):
        awp.perturb(lambda: F.cross_entropy(m(x), y))
        awp.restore()
    assert _records(caplog) == []


def test_vit_include_recipe_perturbs_embeddings(caplog):
    torch.manual_seed(0)
    m = TinyViT()
    with caplog.at_level(logging.INFO, logger="awpfast"):
        awp = AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, gamma=0.01, include=include_matrices)
    (level, msg), = _records(caplog)
    assert level == logging.INFO and "perturbs 5 tensors" in msg
    assert set(awp.perturbed_parameters) == {"cls_token", "pos_embed", "patch_embed.weight", "qkv.weight",
                                             "head.weight"}
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = torch.randn(4, 4, 12), torch.randint(0, 3, (4,))
    assert awp.perturb(lambda: F.cross_entropy(m(x), y))
    for n, p in m.named_parameters():
        if n in awp.perturbed_parameters:
            moved = (p.detach() - w0[n]).norm() / w0[n].norm()
            assert abs(float(moved) - 0.01) < 1e-5, n       # ||v|| = gamma ||w||, pos_embed included
        else:
            assert torch.equal(p, w0[n]), n
    awp.restore()
    assert all(torch.equal(p, w0[n]) for n, p in m.named_parameters())


def test_resnet_style_model_is_info_and_frozen_counted(caplog):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    m[0].weight.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="awpfast"):
        AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)
        SAM(torch.optim.SGD(m.parameters(), lr=0.1), m)
    (l1, m1), (l2, m2) = _records(caplog)
    assert l1 == l2 == logging.INFO
    assert "perturbs 1 tensors" in m1 and "1 1-D weights (e.g. 1.weight)" in m1 and "1 frozen (e.g. 0.weight)" in m1
    assert "3 non-'weight' tensors (e.g. 0.bias)" in m1 and "ndim >= 2" not in m1
    assert "SAM perturbs 5 tensors and leaves out 1 frozen (e.g. 0.weight)" in m2
