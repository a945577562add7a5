"""One rank of the 2-process gloo checks of tests/test_distributed.py (float64, CPU).

Run by the test as ``python tests/_dist_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set. Every check records numbers and booleans in ``OUT_DIR/rank{r}.json``; the
test asserts on them (the single-process references are computed here, on the full global
batch, with a plain model and no collective). Checks are grouped in one launch because
starting processes costs seconds.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _dist_launch import worker_main  # noqa: E402  (this script's folder is on sys.path)
from awpfast import AWP  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # two ranks on a small CPU: oversubscribed threads cost 10x here
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
B = 8                      # global batch
LOCAL = B // WORLD
OPT = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


class Net(nn.Module):
    """Odd layer sizes so that FSDP2 shards unevenly (the gate's weight is one row: the
    second rank's shard of it is empty)."""

    def __init__(self, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2)
        self.fc = nn.Linear(20, 3)
        self.gate = nn.Linear(3, 1)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.bn(self.conv1(x))))).flatten(1)
        z = self.fc(h)
        return z * (1 + torch.sigmoid(self.gate(torch.tanh(z))))


def make_net(bn=False, seed=0):
    torch.manual_seed(seed)
    return Net(bn)


def data(step, n=B):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def local(x, y):
    return x[RANK * LOCAL:(RANK + 1) * LOCAL], y[RANK * LOCAL:(RANK + 1) * LOCAL]


def train_step(model, awp, x, y, micro=1, mode="closure"):
    if micro == 1:
        awp.perturb(lambda: F.cross_entropy(model(x), y))
    else:
        xs, ys = x.chunk(micro), y.chunk(micro)
        closures = [lambda a=a, b=b: F.cross_entropy(model(a), b) / micro for a, b in zip(xs, ys)]
        if mode == "accumulate":
            for c in closures:
                awp.accumulate(c)
            awp.perturb()
        else:
            awp.perturb(closures)
    awp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    awp.step()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def max_rel(params, ref_params):
    return max(rel(a.detach(), b.detach()) for a, b in zip(params, ref_params))


def gathered_equal(t):
    """Whether every rank holds bitwise the same tensor."""
    t = t.detach().reshape(-1).clone()
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return all(torch.equal(out[0], o) for o in out[1:])


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Counter:
    """Counts the collectives issued through the Python API (awpfast's) and DDP's buffer syncs."""

    def __init__(self, ddp=None):
        self.n = {"all_reduce": 0, "bytes": 0, "buffer_sync": 0}
        self._orig = dist.all_reduce
        self._ddp = ddp

    def __enter__(self):
        def all_reduce(t, *a, **k):
            self.n["all_reduce"] += 1
            self.n["bytes"] += t.numel() * t.element_size()
            return self._orig(t, *a, **k)
        dist.all_reduce = all_reduce
        if self._ddp is not None:
            orig = self._ddp._sync_buffers

            def sync():
                self.n["buffer_sync"] += 1
                return orig()
            self._ddp._sync_buffers = sync
        return self.n

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
        if self._ddp is not None:
            del self._ddp._sync_buffers


def reference_run(steps, restore, awp_steps=1, bn=False, micro=1):
    """Single process, full global batch, plain model: parameters after each step."""
    model = make_net(bn)
    awp = AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01, restore=restore, steps=awp_steps,
              backend="foreach")
    out = []
    for s in range(steps):
        train_step(model, awp, *data(s))
        out.append([p.detach().clone() for p in model.parameters()])
    return out


# ----------------------------------------------------------------------------- DDP
def ddp_model(bn=False, **kw):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(make_net(bn), **kw)


def check_ddp_global(res):
    for restore, awp_steps, micro, mode in [("after_step", 1, 1, "closure"), ("before_step", 1, 1, "closure"),
                                            ("after_step", 2, 1, "closure"), ("after_step", 1, 2, "accumulate"),
                                            ("before_step", 1, 2, "closure")]:
        key = f"ddp_global_{restore}_k{awp_steps}_m{micro}_{mode}"
        ref = reference_run(3, restore, awp_steps)
        model = ddp_model()
        awp = AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01, restore=restore,
                  steps=awp_steps, backend="foreach")
        errs, equal, counts = [], [], None
        for s in range(3):
            x, y = local(*data(s))
            if s == 0:
                with Counter(model) as counts:
                    if micro == 1:
                        awp.perturb(lambda: F.cross_entropy(model(x), y))
                    else:
                        for c in [lambda a=a, b=b: F.cross_entropy(model(a), b) / micro
                                  for a, b in zip(x.chunk(micro), y.chunk(micro))]:
                            awp.accumulate(c)
                        awp.perturb()
                counts = dict(counts)
                awp.zero_grad()
                F.cross_entropy(model(x), y).backward()
                awp.step()
            else:
                train_step(model, awp, x, y, micro, mode)
            errs.append(max_rel(model.module.parameters(), ref[s]))
            equal.append(gathered_equal(flat_params(model)))
        sel_bytes = sum(p.numel() * p.element_size() for n, p in model.module.named_parameters()
                        if n in awp.perturbed_parameters)
        res[key] = {"max_rel": max(errs), "ranks_equal": all(equal), "perturb_collectives": counts,
                    "selected_bytes": sel_bytes, "kind": awp.distributed.kind,
                    "names": awp.perturbed_parameters}


def check_ddp_local_and_bn(res):
    for sync in ("local", "global"):
        model = ddp_model(bn=True, find_unused_parameters=(sync == "global"))
        awp = AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01, ascent_sync=sync)
        equal, bn_untouched, counts, dnorm_equal = [], [], [], []
        for s in range(3):
            x, y = local(*data(s))
            bufs = [b.detach().clone() for b in model.module.buffers()]
            with Counter(model) as c:
                awp.perturb(lambda: F.cross_entropy(model(x), y))
            counts.append(dict(c))
            bn_untouched.append(all(torch.equal(a, b) for a, b in zip(bufs, model.module.buffers())))
            dnorm_equal.append(gathered_equal(awp.last_direction_norms))
            awp.zero_grad()
            F.cross_entropy(model(x), y).backward()
            awp.step()
            equal.append(gathered_equal(flat_params(model)))
        res[f"ddp_{sync}_bn"] = {"ranks_equal": equal, "bn_untouched": bn_untouched, "collectives": counts,
                                 "direction_norms_equal": dnorm_equal, "restore": awp.restore_mode}
    try:
        AWP(torch.optim.SGD(model.parameters(), **OPT), model, ascent_sync="local", restore="after_step")
        res["ddp_local_after_step_error"] = None
    except ValueError as e:
        res["ddp_local_after_step_error"] = str(e)


def check_ddp_checkpoint(res, tmp):
    def fresh():
        model = ddp_model()
        return model, AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01)
    model, awp = fresh()
    for s in range(4):
        if s == 2:
            if RANK == 0:
                torch.save({"model": model.module.state_dict(), "opt": awp.state_dict()}, os.path.join(tmp, "ddp.pt"))
            dist.barrier()
        train_step(model, awp, *local(*data(s)))
    model2, awp2 = fresh()
    ck = torch.load(os.path.join(tmp, "ddp.pt"), weights_only=True)
    model2.module.load_state_dict(ck["model"])
    awp2.load_state_dict(ck["opt"])
    for s in (2, 3):
        train_step(model2, awp2, *local(*data(s)))
    res["ddp_checkpoint"] = {"resumed_equal": torch.equal(flat_params(model), flat_params(model2)),
                             "ranks_equal": gathered_equal(flat_params(model2)),
                             "perturb_count": awp2.perturb_count}


def check_ddp_one_rank_group(res):
    """DDP over a process group of one rank (as on a 1-GPU machine): no collective, and the
    same result as a plain model on that rank's batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    groups = [dist.new_group([r]) for r in range(WORLD)]   # every rank creates every group
    model = DDP(make_net(), process_group=groups[RANK])
    plain = make_net()
    awps = [AWP(torch.optim.SGD(m.parameters(), **OPT), m, gamma=0.01) for m in (model, plain)]
    with Counter(model) as c:
        for s in range(2):
            x, y = local(*data(s))
            train_step(model, awps[0], x, y)
            train_step(plain, awps[1], x, y)
    res["ddp_one_rank"] = {"world_size": awps[0].distributed.world_size, "collectives": dict(c),
                           "equal_plain": torch.equal(flat_params(model), flat_params(plain))}


# ----------------------------------------------------------------------------- FSDP2
def fsdp_model(bn=False, root_params=False):
    """Every layer its own FSDP2 unit; ``root_params``: fc and gate stay in the root unit, which
    keeps its parameters unsharded from its forward to its backward (as awpfast-train's small CNN)."""
    from torch.distributed.fsdp import fully_shard
    m = make_net(bn)
    for sub in (m.conv1, m.conv2) if root_params else (m.conv1, m.conv2, m.fc, m.gate):
        fully_shard(sub)
    fully_shard(m)
    return m


def full(model):
    return [p.full_tensor().detach() for p in model.parameters()]


def check_fsdp(res):
    # each step's perturb() runs with the previous step's .grad still set (zero_grad comes after it)
    for restore, awp_steps, micro, mode, root in [("after_step", 1, 1, "closure", False),
                                                  ("before_step", 1, 1, "closure", False),
                                                  ("after_step", 3, 1, "closure", False),
                                                  ("after_step", 1, 2, "accumulate", False),
                                                  ("after_step", 1, 1, "closure", True)]:
        key = f"fsdp_{restore}_k{awp_steps}_m{micro}" + ("_root" if root else "")
        ref = reference_run(3, restore, awp_steps)
        model = fsdp_model(root_params=root)
        awp = AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01, restore=restore, steps=awp_steps)
        errs, equal = [], []
        for s in range(3):
            train_step(model, awp, *local(*data(s)), micro=micro, mode=mode)
            f = full(model)
            errs.append(max_rel(f, ref[s]))
            equal.append(gathered_equal(torch.cat([t.reshape(-1) for t in f])))
        res[key] = {"max_rel": max(errs), "ranks_equal": all(equal), "kind": awp.distributed.kind}


def check_fsdp_memory_and_grads(res):
    from torch.utils._python_dispatch import TorchDispatchMode
    model = fsdp_model()
    awp = AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01)
    x, y = local(*data(0))
    F.cross_entropy(model(x), y).backward()           # the user's own gradients, to be left alone
    grads = {id(p): p.grad for p in model.parameters()}
    locs = {id(p): p.grad.to_local().clone() for p in model.parameters()}

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if type(a) is torch.Tensor}
            for t in torch.utils._pytree.tree_leaves(out):   # new plain-tensor storage only (no views)
                if type(t) is torch.Tensor and t.untyped_storage().data_ptr() not in ins:
                    self.max = max(self.max, t.numel())
            return out

    awp.accumulate(lambda: F.cross_entropy(model(x), y))
    with Sizes() as sizes:
        awp.perturb()                                  # norms, all-reduce, apply: shard-sized only
        awp.restore()
    awp.perturb(lambda: F.cross_entropy(model(x), y))
    grads_kept = all(p.grad is grads[id(p)] and torch.equal(p.grad.to_local(), locs[id(p)])
                     for p in model.parameters())
    sel = [p for n, p in model.named_parameters() if n in awp.perturbed_parameters]
    local_numel = sum(p.to_local().numel() for p in sel)
    full_numel = sum(p.numel() for p in sel)
    awp.restore()
    res["fsdp_memory"] = {
        "buffer_numel": awp._sel.buffer_numel(), "local_numel": local_numel, "full_numel": full_numel,
        "store_deltas": awp._sel.store_deltas, "max_alloc_numel": sizes.max,
        "max_local_shard": max(p.to_local().numel() for p in sel),
        "max_full_param": max(p.numel() for p in sel), "grads_kept": grads_kept}


def check_fsdp_checkpoint(res, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh():
        model = fsdp_model()
        return model, AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01)
    model, awp = fresh()
    path = os.path.join(tmp, "fsdp_ckpt")
    for s in range(4):
        if s == 2:
            msd, osd = get_state_dict(model, awp.optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            meta = awp.state_dict()["awpfast"]
        train_step(model, awp, *local(*data(s)))
    model2, awp2 = fresh()
    msd, osd = get_state_dict(model2, awp2.optimizer)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model2, awp2.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    awp2.perturb_count = meta["perturb_count"]
    for s in (2, 3):
        train_step(model2, awp2, *local(*data(s)))
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
    res["fsdp_checkpoint"] = {"resumed_equal": same, "awp_gamma_kept": awp2.param_groups[0].get("awp_gamma")}


# ----------------------------------------------------------------------------- errors
def check_errors(res):
    errs = {}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    for uop in (False, True):
        m = FSDP1(make_net(), device_id=torch.device("cpu"), use_orig_params=uop)
        try:
            AWP(torch.optim.SGD(m.parameters(), lr=0.1), m)
            errs[f"fsdp1_{uop}"] = None
        except ValueError as e:
            errs[f"fsdp1_{uop}"] = str(e)
    m = make_net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)     # built before fully_shard: holds the old params
    for sub in (m.conv1, m.conv2, m.fc, m.gate):
        from torch.distributed.fsdp import fully_shard
        fully_shard(sub)
    fully_shard(m)
    for key, fn in [("fsdp_stale_optimizer", lambda: AWP(opt, m)),
                    ("fsdp_local", lambda: AWP(torch.optim.SGD(m.parameters(), lr=0.1), m, ascent_sync="local"))]:
        try:
            fn()
            errs[key] = None
        except ValueError as e:
            errs[key] = str(e)
    res["errors"] = errs


def check_no_group(res):
    """After destroy_process_group: a DDP-global perturb says what is missing, nothing changes."""
    model = ddp_model()
    awp = AWP(torch.optim.SGD(model.parameters(), **OPT), model, gamma=0.01)
    x, y = local(*data(0))
    w0 = flat_params(model)
    dist.destroy_process_group()
    try:
        awp.perturb(lambda: F.cross_entropy(model.module(x), y))
        res["no_group_error"] = None
    except RuntimeError as e:
        res["no_group_error"] = str(e)
    res["no_group_unchanged"] = torch.equal(w0, flat_params(model)) and not awp.is_perturbed


def checks(out):
    """Every check of this file, in order (the checkpoint checks share ``OUT_DIR/shared``)."""
    tmp = os.path.join(out, "shared")
    os.makedirs(tmp, exist_ok=True)
    return [("ddp_global", check_ddp_global), ("ddp_local_and_bn", check_ddp_local_and_bn),
            ("ddp_checkpoint", lambda r: check_ddp_checkpoint(r, tmp)),
            ("ddp_one_rank", check_ddp_one_rank_group), ("fsdp", check_fsdp),
            ("fsdp_memory", check_fsdp_memory_and_grads),
            ("fsdp_checkpoint", lambda r: check_fsdp_checkpoint(r, tmp)),
            ("errors", check_errors), ("no_group", check_no_group)]


if __name__ == "__main__":
    worker_main(RANK, WORLD, checks)
