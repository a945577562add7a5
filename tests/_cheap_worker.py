"""One rank of the 2-process gloo checks of tests/test_cheap_ascent.py (float64, CPU): the
attack-sourced AWP direction and ``ascent_every`` under DDP (global sync) and ``ascent_every``
under FSDP2 (with a state-dict round trip). Single-process references run here too, on the full
global batch with a plain model. Uses the model, data and helpers of ``_dist_worker.py``.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _dist_worker as W  # noqa: E402  (this script's folder is on sys.path)
from _dist_launch import worker_main  # noqa: E402
from awpfast import AWP  # noqa: E402
from awpfast.attacks import PGD  # noqa: E402

STEPS = 4


def attack_step(model, fwd, awp, x, y):
    """AT-AWP step with the direction from the (eval-mode, deterministic) attack's last step."""
    x_adv = PGD(model, eps=0.1, alpha=0.04, steps=2, random_start=False, awp=awp)(x, y)
    awp.perturb()
    awp.zero_grad()
    F.cross_entropy(fwd(x_adv), y).backward()
    awp.step()


def every_step(model, awp, x, y):
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.step()


def reference(kind, every=1):
    model = W.make_net()
    awp = AWP(torch.optim.SGD(model.parameters(), **W.OPT), model, gamma=0.01, ascent_every=every)
    out = []
    for s in range(STEPS):
        x, y = W.data(s)
        if kind == "attack":
            attack_step(model, model, awp, x, y)
        else:
            every_step(model, awp, x, y)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def check_ddp(res):
    for kind, every in (("attack", 1), ("every", 3), ("attack", 2)):
        key = f"ddp_{kind}_every{every}"
        ref = reference(kind, every)
        ddp = W.ddp_model()
        awp = AWP(torch.optim.SGD(ddp.parameters(), **W.OPT), ddp, gamma=0.01, ascent_every=every)
        errs, equal, reduces = [], [], []
        for s in range(STEPS):
            x, y = W.local(*W.data(s))
            with W.Counter(ddp) as c:  # (yields its counts)
                if kind == "attack":  # the attack runs on the inner module (as awpfast-train does)
                    attack_step(ddp.module, ddp, awp, x, y)
                else:
                    every_step(ddp, awp, x, y)
            reduces.append(c["all_reduce"])
            ps = list(ddp.module.parameters())
            errs.append(W.max_rel(ps, ref[s]))
            equal.append(W.gathered_equal(W.flat_params(ddp.module)))
        res[key] = {"max_rel": max(errs), "ranks_equal": all(equal), "all_reduce": reduces}


def check_fsdp_every(res):
    ref = reference("every", 3)
    model = W.fsdp_model()
    awp = AWP(torch.optim.SGD(model.parameters(), **W.OPT), model, gamma=0.01, ascent_every=3)
    errs, equal = [], []
    for s in range(2):
        every_step(model, awp, *W.local(*W.data(s)))
    sd = awp.state_dict()  # a collective: the stored direction gathered into whole tensors
    res["fsdp_direction_shapes"] = [list(t.shape) for t in sd["awpfast"]["direction"]["tensors"]]
    res["fsdp_param_shapes"] = [list(p.shape) for n, p in model.named_parameters() if "weight" in n]
    # a fresh sharded model with these weights and the saved optimizer state continues exactly
    model2 = W.fsdp_model()
    with torch.no_grad():
        for p, q in zip(model2.parameters(), model.parameters()):
            p.to_local().copy_(q.to_local())
    awp2 = AWP(torch.optim.SGD(model2.parameters(), **W.OPT), model2, gamma=0.01, ascent_every=3)
    awp2.load_state_dict(sd)
    for s in range(2, STEPS):
        every_step(model2, awp2, *W.local(*W.data(s)))
        f = W.full(model2)
        errs.append(W.max_rel(f, ref[s]))
        equal.append(W.gathered_equal(torch.cat([t.reshape(-1) for t in f])))
    res["fsdp_every3_resumed"] = {"max_rel": max(errs), "ranks_equal": all(equal)}
    try:
        PGD(model, eps=0.1, alpha=0.04, steps=1, awp=awp)(*W.local(*W.data(0)))
        res["fsdp_attack_error"] = None
    except ValueError as e:
        res["fsdp_attack_error"] = str(e)


def _picked_rows(steps, seed=5, n=W.LOCAL, k=W.LOCAL // 2):
    """The rows every rank's sub-batch generator draws (the same positions of each rank's local batch)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(steps)]


def check_ddp_new_ascents(res):
    rows = _picked_rows(STEPS)
    # one process on the global batch: the sub-batch is the union of the ranks' rows
    model = W.make_net()
    awp = AWP(torch.optim.SGD(model.parameters(), **W.OPT), model, gamma=0.01)
    ref_sub = []
    for s in range(STEPS):
        x, y = W.data(s)
        idx = torch.cat([r * W.LOCAL + rows[s] for r in range(W.WORLD)])
        awp.perturb(lambda: F.cross_entropy(model(x[idx]), y[idx]))
        awp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        awp.step()
        ref_sub.append([p.detach().clone() for p in model.parameters()])
    model = W.make_net()
    awp = AWP(torch.optim.SGD(model.parameters(), **W.OPT), model, gamma=0.01, ascent="momentum")
    ref_mom = []
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(STEPS):
            x, y = W.data(s)
            awp.perturb()
            awp.zero_grad()
            F.cross_entropy(model(x), y).backward()
            awp.step()
            ref_mom.append([p.detach().clone() for p in model.parameters()])
        for key, ref in (("ddp_subbatch", ref_sub), ("ddp_momentum", ref_mom)):
            ddp = W.ddp_model()
            kw = dict(ascent_fraction=0.5, ascent_seed=5) if key == "ddp_subbatch" else dict(ascent="momentum")
            awp = AWP(torch.optim.SGD(ddp.parameters(), **W.OPT), ddp, gamma=0.01, **kw)
            errs, equal, reduces = [], [], []
            for s in range(STEPS):
                x, y = W.local(*W.data(s))
                with W.Counter(ddp) as c:
                    if key == "ddp_subbatch":
                        awp.perturb(lambda pick: F.cross_entropy(ddp(pick(x)), pick(y)))
                    else:
                        awp.perturb()
                    reduces.append(c["all_reduce"])  # the ascent's own collectives (before the descent)
                    awp.zero_grad()
                    F.cross_entropy(ddp(x), y).backward()
                    awp.step()
                errs.append(W.max_rel(list(ddp.module.parameters()), ref[s]))
                equal.append(W.gathered_equal(W.flat_params(ddp.module)))
            res[key] = {"max_rel": max(errs), "ranks_equal": all(equal), "all_reduce": reduces}
        model = W.fsdp_model()
        awp = AWP(torch.optim.SGD(model.parameters(), **W.OPT), model, gamma=0.01, ascent="momentum")
        errs, equal = [], []
        for s in range(STEPS):
            x, y = W.local(*W.data(s))
            awp.perturb()
            awp.zero_grad()
            F.cross_entropy(model(x), y).backward()
            awp.step()
            f = W.full(model)
            errs.append(W.max_rel(f, ref_mom[s]))
            equal.append(W.gathered_equal(torch.cat([t.reshape(-1) for t in f])))
        res["fsdp_momentum"] = {"max_rel": max(errs), "ranks_equal": all(equal)}


def checks(out):
    return [("ddp", check_ddp), ("fsdp_every", check_fsdp_every), ("new_ascents", check_ddp_new_ascents)]


if __name__ == "__main__":
    worker_main(W.RANK, W.WORLD, checks)
