import contextlib
import faulthandler
import importlib.util
import os
import signal
import threading

import pytest

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the machine's cores: each
# runs torch on one intra-op thread (and so do the processes it starts), or OpenMP threads of
# two workers spin against each other on a 2-core machine (one test ran 7x slower so).
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if _XDIST_WORKER:
    torch.set_num_threads(1)

# Without CUDA the Triton backend runs on the interpreter; the flag must be set before
# anything imports triton (test collection may import the backend through the seam).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk cache keys its compiled C++ by the machine's vector ISA, not by an
# ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA override: a kernel cached by a plain run is then reused
# under the override and fails to compile ("'at::vec' has not been declared"). Give each override
# a cache of its own.
_isa = os.environ.get("ATEN_CPU_CAPABILITY", "") + os.environ.get("ONEDNN_MAX_CPU_ISA", "")
if _isa and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_awpfast_{_isa.lower()}")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_source(name: str, relpath: str):
    """The module in file ``relpath`` (relative to the repository root, e.g. a benchmark script
    or csrc/build.py, which are not packages), imported under ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; NaN never passes (returns inf)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def rand_tensors(shapes, dtype, scale=1.0, device="cpu"):
    """Fresh normal random tensors of ``shapes`` (drawn in float64, times ``scale``, then cast)."""
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype).to(device) for s in shapes]


def on_device(ts, device):
    """Copies of ``ts`` on ``device`` (always new storage)."""
    return [t.to(device, copy=True) for t in ts]


def poisoned(ts):
    """NaN-filled tensors like ``ts``: outputs a kernel must overwrite (NaN never passes)."""
    return [torch.full_like(t, float("nan")) for t in ts]


def many_mixed(n=1100):
    """``n`` (1,000+) random 1-D (params, directions) of 0-29 elements, float64 every third
    tensor and float32 otherwise: the many-tensor, mixed-dtype input of the seam tests."""
    shapes = [(int(s),) for s in torch.randint(0, 30, (n,))]
    dts = [torch.float32 if i % 3 else torch.float64 for i in range(n)]
    return ([torch.randn(s, dtype=dt) for s, dt in zip(shapes, dts)],
            [torch.randn(s, dtype=dt) for s, dt in zip(shapes, dts)])


def tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]


def cuda_reason(backend: str) -> str:
    """'' when seam backend ``backend`` runs its own code on CUDA here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    import awpfast.ops as ops
    mod, ok, why = ops._import(backend)
    if not ok:
        return f"backend {backend!r} unavailable: {why}"
    if not mod.supports_device(torch.device("cuda")):
        return f"backend {backend!r} does not support CUDA here"
    return ""


def backend_device_params(cpu_backends):
    """pytest params ``(backend, device)``: ``cpu_backends`` on the CPU, then every seam
    backend on CUDA (each skipped with its reason where it cannot run): the GPU run of the
    seam tests compares foreach, triton and native on CUDA with float64 on the CPU."""
    import awpfast.ops as ops
    out = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in cpu_backends]
    for b in ops.BACKENDS:
        why = cuda_reason(b)
        out.append(pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.skipif(bool(why), reason=why)))
    return out


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models and matmuls run faster so and are immune to a
    loaded machine (threads only add contention there). A whole module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with threads(1):
        yield


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a developer's AWPFAST_BACKEND must not leak in."""
    if os.environ.get("AWPFAST_TEST_KEEP_BACKEND") != "1":
        monkeypatch.delenv("AWPFAST_BACKEND", raising=False)


# --------------------------------------------------------------------------- per-test timeout
# AWPFAST_TEST_TIMEOUT=SECONDS (unset or 0: off) bounds every test, for one-shot runs such as
# benchmarks/gpu_check.py where a hung test must not eat the whole session (pytest-timeout is
# not a dependency). Two layers:
#   * SIGALRM raises TestTimeout inside the test after SECONDS: the test fails with that
#     message and the run goes on (works while Python code runs, e.g. a slow loop);
#   * faulthandler dumps every thread's stack and exits the process after 2*SECONDS + 30 s,
#     for a hang inside C/CUDA code where no Python signal handler can run. The caller's log
#     (run pytest with -v) then names the test that hung.
class TestTimeout(Exception):
    """A test ran longer than AWPFAST_TEST_TIMEOUT."""

    __test__ = False  # not a test class


def _timeout_s() -> float:
    try:
        return max(0.0, float(os.environ.get("AWPFAST_TEST_TIMEOUT", "0") or 0))
    except ValueError:
        return 0.0


def _can_alarm() -> bool:
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _timeout_s()
    if limit > 0:
        faulthandler.dump_traceback_later(2 * limit + 30, exit=True)
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = _timeout_s()
    if limit <= 0 or not _can_alarm():
        yield
        return

    def _alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} exceeded AWPFAST_TEST_TIMEOUT={limit:g} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than CI's budget allows; run by `make test-all`, not `make test`")


# Tests that take longest (process launches: torchrun, CLI runs, nvcc): run first, so that under
# pytest-xdist the last worker is not left alone with one of them at the end. Node-id prefixes;
# the order of everything else is unchanged.
LONG_FIRST = (
    "tests/test_readme.py::test_python_block_runs_as_printed[docs/continual.md",
    "tests/test_train_distributed.py::test_torchrun",
    "tests/test_cuda_compile.py::test_nvcc_compiles",
    "tests/test_rules_distributed.py",
    "tests/test_distributed.py",
    "tests/test_cheap_ascent.py::test_ddp",
    "tests/test_train_recipes.py::test_track_flatness_under_torchrun",
    "tests/test_compile.py::test_seam_ops_fullgraph",
    "tests/test_run_safety.py::test_two_concurrent",
    "tests/test_signals.py",
    "tests/test_packaging.py",
    "tests/test_gpu_check.py",
)


def pytest_collection_modifyitems(config, items):
    if not _XDIST_WORKER and not getattr(config.option, "numprocesses", None):
        return
    rank = {id(it): next((k for k, p in enumerate(LONG_FIRST) if it.nodeid.startswith(p)), len(LONG_FIRST))
            for it in items}
    items.sort(key=lambda it: rank[id(it)])  # stable: same-rank tests keep their order
