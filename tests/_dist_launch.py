"""The 2-process gloo machinery shared by the distributed tests (CPU).

Test side: :func:`skip_without_gloo` at module level, then :func:`launch` starts one worker
script on ``WORLD`` ranks and returns their JSON reports (a rank that wrote none, or raised,
fails the test with its output). Worker side: :func:`worker_main` initializes the process
group, runs the checks, times each one and writes ``OUT_DIR/rank{r}.json``. Every check of a
test file runs in one launch because starting processes costs seconds on a small machine.
"""
import json
import os
import socket
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2


def skip_without_gloo():
    """Skip the calling test module when torch.distributed with gloo is not available."""
    import pytest
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Under pytest-xdist each worker (``gw<N>``) takes its ports from a range of its own, so two
    workers launching process groups at the same moment cannot be handed the same port (the
    kernel's ephemeral ports of ``bind(0)`` carry no such promise); within a worker the tests
    run one after another."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        base = 30000 + 400 * (int(worker[2:]) % 50)
        start = int.from_bytes(os.urandom(2), "little") % 400
        for k in range(400):
            port = base + (start + k) % 400
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, out, world=WORLD, timeout=300):
    """Run ``tests/<worker> OUT`` on ``world`` gloo ranks (one thread each, no AWPFAST_BACKEND
    from the caller's environment) and return the ranks' reports, rank order."""
    import pytest
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("AWPFAST_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, worker), str(out)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for r in range(world):
        path = os.path.join(str(out), f"rank{r}.json")
        if not os.path.exists(path):
            pytest.fail(f"rank {r} wrote no report; its output:\n{logs[r][-4000:]}")
        with open(path) as f:
            rep = json.load(f)
        if "exception" in rep:
            pytest.fail(f"rank {r} raised:\n{rep['exception']}")
        reports.append(rep)
    return reports


def worker_main(rank, world, checks):
    """A worker's main: init gloo, run ``checks(out_dir)`` (a list of ``(name, fn(res))``, built
    after the process group exists), record each check's seconds in ``res['seconds']`` and any
    exception's traceback in ``res['exception']``, write ``OUT_DIR/rank{rank}.json`` (OUT_DIR is
    ``sys.argv[1]``) and exit 1 on an exception."""
    import torch.distributed as dist
    out = sys.argv[1]
    res = {}
    times = res["seconds"] = {}
    try:
        t0 = time.perf_counter()
        dist.init_process_group("gloo", rank=rank, world_size=world)
        times["init"] = round(time.perf_counter() - t0, 2)
        for name, fn in checks(out):
            t0 = time.perf_counter()
            fn(res)
            times[name] = round(time.perf_counter() - t0, 2)
    except BaseException:
        res["exception"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1 if "exception" in res else 0)
