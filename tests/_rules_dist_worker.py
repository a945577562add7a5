"""One rank of the 2-process gloo checks of tests/test_rules_distributed.py (float64, CPU):
SAM / ASAM, Box AWP and RWP under DDP and FSDP2 against a single process on the full batch.

Run as ``python tests/_rules_dist_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; writes ``OUT_DIR/rank{r}.json``. Reuses the model, data and helpers of
tests/_dist_worker.py (the AWP checks).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _dist_worker as W  # noqa: E402  (sets float64, one thread, RANK/WORLD)
from _dist_launch import worker_main  # noqa: E402
from awpfast import RWP, SAM, BoxAWP  # noqa: E402

STEPS = 3


def make(cls, model, **kw):
    return cls(torch.optim.SGD(model.parameters(), **W.OPT), model, **kw)


def sam_step(model, sam, x, y, form):
    if form == "closure":
        sam.perturb(lambda: F.cross_entropy(model(x), y))
    else:
        F.cross_entropy(model(x), y).backward()
        sam.first_step(zero_grad=True)
    sam.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sam.step()
    sam.zero_grad()


def box_step(model, box, x, y, later):
    F.cross_entropy(model(x), y).backward()
    box.perturb(later=(lambda: F.cross_entropy(model(x), y)) if later else None)
    box.zero_grad()
    F.cross_entropy(model(x), y).backward()
    box.step()
    box.zero_grad()


def rwp_step(model, rwp, x, y, arg):
    rwp.perturb(lambda: F.cross_entropy(model(x), y, reduction="none"))
    rwp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    rwp.step()
    rwp.zero_grad()


def reference(cls, kw, step_fn, arg):
    model = W.make_net()
    opt = make(cls, model, **kw)
    out = []
    for s in range(STEPS):
        step_fn(model, opt, *W.data(s), arg)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def run(res, key, kind, cls, kw, step_fn, arg):
    ref = reference(cls, kw, step_fn, arg)
    model = W.ddp_model() if kind == "ddp" else W.fsdp_model()
    opt = make(cls, model, **kw)
    errs, equal, counts = [], [], []
    for s in range(STEPS):
        with W.Counter(model if kind == "ddp" else None) as c:
            step_fn(model, opt, *W.local(*W.data(s)), arg)
        counts.append(dict(c))
        params = list(model.module.parameters()) if kind == "ddp" else W.full(model)
        errs.append(W.max_rel(params, ref[s]))
        equal.append(W.gathered_equal(W.flat_params(model) if kind == "ddp" else
                                      torch.cat([t.reshape(-1) for t in params])))
    res[key] = {"max_rel": max(errs), "ranks_equal": all(equal), "kind": opt.distributed.kind,
                "collectives": counts, "names": opt.perturbed_parameters}


def checks(out):
    """Every case: SAM / ASAM in both forms and Box AWP with 1 and 2 ascent steps, DDP and FSDP2."""
    cases = []
    for kind in ("ddp", "fsdp"):
        for form in ("closure", "first_step"):
            for adaptive in (False, True):
                kw = dict(rho=0.05, adaptive=adaptive, eta=0.01 if adaptive else 0.0)
                cases.append((f"sam_{kind}_{form}_{'asam' if adaptive else 'sam'}", kind, SAM, kw, sam_step, form))
        for later in (False, True):
            kw = dict(adv_lr=0.5, adv_eps=0.05, steps=2 if later else 1)
            cases.append((f"box_{kind}_k{2 if later else 1}", kind, BoxAWP, kw, box_step, later))
        # loss_threshold 1.1: some examples of each batch kept, some masked
        cases.append((f"rwp_{kind}", kind, RWP, dict(gamma=0.01, steps=3, loss_threshold=1.1), rwp_step, None))
    return [(key, lambda res, key=key, args=args: run(res, key, *args)) for key, *args in cases]


if __name__ == "__main__":
    worker_main(W.RANK, W.WORLD, checks)
