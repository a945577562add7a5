"""One adversarial-training step: the reference recipe's pattern against awpfast's.

Reference pattern (re-implemented here from the design brief, fp32):
    * PGD through a *full* backward: ``loss.backward()`` on ``x + delta`` fills every parameter
      ``.grad`` as well as ``delta.grad`` (model in train mode, as the reference AT code);
    * AWP with a *proxy* model: ``proxy.load_state_dict(model.state_dict())``, one plain SGD
      step on ``-loss``, per-layer ``diff = w_proxy - w`` rescaled to ``||w||``, ``w += gamma*diff``;
    * descent at ``w + v``, base SGD step (momentum 0.9, wd 5e-4), then ``w -= gamma*diff``.
awpfast:
    * ``awpfast.attacks.PGD`` (eval mode, input gradients only, fused step op);
    * ``awpfast.AWP`` around the same SGD (no proxy, seam ops);
    * optionally bf16 autocast and channels_last.

Each configuration also runs without AWP (plain AT) to give the AT-AWP / AT overhead, and
one plain forward+backward of the same model and batch: AWP's extra time divided by it
(``awp_extra_over_fwd_bwd``) is the cost in the unit the ascent pass cannot beat (its floor
is 1.0). The AWP/AT ratio alone misleads: a cheaper attack (input gradients only) makes the
same AWP cost look larger.
Steps of all configurations are interleaved (round-robin) so that a noisy, shared machine
biases them alike; the median per configuration is reported.

    python benchmarks/bench_train_step.py                                 # CPU, PreActResNet-18, batch 16
    python benchmarks/bench_train_step.py --device cuda --model wrn34-10 --batch 128 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import awpfast  # noqa: E402
from awpfast.attacks import PGD  # noqa: E402
from awpfast.models import create_model  # noqa: E402

EPS, ALPHA = 8 / 255, 2 / 255


# ----------------------------------------------------------------------------- reference pattern
class ReferenceStep:
    """The reference AT-AWP training step (proxy model, full-backward attack, fp32)."""

    def __init__(self, model, gamma, attack_steps, lr=0.1):
        self.model, self.gamma, self.steps = model, gamma, attack_steps
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=0.01)

    def attack(self, x, y):
        model = self.model
        model.train()  # the reference attacks in train mode
        delta = torch.empty_like(x).uniform_(-EPS, EPS)
        delta = (torch.clamp(x + delta, 0, 1) - x).requires_grad_(True)
        for _ in range(self.steps):
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()  # full backward: parameter gradients too
            g = delta.grad.detach()
            d = torch.clamp(delta.detach() + ALPHA * torch.sign(g), -EPS, EPS)
            d = torch.clamp(x + d, 0, 1) - x
            delta.data.copy_(d)
            delta.grad.zero_()
        return (x + delta).detach()

    def calc_awp(self, x_adv, y):
        proxy, model = self.proxy, self.model
        proxy.load_state_dict(model.state_dict())
        proxy.train()
        loss = -F.cross_entropy(proxy(x_adv), y)
        self.proxy_opt.zero_grad()
        loss.backward()
        self.proxy_opt.step()
        w = model.state_dict()
        pw = proxy.state_dict()
        diff = {}
        for name, t in w.items():
            if t.dim() <= 1 or "weight" not in name:
                continue
            d = pw[name] - t
            diff[name] = t.norm() / (d.norm() + 1e-20) * d
        return diff

    def _apply(self, diff, coeff):
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in diff:
                    p.add_(coeff * diff[name])

    def fwd_bwd(self, x, y):
        """One plain forward + backward of the same model and batch (the unit of AWP's cost)."""
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def __call__(self, x, y, awp: bool):
        x_adv = self.attack(x, y)
        self.model.train()
        diff = None
        if awp:
            diff = self.calc_awp(x_adv, y)
            self._apply(diff, self.gamma)
        loss = F.cross_entropy(self.model(x_adv), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if awp:
            self._apply(diff, -self.gamma)
        return loss.detach()


# ----------------------------------------------------------------------------- awpfast
class AwpfastStep:
    def __init__(self, model, gamma, attack_steps, amp=None, channels_last=False, backend=None, lr=0.1):
        # one instance per (config, AT or AT-AWP): gamma is fixed, never toggled per step
        self.model, self.amp, self.cl = model, amp, channels_last
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.awp = awpfast.AWP(base, model, gamma=gamma, backend=backend)
        self.use_awp = gamma > 0
        self.attack = PGD(model, eps=EPS, alpha=ALPHA, steps=attack_steps, backend=backend)
        self.device_type = next(model.parameters()).device.type

    def _ac(self):
        if self.amp is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.amp)

    def fwd_bwd(self, x, y):
        """One plain forward + backward of the same model, batch, precision and layout."""
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.awp.zero_grad(set_to_none=True)
        with self._ac():
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def __call__(self, x, y, awp: bool):
        model = self.model
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._ac():
            x_adv = self.attack(x, y)
        model.train()

        def closure():
            with self._ac():
                return F.cross_entropy(model(x_adv), y)

        if awp != self.use_awp:
            raise ValueError("this AwpfastStep was built for " + ("AT-AWP" if self.use_awp else "AT"))
        with self.awp.perturbed(closure):
            self.awp.zero_grad(set_to_none=True)
            with self._ac():
                loss = F.cross_entropy(model(x_adv), y)
            loss.backward()
            self.awp.step()
        return loss.detach()


# ----------------------------------------------------------------------------- driver
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="preact18", choices=("preact18", "wrn34-10", "wrn28-10", "small-cnn"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--gamma", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--fast", choices=("auto", "yes", "no"), default="auto",
                   help="also time awpfast with bf16 autocast + channels_last (auto: on CUDA only)")
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fast = args.fast == "yes" or (args.fast == "auto" and device.type == "cuda")

    torch.manual_seed(0)
    base_model = create_model(args.model, num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    names = ["reference", "awpfast fp32"] + (["awpfast bf16+cl"] if fast else [])
    ref = ReferenceStep(copy.deepcopy(base_model), args.gamma, args.attack_steps)
    runners = {}
    for awp in (True, False):
        g = args.gamma if awp else 0.0
        runners[("reference", awp)] = ref  # stateless w.r.t. AT / AT-AWP
        runners[("awpfast fp32", awp)] = AwpfastStep(copy.deepcopy(base_model), g, args.attack_steps,
                                                     backend=args.backend)
        if fast:
            m = copy.deepcopy(base_model).to(memory_format=torch.channels_last)
            runners[("awpfast bf16+cl", awp)] = AwpfastStep(m, g, args.attack_steps, amp=torch.bfloat16,
                                                            channels_last=True, backend=args.backend)
    # (name, True): AT-AWP step, (name, False): AT step, (name, None): one plain forward+backward
    configs = [(name, awp) for name in names for awp in (True, False, None)]
    times = {c: [] for c in configs}
    for it in range(args.warmup + args.repeats):
        for name, awp in configs:
            _sync(device)
            t0 = time.perf_counter()
            if awp is None:
                loss = runners[(name, False)].fwd_bwd(x, y)
            else:
                loss = runners[(name, awp)](x, y, awp)
            _sync(device)
            dt = time.perf_counter() - t0
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite loss")
            if it >= args.warmup:
                times[(name, awp)].append(dt)
        print(f"  round {it + 1}/{args.warmup + args.repeats}" + (" (warm-up)" if it < args.warmup else ""),
              file=sys.stderr, flush=True)

    def label(name, awp):
        return f"{name} {'AT-AWP' if awp else ('AT' if awp is False else 'fwd+bwd')}"

    med = {label(name, awp): statistics.median(ts) for (name, awp), ts in times.items()}
    mins = {label(name, awp): min(ts) for (name, awp), ts in times.items()}
    ref_awp = med["reference AT-AWP"]
    rows = []
    for name in names:
        a, b, fb = med[f"{name} AT-AWP"], med[f"{name} AT"], med[f"{name} fwd+bwd"]
        rows.append({"config": name, "at_awp_ms": 1e3 * a, "at_ms": 1e3 * b, "awp_overhead": a / b,
                     "fwd_bwd_ms": 1e3 * fb, "awp_extra_ms": 1e3 * (a - b),
                     # AWP's extra cost in units of one plain forward+backward of the same model and
                     # batch: the ascent pass's physical floor is 1.0 (one forward, one backward)
                     "awp_extra_over_fwd_bwd": (a - b) / fb,
                     "speedup_vs_reference_at_awp": ref_awp / a,
                     "at_awp_min_ms": 1e3 * mins[f"{name} AT-AWP"], "at_min_ms": 1e3 * mins[f"{name} AT"],
                     "fwd_bwd_min_ms": 1e3 * mins[f"{name} fwd+bwd"],
                     "speedup_vs_reference_at_awp_min": mins["reference AT-AWP"] / mins[f"{name} AT-AWP"]})
    print(f"\nOne training step, {args.model}, batch {args.batch}, {args.image_size}px, PGD-{args.attack_steps}, "
          f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"median of {args.repeats}")
    print(f"{'config':<18} {'AT-AWP ms':>10} {'AT ms':>10} {'AWP/AT':>8} {'fwd+bwd ms':>11} {'AWP extra/fb':>13}"
          f" {'speed-up vs ref AT-AWP':>24} {'(min-based)':>12}")
    for r in rows:
        print(f"{r['config']:<18} {r['at_awp_ms']:10.1f} {r['at_ms']:10.1f} {r['awp_overhead']:8.3f}"
              f" {r['fwd_bwd_ms']:11.1f} {r['awp_extra_over_fwd_bwd']:13.3f}"
              f" {r['speedup_vs_reference_at_awp']:23.2f}x {r['speedup_vs_reference_at_awp_min']:11.2f}x")
    print("(AWP extra/fb: (AT-AWP - AT) / one plain forward+backward of the same model and batch; the "
          "ascent pass's floor is 1.0)")
    result = {"benchmark": "train_step", "model": args.model, "batch": args.batch, "image_size": args.image_size,
              "attack_steps": args.attack_steps, "gamma": args.gamma, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "rows": rows, "raw_s": {label(n, a): ts for (n, a), ts in times.items()}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
