"""`make demo` placeholder until the training CLI lands: one AWP step on a small model."""
import torch
import torch.nn.functional as F

import awpfast
from awpfast.models import PreActResNet18


def main():
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=10)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    awp = awpfast.AWP(opt, model, gamma=0.01)
    model.train()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    with torch.no_grad():
        at_wv = F.cross_entropy(model(x), y).item()
    ratios = {n: ((p.detach() - w[n]).norm() / w[n].norm()).item()
              for n, p in model.named_parameters() if n in awp.perturbed_parameters}
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    print(f"loss at w: {before:.4f}   at w+v: {at_wv:.4f}   after the AWP step: {after:.4f}")
    for n, r in list(ratios.items())[:5]:
        print(f"  ||v||/||w|| {n:32s} {r:.6f}")
    print(f"  ... {len(ratios)} perturbed layers, all at gamma = 0.01")


if __name__ == "__main__":
    main()
