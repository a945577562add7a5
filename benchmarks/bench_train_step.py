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

``--ladder``: an ablation ladder measured in one run, each rung changing one thing
over the rung before it (see :data:`LADDER`): (a) the reference pattern; (b) awpfast's AWP with
the same recipe (train-mode attack through a full backward); (c) + input-only attack gradients
(the same ``x_adv``, asserted); (d) + an eval-mode attack (a recipe change: a different attack);
(e) + bf16 autocast; (f) + channels_last; (g) + torch.compile. (a) -> (b) -> (c) is the same
algorithm. Each rung is timed as an AT-AWP step, an AT step (the same rung without AWP, a plain
SGD step) and one plain forward+backward; medians, quartiles and extremes over ``--repeats``
interleaved rounds after ``--warmup`` rounds, the AWP extra as the median of the per-round paired
differences AT-AWP - AT. ``--cheap-at d`` adds, at that rung's settings, the cheap-ascent rows:
the ascent direction sourced from the attack's last backward (``PGD(..., awp=awp)``,
then ``awp.perturb()`` with no closure) and ``AWP(..., ascent_every=2)`` / ``=4`` (the amortized
step: the median of the steps that compute a direction and of those that reuse it, weighted
1 : K-1). The load average (``os.getloadavg()``) is recorded each round.

    python benchmarks/bench_train_step.py --ladder --batch 32 --repeats 10 --json ladder.json      # CPU
    python benchmarks/bench_train_step.py --ladder --device cuda --model wrn34-10 --batch 128 \
        --rungs a,b,c,d,e,f --cheap-at d,f --repeats 10 --json ladder.json

Both results are read through this module only: :func:`verdict`, :func:`summary` (numbers by
meaning, for scripts/docs_numbers.py), :func:`summary_lines` and :func:`targets` (for
gpu_check.py) take either JSON.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import awpfast  # noqa: E402
from _bench_io import cpu_name, target, write_json  # noqa: E402
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
LADDER = [
    # (rung, name, what it changes over the rung before, same algorithm as (a)?)
    ("a", "reference pattern", "proxy-model AWP (state-dict copy, SGD step, per-layer diff, add, subtract); "
     "train-mode attack through a full backward (every parameter's .grad filled at each PGD step); fp32", True),
    ("b", "awpfast AWP, same recipe", "awpfast.AWP instead of the proxy model; the attack unchanged (train mode, "
     "full backward, `--recipe at-awp-reference` semantics)", True),
    ("c", "+ input-only attack gradients", "the attack asks autograd for the input gradient only "
     "(awpfast.attacks.PGD(bn_train=True)); the same x_adv as (b), asserted", True),
    ("d", "+ eval-mode attack", "RECIPE CHANGE: the attack runs in eval mode (awpfast's default), a different "
     "attack from the reference's train-mode one", False),
    ("e", "+ bf16 autocast", "precision: every forward and backward under bf16 autocast", False),
    ("f", "+ channels_last", "memory layout: model and inputs channels_last", False),
    ("g", "+ torch.compile", "compiler: the model wrapped in torch.compile (Inductor)", False),
]
RUNG_SETTINGS = {
    # attack: train-full (train mode, loss.backward()), train-input (train mode, input gradient only),
    # eval-input (eval mode, input gradient only)
    "b": dict(attack="train-full"),
    "c": dict(attack="train-input"),
    "d": dict(attack="eval-input"),
    "e": dict(attack="eval-input", amp=torch.bfloat16),
    "f": dict(attack="eval-input", amp=torch.bfloat16, channels_last=True),
    "g": dict(attack="eval-input", amp=torch.bfloat16, channels_last=True, compile=True),
}


class AwpfastStep:
    """awpfast's training step, for the step benchmark and every ladder rung after (a): an AT-AWP
    step (``kind="awp"``; with gamma 0 the AWP wrapper is inactive, the step benchmark's AT), an AT
    step (``kind="at"``: a plain SGD step, no AWP at all) or a cheap-ascent variant (``"sourced"``,
    ``"every"``, ``"subbatch"``, ``"momentum"``, ``"rwp"``; ``ascent_every`` carries its K, fraction
    or number of passes), with the attack, precision, layout and compiler of ``attack``, ``amp``,
    ``channels_last`` and ``compile``."""

    def __init__(self, model, gamma, attack_steps, attack="eval-input", amp=None, channels_last=False,
                 compile=False, kind="awp", ascent_every=1, backend=None, lr=0.1, check_range=False):
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.amp, self.cl, self.kind = model, amp, channels_last, kind
        self.fwd = torch.compile(model) if compile else model
        self.attack_kind, self.steps = attack, attack_steps
        self.base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        kw = {"every": dict(ascent_every=ascent_every),
              "subbatch": dict(ascent_fraction=ascent_every, ascent_seed=0),
              "momentum": dict(ascent="momentum")}.get(kind, {})
        self.awp = None
        if kind == "rwp":
            self.awp = awpfast.RWP(self.base, model, gamma=gamma, backend=backend, steps=int(ascent_every))
        elif kind != "at":
            self.awp = awpfast.AWP(self.base, model, gamma=gamma, backend=backend, **kw)
        self.ascent_every = ascent_every
        pgd_kw = dict(eps=EPS, alpha=ALPHA, steps=attack_steps, bn_train=attack != "eval-input", backend=backend,
                      check_range=check_range)
        if kind == "sourced":
            pgd_kw["awp"] = self.awp
        self.attack = PGD(self.fwd, **pgd_kw)
        self.backend = backend
        self.device_type = next(model.parameters()).device.type
        self.count = 0  # steps taken (ascent_every's clock: a direction on steps 0, K, 2K, ...)

    def _ac(self):
        if self.amp is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.amp)

    def _prep(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.cl else x

    def full_backward_attack(self, x, y):
        """The reference's attack with awpfast's step op: train mode, ``loss.backward()`` (parameter
        gradients accumulate in ``.grad``, as the reference), the same start as :class:`PGD`."""
        from awpfast import ops
        self.model.train()
        x_adv = self.attack.init(x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with self._ac():
                loss = F.cross_entropy(self.fwd(x_adv), y)
            loss.backward()
            g = x_adv.grad
            x_adv = x_adv.detach()
            ops.pgd_step_(x_adv, g.to(x_adv.dtype), x, ALPHA, EPS, "Linf", backend=self.backend)
        return x_adv

    def adversarial(self, x, y):
        x = self._prep(x)
        if self.attack_kind == "train-full":
            return x, self.full_backward_attack(x, y)
        with self._ac():
            return x, self.attack(x, y)

    def fwd_bwd(self, x, y):
        """One plain forward + backward of the same model, batch, precision, layout and compiler."""
        x = self._prep(x)
        self.model.train()
        self.base.zero_grad(set_to_none=True)
        with self._ac():
            loss = F.cross_entropy(self.fwd(x), y)
        loss.backward()
        return loss.detach()

    def __call__(self, x, y):
        x, x_adv = self.adversarial(x, y)
        model, fwd = self.model, self.fwd
        model.train()
        self.count += 1
        if self.awp is None:  # AT
            self.base.zero_grad(set_to_none=True)
            with self._ac():
                loss = F.cross_entropy(fwd(x_adv), y)
            loss.backward()
            self.base.step()
            return loss.detach()

        def closure(pick=None):
            with self._ac():
                if self.kind == "rwp":  # per-example losses: RWP masks them
                    return F.cross_entropy(fwd(x_adv), y, reduction="none")
                if pick is not None:  # the sub-batch ascent
                    return F.cross_entropy(fwd(pick(x_adv)), pick(y))
                return F.cross_entropy(fwd(x_adv), y)

        with self.awp.perturbed(None if self.kind in ("sourced", "momentum") else closure):
            self.awp.zero_grad(set_to_none=True)
            with self._ac():
                loss = F.cross_entropy(fwd(x_adv), y)
            loss.backward()
            self.awp.step()
        return loss.detach()


def _cheap_api():
    """Whether the cheap-ascent API (attack-sourced direction, ascent_every) is importable: (ok, why not)."""
    import inspect
    why = []
    if "awp" not in inspect.signature(PGD.__init__).parameters:
        why.append("awpfast.attacks.PGD has no awp= argument")
    if "ascent_every" not in inspect.signature(awpfast.AWP.__init__).parameters:
        try:
            from awpfast.optim import WeightPerturbation
            if "ascent_every" not in inspect.signature(WeightPerturbation.__init__).parameters:
                why.append("awpfast.AWP has no ascent_every= argument")
        except ImportError:
            why.append("awpfast.AWP has no ascent_every= argument")
    return not why, "; ".join(why)


def _stats(ts):
    """ms: median, quartiles, extremes of a list of seconds."""
    v = sorted(1e3 * t for t in ts)
    if not v:
        return None
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "min": v[0], "max": v[-1], "n": len(v)}


def check_same_x_adv(base_model, x, y, attack_steps, backend, device):
    """(b) and (c) give the same x_adv from the same weights and random start: the input-only
    gradient is the same gradient as the full backward's. Returns the record (raises on a mismatch
    beyond the sign of a near-zero gradient)."""
    out = {}
    for rung in ("b", "c"):
        st = AwpfastStep(copy.deepcopy(base_model), 0.0, attack_steps, kind="at", backend=backend,
                         **RUNG_SETTINGS[rung])
        torch.manual_seed(1234)
        out[rung] = st.adversarial(x, y)[1]
    diff = (out["b"] - out["c"]).abs()
    rec = {"bitwise_equal": bool(torch.equal(out["b"], out["c"])), "max_abs_diff": float(diff.max()),
           "elements_differing": int((diff > 0).sum()), "elements": diff.numel()}
    # a PGD step moves by alpha = 2/255 per element: any real difference is a flipped sign; allow none
    # beyond float rounding of the clamp
    if rec["max_abs_diff"] > 1e-6:
        raise AssertionError(f"rung (c)'s x_adv differs from rung (b)'s: {rec}")
    return rec


# ----------------------------------------------------------------------------- the timing, shared
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(args):
    """The device, the model both benchmarks copy and one fixed batch."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base_model = create_model(args.model, num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    return device, base_model, x, y


def _triple(key, awp_step, at_step):
    """One configuration's three timed calls: (key, "AT-AWP"), (key, "AT"), (key, "fwd+bwd")."""
    return [((key, "AT-AWP"), awp_step), ((key, "AT"), at_step), ((key, "fwd+bwd"), at_step.fwd_bwd)]


def _reference_triple(key, base_model, args):
    ref = ReferenceStep(copy.deepcopy(base_model), args.gamma, args.attack_steps)
    return [((key, "AT-AWP"), lambda x, y: ref(x, y, True)), ((key, "AT"), lambda x, y: ref(x, y, False)),
            ((key, "fwd+bwd"), ref.fwd_bwd)]


def time_rounds(configs, x, y, device, warmup, repeats, after_round=None):
    """Interleaved rounds (round-robin over ``configs``, ``[(key, fn)]``): seconds per measured call
    and the step count (``fn.count``) each call started at, per key. ``after_round(it, times, index)``
    runs after every round and returns a note for the progress line."""
    times = {c: [] for c, _ in configs}
    index = {c: [] for c, _ in configs}  # for ascent_every: which steps computed a direction
    n_rounds = warmup + repeats
    for it in range(n_rounds):
        for c, fn in configs:
            idx = getattr(fn, "count", None)
            _sync(device)
            t0 = time.perf_counter()
            loss = fn(x, y)
            _sync(device)
            dt = time.perf_counter() - t0
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{c}: non-finite loss")
            if it >= warmup:
                times[c].append(dt)
                index[c].append(idx)
        note = after_round(it, times, index) if after_round else ""
        print(f"  round {it + 1}/{n_rounds}" + (" (warm-up)" if it < warmup else "") + (note or ""),
              file=sys.stderr, flush=True)
    return times, index


# ----------------------------------------------------------------------------- the step benchmark
def step_main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device, base_model, x, y = _setup(args)
    fast = args.fast == "yes" or (args.fast == "auto" and device.type == "cuda")
    names = ["reference", "awpfast fp32"] + (["awpfast bf16+cl"] if fast else [])
    configs = _reference_triple("reference", base_model, args)
    for name in names[1:]:
        # one instance per (config, AT or AT-AWP): gamma is fixed, never toggled per step; AT is the
        # same wrapper with gamma 0 (inactive)
        kw = dict(amp=torch.bfloat16, channels_last=True) if name == "awpfast bf16+cl" else {}
        steps = [AwpfastStep(copy.deepcopy(base_model), g, args.attack_steps, backend=args.backend,
                             check_range=True, **kw) for g in (args.gamma, 0.0)]
        configs += _triple(name, *steps)
    times, _ = time_rounds(configs, x, y, device, args.warmup, args.repeats)

    def label(c):
        return f"{c[0]} {c[1]}"

    med = {label(c): statistics.median(ts) for c, ts in times.items()}
    mins = {label(c): min(ts) for c, ts in times.items()}
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
              "rows": rows, "raw_s": {label(c): ts for c, ts in times.items()}}
    if args.json:
        write_json(args.json, result, indent=1)
    return result


# ----------------------------------------------------------------------------- the ladder
def ladder_main(args):
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    known = [r for r, *_ in LADDER]
    bad = [r for r in rungs if r not in known]
    if bad:
        raise SystemExit(f"--rungs: unknown {bad}; choose from {','.join(known)}")
    cheap_at = [r.strip() for r in args.cheap_at.split(",") if r.strip()]
    if any(r not in RUNG_SETTINGS for r in cheap_at):
        raise SystemExit(f"--cheap-at: choose from {','.join(RUNG_SETTINGS)}")
    everys = [int(k) for k in args.ascent_every.split(",") if k.strip()]
    load_start = os.getloadavg()
    t_start = time.time()
    device, base_model, x, y = _setup(args)

    same = None
    if "b" in rungs and "c" in rungs:
        same = check_same_x_adv(base_model, x, y, args.attack_steps, args.backend, device)
        print(f"x_adv (b) vs (c): {same}", file=sys.stderr, flush=True)

    def step(r, gamma, kind, k=1):
        return AwpfastStep(copy.deepcopy(base_model), gamma, args.attack_steps, kind=kind, ascent_every=k,
                           **dict(RUNG_SETTINGS[r], backend=args.backend))

    configs = []  # (key, callable (x, y) -> loss)
    meta = {}
    for r in rungs:
        configs += (_reference_triple("a", base_model, args) if r == "a"
                    else _triple(r, step(r, args.gamma, "awp"), step(r, 0.0, "at")))
    cheap_ok, cheap_why = _cheap_api()
    extra_kinds = [("subbatch", float(f)) for f in args.ascent_fraction.split(",") if f.strip()]
    extra_kinds += [("momentum", 1)] if args.momentum_row else []
    extra_kinds += [("rwp", int(k)) for k in args.rwp_steps.split(",") if k.strip()]
    cheap_rows_wanted = [(r, kind, k) for r in cheap_at
                         for kind, k in [("sourced", 1)] + [("every", k) for k in everys] + extra_kinds]
    if cheap_at and not cheap_ok:
        print(f"cheap-ascent rows skipped: {cheap_why}", file=sys.stderr, flush=True)
    elif cheap_at:
        for r, kind, k in cheap_rows_wanted:
            st = step(r, args.gamma, kind, k)
            label = f"{kind}{k:g}" if kind in ("every", "subbatch", "rwp") else kind
            configs.append(((r, label), st))
            meta[(r, label)] = (kind, k, st)
            if not any(c[0] == (r, "AT") for c in configs):  # the AT and fwd+bwd of that rung's settings
                configs += _triple(r, None, step(r, 0.0, "at"))[1:]
            if not any(c[0] == (r, "AT-AWP") for c in configs):
                configs.append(((r, "AT-AWP"), step(r, args.gamma, "awp")))

    loads = []

    def write(times, step_index, partial):
        res = _ladder_result(args, device, rungs, times, step_index, meta, same, loads, load_start,
                             t_start, cheap_at, cheap_ok, cheap_why, partial)
        if args.json:
            write_json(args.json, res, announce=False, indent=1)
        return res

    def after_round(it, times, step_index):
        loads.append({"round": it + 1, "loadavg": os.getloadavg(), "time": time.strftime("%H:%M:%S")})
        if it >= args.warmup:
            write(times, step_index, partial=True)
        return f"  load {os.getloadavg()[0]:.2f}"

    times, step_index = time_rounds(configs, x, y, device, args.warmup, args.repeats, after_round)
    res = write(times, step_index, partial=False)
    _print_ladder(res)
    if args.json:
        print(f"wrote {args.json}")
    return res


def _ladder_result(args, device, rungs, times, step_index, meta, same, loads, load_start, t_start,
                   cheap_at, cheap_ok, cheap_why, partial):
    st = {c: _stats(ts) for c, ts in times.items()}

    def paired(c1, c2):  # per-round differences (interleaved: the same round's load for both)
        d = [a - b for a, b in zip(times[c1], times[c2])]
        return _stats(d)

    rows = []
    ref_awp = st.get(("a", "AT-AWP"))
    prev = None
    for rung, name, change, same_alg in LADDER:
        if rung not in rungs or st.get((rung, "AT-AWP")) is None:
            continue
        a, b, fb = st[(rung, "AT-AWP")], st[(rung, "AT")], st[(rung, "fwd+bwd")]
        extra = paired((rung, "AT-AWP"), (rung, "AT"))
        row = {"rung": rung, "name": name, "changes": change, "same_algorithm_as_a": same_alg,
               "at_awp_ms": a, "at_ms": b, "fwd_bwd_ms": fb, "awp_extra_ms": extra,
               "awp_extra_over_fwd_bwd": extra["median"] / fb["median"],
               "at_awp_over_at": a["median"] / b["median"]}
        if ref_awp:
            row["speedup_at_awp_vs_a"] = ref_awp["median"] / a["median"]
            row["speedup_at_vs_a"] = st[("a", "AT")]["median"] / b["median"]
        if prev is not None:
            row["speedup_at_awp_vs_previous_rung"] = st[(prev, "AT-AWP")]["median"] / a["median"]
            row["previous_rung"] = prev
        rows.append(row)
        prev = rung
    cheap = []
    for r in cheap_at:
        if st.get((r, "AT")) is None:
            continue
        at, fb = st[(r, "AT")], st[(r, "fwd+bwd")]
        base = [("separate", (r, "AT-AWP"))] + [(lab, (r, lab)) for (rr, lab) in meta if rr == r]
        for lab, c in base:
            if st.get(c) is None:
                continue
            row = {"at_rung": r, "row": {"separate": "AT-AWP, separate ascent pass (exact AWP)"}.get(lab, lab),
                   "label": lab}
            if c in meta and meta[c][0] == "every":
                k = meta[c][1]
                idx = step_index[c]
                fresh = [t for t, i in zip(times[c], idx) if i % k == 0]
                reuse = [t for t, i in zip(times[c], idx) if i % k != 0]
                sf, sr = _stats(fresh), _stats(reuse)
                row["row"] = f"AT-AWP, ascent_every={k} (a direction every {k} steps, re-scaled in between)"
                row["fresh_step_ms"], row["reuse_step_ms"] = sf, sr
                if sf and sr:
                    step_ms = (sf["median"] + (k - 1) * sr["median"]) / k
                    row["step_ms"] = step_ms
                    row["step_ms_note"] = f"amortized: (median of steps computing a direction + {k - 1} x median " \
                                          f"of steps reusing it) / {k}"
                    row["awp_extra_ms"] = step_ms - at["median"]
            else:
                kind, k = meta[c][:2] if c in meta else (lab, None)
                row["row"] = {
                    "sourced": "AT-AWP, attack-sourced direction (PGD(..., awp=awp), awp.perturb() no closure)",
                    "subbatch": f"AT-AWP, the ascent pass on a sub-batch (ascent_fraction={k})",
                    "momentum": "AT-AWP, momentum-sourced direction (ascent='momentum': no ascent pass)",
                    "rwp": f"AT-RWP ({k} ascent passes, the Loss Stationary Condition, one global norm)",
                }.get(kind, row["row"])
                row["step_ms"] = st[c]["median"]
                row["step_spread_ms"] = st[c]
                row["awp_extra_ms"] = paired(c, (r, "AT"))["median"]
            if "step_ms" in row:
                row["awp_extra_over_fwd_bwd"] = row["awp_extra_ms"] / fb["median"]
            cheap.append(row)
        cheap.insert(len(cheap) - len(base), {"at_rung": r, "row": "AT (no AWP)", "label": "AT",
                                              "step_ms": at["median"], "step_spread_ms": at,
                                              "awp_extra_ms": 0.0, "awp_extra_over_fwd_bwd": 0.0})
    la = [lr["loadavg"][0] for lr in loads]
    return {"benchmark": "train_step_ladder", "partial": partial, "model": args.model, "batch": args.batch,
            "image_size": args.image_size, "attack_steps": args.attack_steps, "gamma": args.gamma,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "warmup_rounds": args.warmup, "measured_rounds": max(0, len(loads) - args.warmup),
            "planned_rounds": args.repeats,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
            "elapsed_s": round(time.time() - t_start, 1),
            "loadavg": {"start": load_start, "per_round": loads,
                        "one_minute_median": statistics.median(la) if la else None,
                        "one_minute_min": min(la) if la else None, "one_minute_max": max(la) if la else None,
                        "note": "os.getloadavg() (1, 5, 15 min) at the start and after each round"},
            "x_adv_b_equals_c": same,
            "notes": ["AWP extra = median over rounds of the paired difference (AT-AWP - AT) of the same round",
                      "AT = the same rung without AWP: a plain SGD step on the attack's x_adv",
                      "the reference script's bookkeeping forwards (its restart-selection loss forward and the "
                      "clean forward after the restore) are left out of every rung: they change no gradient"],
            "cheap_ascent_api": {"available": cheap_ok, "why_not": cheap_why or None},
            "rungs": rows, "cheap_rows": cheap,
            "raw_s": {f"{c[0]} {c[1]}": ts for c, ts in times.items()},
            "raw_step_index": {f"{c[0]} {c[1]}": ix for c, ix in step_index.items() if c in meta}}



def _print_ladder(res):
    print(f"\nAblation ladder: one training step, {res['model']}, batch {res['batch']}, {res['image_size']}px, "
          f"PGD-{res['attack_steps']}, {res['device']} ({res['device_name']}, {res['threads']} threads), "
          f"median of {res['measured_rounds']} rounds; load average (1 min) median "
          f"{res['loadavg']['one_minute_median']:.2f} ({res['loadavg']['one_minute_min']:.2f}-"
          f"{res['loadavg']['one_minute_max']:.2f})")
    print(f"{'rung':<36} {'AT-AWP ms':>10} {'AT ms':>9} {'fwd+bwd':>8} {'extra ms':>9} {'extra/fb':>9} "
          f"{'vs (a)':>7} {'vs prev':>8}")
    for r in res["rungs"]:
        print(f"({r['rung']}) {r['name']:<32} {r['at_awp_ms']['median']:10.1f} {r['at_ms']['median']:9.1f} "
              f"{r['fwd_bwd_ms']['median']:8.1f} {r['awp_extra_ms']['median']:9.1f} "
              f"{r['awp_extra_over_fwd_bwd']:9.2f} {r.get('speedup_at_awp_vs_a', float('nan')):6.2f}x "
              f"{r.get('speedup_at_awp_vs_previous_rung', float('nan')):7.2f}x")
    for r in res["cheap_rows"]:
        print(f"  at ({r['at_rung']}) {r['label']:<12} step {r.get('step_ms', float('nan')):9.1f} ms  extra "
              f"{r.get('awp_extra_ms', float('nan')):8.1f} ms  extra/fb {r.get('awp_extra_over_fwd_bwd', float('nan')):5.2f}")
    if not res["cheap_ascent_api"]["available"]:
        print(f"  cheap-ascent rows: not run ({res['cheap_ascent_api']['why_not']})")




# ----------------------------------------------------------------------------- the results, read here only
def _is_ladder(data):
    return "rungs" in data or data.get("benchmark") == "train_step_ladder"


def verdict(data):
    """``(ok, rows not ok)`` of either result: the step has rows; the ladder has rungs and finished
    (not ``partial``). No row is judged on its own (None)."""
    if _is_ladder(data):
        return bool(data.get("rungs")) and not data.get("partial", True), None
    return bool(data.get("rows")), None


def _quartiles(v):
    v = sorted(v)
    n = len(v)

    def p(x):
        k = (n - 1) * x
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)
    return p(0.25), p(0.5), p(0.75)


def _device_text(d):
    if d["device"] == "cpu":
        return f"{d.get('cpu_count') or '?'}-core CPU ({d['device_name']})"
    return d["device_name"] or d["device"]


def _q(s):
    return (s["p25"], s["median"], s["p75"])


def summary(data):
    """The numbers of either result by meaning (ms unless named otherwise).

    The step: ``{"configs": {config: {at_awp_ms, at_ms, awp_extra_ms, fwd_bwd_ms, awp_over_at,
    extra_over_fwd_bwd, vs_reference}}}`` (medians over the rounds).
    The ladder: ``{"conditions": {model, batch, attack_steps, device (text), threads, measured_rounds,
    warmup_rounds, load: (min, median, max) of the 1-minute load average, x_adv_b_c: "bitwise", None
    (not checked) or the largest difference}, "rungs": {rung: {name, same_algorithm, at_awp_ms, at_ms,
    awp_extra_ms (quartiles), fwd_bwd_ms (median), extra_over_fwd_bwd, vs_previous, vs_a (None where
    not measured), paired_vs_previous: quartiles of the per-round ratio of the rung above's AT-AWP step
    to this one's}}, "cheap": [{at_rung, label, row, step_ms, awp_extra_ms, extra_over_fwd_bwd}]}``
    (the cheap-ascent rows that have a step time)."""
    if not _is_ladder(data):
        return {"configs": {r["config"]: {
            "at_awp_ms": r["at_awp_ms"], "at_ms": r["at_ms"], "awp_extra_ms": r["awp_extra_ms"],
            "fwd_bwd_ms": r.get("fwd_bwd_ms"), "awp_over_at": r["awp_overhead"],
            "extra_over_fwd_bwd": r.get("awp_extra_over_fwd_bwd"),
            "vs_reference": r["speedup_vs_reference_at_awp"]} for r in data.get("rows", [])}}
    la, same, raw = data.get("loadavg") or {}, data.get("x_adv_b_equals_c"), data.get("raw_s") or {}
    rungs = {}
    for r in data.get("rungs", []):
        prev = r.get("previous_rung")
        pair = (raw.get(f"{prev} AT-AWP"), raw.get(f"{r['rung']} AT-AWP")) if prev else (None, None)
        rungs[r["rung"]] = {
            "name": r["name"], "same_algorithm": r["same_algorithm_as_a"], "at_awp_ms": _q(r["at_awp_ms"]),
            "at_ms": _q(r["at_ms"]), "awp_extra_ms": _q(r["awp_extra_ms"]), "fwd_bwd_ms": r["fwd_bwd_ms"]["median"],
            "extra_over_fwd_bwd": r["awp_extra_over_fwd_bwd"], "vs_previous": r.get("speedup_at_awp_vs_previous_rung"),
            "vs_a": r.get("speedup_at_awp_vs_a"),
            "paired_vs_previous": _quartiles([p / q for p, q in zip(*pair)]) if all(pair) else None}
    cheap = [{"at_rung": r["at_rung"], "label": r["label"], "row": r["row"], "step_ms": r["step_ms"],
              "awp_extra_ms": r["awp_extra_ms"], "extra_over_fwd_bwd": r["awp_extra_over_fwd_bwd"]}
             for r in data.get("cheap_rows", []) if "step_ms" in r]
    return {"conditions": {
        "model": data.get("model"), "batch": data.get("batch"), "attack_steps": data.get("attack_steps"),
        "device": _device_text(data) if "device" in data else None, "threads": data.get("threads"),
        "measured_rounds": data.get("measured_rounds"), "warmup_rounds": data.get("warmup_rounds"),
        "load": (la.get("one_minute_min"), la.get("one_minute_median"), la.get("one_minute_max")),
        "x_adv_b_c": None if same is None else ("bitwise" if same.get("bitwise_equal") else same["max_abs_diff"])},
        "rungs": rungs, "cheap": cheap}


def summary_lines(data):
    """gpu_check's text lines of either result (none when it has no rows)."""
    out = []
    if data.get("rows"):
        out.append("  train step: AT-AWP ms, AT ms, AWP/AT, fwd+bwd ms, AWP extra / fwd+bwd, vs reference")
        for r in data["rows"]:
            out.append(f"    {r['config']:18s} {r['at_awp_ms']:8.1f} {r['at_ms']:8.1f} {r['awp_overhead']:6.3f} "
                       f"{r.get('fwd_bwd_ms', float('nan')):8.1f} {r.get('awp_extra_over_fwd_bwd', float('nan')):6.3f} "
                       f"{r['speedup_vs_reference_at_awp']:6.2f}x")
    if data.get("rungs"):
        la = (data.get("loadavg") or {}).get("one_minute_median")
        out.append(f"  ladder ({data.get('model')}, batch {data.get('batch')}, PGD-{data.get('attack_steps')}, "
                   f"{data.get('measured_rounds')} rounds, load {la}): AT-AWP ms, AT ms, AWP extra ms, "
                   "extra / fwd+bwd, vs (a)")
        for r in data["rungs"]:
            out.append(f"    ({r['rung']}) {r['name'][:30]:30s} {r['at_awp_ms']['median']:8.1f} "
                       f"{r['at_ms']['median']:8.1f} {r['awp_extra_ms']['median']:7.1f} "
                       f"{r['awp_extra_over_fwd_bwd']:6.2f} {r.get('speedup_at_awp_vs_a', float('nan')):6.2f}x")
        for r in data.get("cheap_rows", []):
            if "step_ms" in r:
                out.append(f"    at ({r['at_rung']}) {r['label']:10s} step {r['step_ms']:8.1f} ms, extra "
                           f"{r['awp_extra_ms']:7.1f} ms, {r['awp_extra_over_fwd_bwd']:5.2f} x fwd+bwd")
    return out


def targets(data):
    """The GPU targets of either result: the bf16 + channels_last step against the reference (>= 3.5x)
    and its AWP/AT (<= 1.10); AWP's extra in fwd+bwd units and the ladder's same-algorithm speed-up,
    reported without a target."""
    out = {}
    fast = {r["config"]: r for r in data.get("rows", [])}.get("awpfast bf16+cl")
    if fast:
        out["train_bf16cl_vs_reference_fp32"] = target(fast["speedup_vs_reference_at_awp"], ">= 3.5",
                                                       fast["speedup_vs_reference_at_awp"] >= 3.5)
        out["train_at_awp_over_at"] = target(fast["awp_overhead"], "<= 1.10", fast["awp_overhead"] <= 1.10)
        if "awp_extra_over_fwd_bwd" in fast:
            out["train_awp_extra_over_fwd_bwd"] = target(fast["awp_extra_over_fwd_bwd"], "report (floor 1.0)", None)
    lad = {r["rung"]: r for r in data.get("rungs", [])}
    if "a" in lad and "c" in lad:  # the same algorithm, reported (no target)
        out["ladder_same_algorithm_a_to_c"] = target(lad["c"].get("speedup_at_awp_vs_a"), "report", None,
                                                     note="AT-AWP step, reference pattern -> awpfast with the same "
                                                          "train-mode attack and input-only gradients (same x_adv)")
    for rung in ("c", "f"):
        if rung in lad:
            out[f"ladder_{rung}_awp_extra_over_fwd_bwd"] = target(lad[rung].get("awp_extra_over_fwd_bwd"),
                                                                  "report (floor 1.0)", None)
    return out


# ----------------------------------------------------------------------------- driver
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
    p.add_argument("--ladder", action="store_true",
                   help="the ablation ladder (a)-(g), one change per rung (see the module docstring)")
    p.add_argument("--rungs", default="a,b,c,d,e,f", help="ladder rungs to time (of a,b,c,d,e,f,g; g: torch.compile)")
    p.add_argument("--cheap-at", default="d",
                   help="ladder: rungs at whose settings the cheap-ascent rows are timed (comma list; '' for none)")
    p.add_argument("--ascent-every", default="2,4", help="ladder: the ascent_every values of the cheap-ascent rows")
    p.add_argument("--ascent-fraction", default="0.25", help="ladder: the sub-batch fractions of the cheap-ascent rows")
    p.add_argument("--momentum-row", action=argparse.BooleanOptionalAction, default=True,
                   help="ladder: a momentum-sourced ascent row next to the cheap-ascent rows")
    p.add_argument("--rwp-steps", default="10", help="ladder: RWP rows with these ascent passes (RWP's reference: 10)")
    args = p.parse_args(argv)
    return run(args)


def run(args):
    """Either benchmark from parsed options (``args.ladder`` picks the ladder); its result, also written
    to ``args.json`` when given."""
    return ladder_main(args) if args.ladder else step_main(args)


if __name__ == "__main__":
    main()
