"""The parts of benchmarks/gpu_check.py that are not its section list, runner or summary: atomic
JSON, the child processes' environment, the sections that are not a benchmark module's or a
pytest run's (``sec_env``, ``sec_build``, ``sec_continual_cifar``: each ``(check, timeout) ->
(result, ok, status)``), and the pytest sections' command and results (JUnit XML, or the
``pytest -v`` log of a run killed before it wrote its XML)."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_ENV = "AWPFAST_GPU_CHECK_FAULT"  # test hook: "section:raise" or "section:exit"


class SectionSkip(Exception):
    """The section cannot run here (reason in the message); not a failure in a dry run."""


def _now():
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _tail(s, n=3000):
    s = s or ""
    return s[-n:]


def save_json(path, data):
    """Atomic rewrite: a reader (or a kill) never sees a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def child_env(dry: bool):
    env = dict(os.environ)
    if not dry:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    env.pop("AWPFAST_BACKEND", None)
    env.pop(FAULT_ENV, None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def versions():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
        info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda,
                    cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                        sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                        l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
    except Exception as e:
        info["torch_error"] = repr(e)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"unavailable ({type(e).__name__})"
    for name, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                                      "--format=csv,noheader"]),
                      ("nvcc", ["nvcc", "--version"])):
        if shutil.which(cmd[0]):
            try:
                q = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                out = q.stdout.strip()
                info[name] = out.splitlines()[-1] if name == "nvcc" and out else out
            except Exception:
                pass
    try:
        import importlib.util
        info["pytest_xdist"] = importlib.util.find_spec("xdist") is not None
    except Exception:
        info["pytest_xdist"] = False
    try:
        q = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["git_commit"] = q.stdout.strip()
        q = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["git_dirty"] = bool(q.stdout.strip())
    except Exception:
        pass
    if os.environ.get("AWPFAST_GIT_COMMIT"):
        # the device machine's copy of the working tree may carry a stale .git (seen 2026-11-27:
        # it named the session's first commit): the caller names the commit it sent
        info["git_commit"] = os.environ["AWPFAST_GIT_COMMIT"]
        info.pop("git_dirty", None)
    return info


def _cuda_extension_built():
    """Whether this tree holds a built ``awpfast._C_cuda`` for this Python (a device machine
    starts bare: ``--quick`` on a fresh one rebuilds before rerunning the failed sections)."""
    import sysconfig
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.exists(os.path.join(ROOT, "awpfast", "_C_cuda" + suffix))


# --------------------------------------------------------------------------- pytest results
def parse_junit(path):
    """Counts and failures from a JUnit XML file (None when missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except Exception:
        return None
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips, outcomes = [], {}, {}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {c.tag: c for c in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            el = kinds[tag]
            failures.append({"test": name, "kind": tag,
                             "message": _tail((el.get("message") or "") + "\n" + (el.text or ""), 600)})
            outcomes[name] = "failed" if tag == "failure" else "error"
        elif "skipped" in kinds:
            counts["skipped"] += 1
            why = (kinds["skipped"].get("message") or "")[:160]
            skips[why] = skips.get(why, 0) + 1
            outcomes[name] = "skipped"
        else:
            counts["passed"] += 1
            outcomes[name] = "passed"
    return {"counts": counts, "failures": failures[:60], "skip_reasons": skips, "outcomes": outcomes}


_LINE = re.compile(r"(\S+\.py::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b|"
                   r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+\.py::\S+)")


def parse_pytest_log(text):
    """Per-test outcomes from ``pytest -v`` output (plain or xdist), for a run killed before
    it wrote its JUnit XML."""
    outcome = {}
    for m in _LINE.finditer(text or ""):
        test = m.group(1) or m.group(4)
        outcome[test] = (m.group(2) or m.group(3)).lower()
    counts = {"tests": len(outcome), "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for o in outcome.values():
        key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}.get(o)
        if key:
            counts[key] += 1
    failures = [{"test": t, "kind": o, "message": ""} for t, o in outcome.items() if o in ("failed", "error")]
    m = re.search(r"(\d+) tests? collected", text or "") or re.search(r"collected (\d+) items?", text or "")
    collected = int(m.group(1)) if m else None
    return {"counts": counts, "failures": failures[:60], "collected": collected, "from": "log",
            "outcomes": outcome}


def native_status(py, env, timeout):
    """The installed extensions' state, asked of a fresh interpreter: ``({native_cpu, cuda_status,
    backends} or None, its stdout, its stderr)``."""
    code = ("import json, torch, awpfast.ops as o; from awpfast.ops import native as n; "
            "print('STATUS ' + json.dumps({'native_cpu': list(n.available()), 'cuda_status': "
            "list(n.cuda_status()) if torch.cuda.is_available() else [False, 'no CUDA device'], "
            "'backends': o.available_backends()}))")
    q = subprocess.run([py, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in q.stdout.splitlines() if ln.startswith("STATUS ")), None)
    return (json.loads(line[7:]) if line else None), q.stdout, q.stderr


def pytest_command(py, files, kexpr, xml, dry, xdist):
    """A pytest section's command: collection only in a dry run; else verbose, JUnit XML to ``xml``,
    4 xdist workers where pytest-xdist is installed."""
    cmd = [py, "-m", "pytest", "-p", "no:cacheprovider"]
    if dry:
        cmd += ["--collect-only", "-q"]
    else:
        cmd += ["-v", "-rfE", "--durations=15", f"--junitxml={xml}", "-o", "junit_family=xunit2"]
        cmd += ["-n", "4"] if xdist else []
    return cmd + files + (["-k", kexpr] if kexpr else [])


def pytest_result(xml, log_text, dry, rc, extra):
    """``(result, ok, status)`` of a pytest section from its JUnit XML, or from its log when it has
    none (a dry run, a run killed at its cap: ``rc`` None); ``extra`` joins the result."""
    res = (parse_junit(xml) if not dry else None) or parse_pytest_log(log_text)
    res.update(rc=rc, **extra)
    if rc is None:
        res["note"] = "timed out: counts come from the log lines up to the kill"
        return res, False, "timeout"
    c = res["counts"]
    if dry:
        ok = rc == 0 and (res.get("collected") or 0) > 0
    else:
        ok = rc == 0 and c["failed"] == 0 and c["errors"] == 0 and c["passed"] > 0
    return res, ok, "ok" if ok else "failed"


# --------------------------------------------------------------------------- the own sections
def sec_env(chk, timeout):
    info = versions()
    chk.data["versions"] = info
    if not chk.dry:
        chk.data["device"] = info.get("device", chk.data.get("device"))
    return info, chk.dry or info.get("cuda_available", False), "ok"


def sec_build(chk, timeout):
    res = {}
    ok_build = True
    if not chk.dry:
        env = dict(chk.env)
        env["AWPFAST_CUDA"] = "1"
        env.setdefault("AWPFAST_CUDA_ARCHS", "90")
        res["cuda_archs"] = env["AWPFAST_CUDA_ARCHS"]
        rc, sec = chk.sub([chk.py, "setup.py", "build_ext", "--inplace", "-j", "8"], max(10, timeout - 20), env)
        res.update(build_rc=rc, build_seconds=round(sec, 1))
        ok_build = rc == 0
        if not ok_build:
            chk.say("!!! BUILD FAILED (AWPFAST_CUDA=1): the native CUDA kernels are missing; see gpu_check.log")
    else:
        res["build"] = "skipped in a dry run (status of the installed extensions only)"
    status, out, err = native_status(chk.py, chk.env, max(10, min(60, timeout)))
    chk.log(out + err)
    res.update(status or {"status_error": _tail(err, 1500)})
    cuda_ok = bool(res.get("cuda_status", [False])[0])
    if not chk.dry and not cuda_ok:
        chk.say(f"!!! native CUDA kernels NOT usable: {res.get('cuda_status')}")
    ok = ok_build and status is not None and (chk.dry or cuda_ok)
    return res, ok, "ok" if ok else "failed"


def sec_continual_cifar(chk, timeout):
    data = os.path.join(chk.tmp, "cifar-100-python")
    n = (3, 2) if chk.dry else (100, 20)
    code = f"from awpfast.continual.cifar import write_synthetic_cifar100 as w; w({data!r}, {n[0]}, {n[1]})"
    t0 = time.time()
    rc, _ = chk.sub([chk.py, "-c", code], max(10, timeout / 3))
    res, ok = {"write_rc": rc}, rc == 0
    methods = ("gpm",) if chk.dry else ("gpm", "fs-dgpm")  # second-order FS on a CPU: too slow for a dry run
    for i, method in enumerate(methods if ok else ()):
        left = (timeout - (time.time() - t0)) / (len(methods) - i)
        args = ["-m", "awpfast.continual", "--preset", "cifar100-paper", "--method", method, "--data-dir", data,
                "--tasks", "2", "--epochs", "1", "--quiet", "--overwrite", "--device", "cpu" if chk.dry else "cuda"]
        r, rc = chk._script(args + (["--samples-per-task", "8"] if chk.dry else []), max(5, left), f"cl_{method}.json")
        A = r.get("acc_matrix") or []
        res[method] = {k: r.get(k) for k in ("rc", "device", "acc", "seconds_per_task", "basis_sizes")}
        ok = ok and rc == 0 and len(A) == 2 and all(len(row) == 2 for row in A)
    return res, ok, "ok" if ok else "failed"
