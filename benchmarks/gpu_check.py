#!/usr/bin/env python
"""One-shot check of awpfast on a CUDA machine: build, correctness, then speed.

    python benchmarks/gpu_check.py OUTDIR              # the full run (about 8 minutes on an H100)
    python benchmarks/gpu_check.py --quick OUTDIR      # rerun only the sections that are not ok
    python benchmarks/gpu_check.py --dry-run OUTDIR    # the plumbing, on a machine without CUDA

Sections, in order of value (correctness first); each has a time cap and runs as a
subprocess, so a crash, a hang or a CUDA error in one of them cannot take the others down:

  env           GPU name, driver, torch / triton / nvcc versions, git commit (in-process)
  build         ``AWPFAST_CUDA=1 python setup.py build_ext --inplace`` (a failed CUDA build
                is an error, not a warning; AWPFAST_CUDA_ARCHS defaults to 90), then
                ``native.cuda_status()`` and the available backends in a fresh process
  tests_kernels pytest over tests/test_ops.py, test_ops_add_scaled.py, test_native.py,
                test_triton.py with ``-k "not cpu"`` (every backend on CUDA against float64)
  tests_cuda    pytest over tests/test_cuda_*.py (full AWP step under CUDA-graph capture,
                streams, attacks, AWP on CUDA)
  ddp_smoke     benchmarks/ddp_smoke.py: a 1-rank NCCL DDP model through ``awpfast.AWP``
  bench_weight  benchmarks/bench_weight_side.py: perturb+restore, PreActResNet-18 and
                WRN-34-10, fp32 and bf16, every backend, verified against float64 first
  bench_pgd     benchmarks/bench_pgd.py: one PGD step, batch 128x3x32x32, verified
  bench_train   benchmarks/bench_train_step.py: AT-AWP training step, WRN-34-10, batch 128
  tests_family  pytest over tests/test_kernels_family.py, test_ops_family.py with ``-k "not cpu"``
                (SAM / ASAM / Box AWP seam ops on CUDA against float64, capture, no host sync)
  bench_family  benchmarks/bench_family_kernels.py: the family seam ops on WRN-34-10 per
                backend, error against float64 in every row (ok below 1e-4)
  tests_compile pytest over tests/test_compile.py on CUDA (Inductor compiles: slow)
  continual_cifar  python -m awpfast.continual --preset cifar100-paper, GPM and FS-DGPM, 2 tasks x 1
                epoch on synthetic files in the cifar-100-python format (AlexNet, multi-head, conv
                bases, second-order FS step on CUDA); ok when both runs finish with a 2 x 2 matrix
                (a dry run: GPM only, 8 images per task, on the CPU)
  bench_ladder  benchmarks/bench_train_step.py --ladder: the ablation ladder of a training step
                (issue 19), WRN-34-10, batch 128, PGD-10, 10 measured rounds after 2 warm-up
                rounds: (a) reference pattern, (b) awpfast AWP with the same train-mode attack,
                (c) + input-only attack gradients, (d) + eval-mode attack, (e) + bf16, (f) +
                channels_last, and the cheap-ascent rows (attack-sourced, ascent_every 2 and 4)
                at the settings of (d) and (f); last, so that a short budget skips it first
                (``--only bench_ladder`` runs it alone, about 2 minutes on an H100)
  bench_compile benchmarks/bench_compile.py (issue 21): one whole AT-AWP step (PGD-10, AWP,
                descent, SGD) eager against torch.compile(mode="reduce-overhead"), WRN-34-10,
                bf16, batch 128: compile time cold (fresh Inductor cache) and warm, steady-state
                ms (median of 10 steps), graphs, graph breaks and fallbacks by site, anything
                compiled again in steady state

Tests run without ``-x``, with a per-test timeout (AWPFAST_TEST_TIMEOUT, see
tests/conftest.py) and, where pytest-xdist is installed, 4 worker processes.

Everything goes into OUTDIR (at most 6 files, so that a device call can bring all back):

  gpu_check.json   rewritten atomically at the start and end of every section: top-level
                   ``device``, per-section ``ok``/``status``/``seconds``/``result``, the
                   issue-8 targets met or missed, a text summary. A run killed at any point
                   leaves every finished section in it (the running one says "running").
  gpu_check.log    the full output of every subprocess, appended section by section
  pytest_<section>.xml   JUnit XML of the four pytest sections

``--quick`` reads OUTDIR/gpu_check.json and reruns the sections whose ``ok`` is not true
(failed, timed out, skipped for lack of time, or missing), keeping the others.
An OUTDIR that already holds a gpu_check.json is refused unless ``--quick`` or
``--overwrite`` is given. Without CUDA and without ``--dry-run`` it exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"
SCHEMA = 2

# (name, cap in seconds on an H100, seconds kept in reserve for it while earlier sections run)
SECTIONS = [
    ("env", 30, 5),
    ("build", 150, 20),
    ("tests_kernels", 120, 30),
    ("tests_cuda", 100, 30),
    ("ddp_smoke", 45, 15),
    ("bench_weight", 100, 30),
    ("bench_pgd", 45, 15),
    ("bench_train", 100, 30),
    ("tests_family", 90, 20),
    ("bench_family", 60, 15),
    ("tests_compile", 90, 20),
    ("continual_cifar", 90, 20),
    ("bench_ladder", 240, 60),
    ("bench_compile", 300, 30),
]
NAMES = [n for n, _, _ in SECTIONS]
TESTS_KERNELS = ["tests/test_ops.py", "tests/test_ops_add_scaled.py", "tests/test_native.py", "tests/test_triton.py"]
TESTS_FAMILY = ["tests/test_kernels_family.py", "tests/test_ops_family.py"]
TEST_TIMEOUT_S = 60
FAULT_ENV = "AWPFAST_GPU_CHECK_FAULT"  # test hook: "section:raise" or "section:exit"


class SectionSkip(Exception):
    """The section cannot run here (reason in the message); not a failure in a dry run."""


# --------------------------------------------------------------------------- small helpers
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


# --------------------------------------------------------------------------- the runner
class Check:
    def __init__(self, outdir, dry, budget, quick, only, log_to_stdout=True):
        self.outdir, self.dry, self.budget, self.quick = outdir, dry, budget, quick
        self.json_path = os.path.join(outdir, JSON_NAME)
        self.log_path = os.path.join(outdir, LOG_NAME)
        self.t0 = time.time()
        self.env = child_env(dry)
        self.py = sys.executable
        self.tmp = tempfile.mkdtemp(prefix="awpfast_gpu_check_")
        self.only = only
        self.data = None
        self.current = None

    # ---------------------------------------------------------------- bookkeeping
    def left(self):
        return self.budget - (time.time() - self.t0)

    def log(self, text):
        with open(self.log_path, "a") as f:
            f.write(text)

    def say(self, text):
        print(f"[gpu_check {time.time() - self.t0:6.1f}s] {text}", flush=True)
        self.log(f"[gpu_check {_now()}] {text}\n")

    def save(self):
        self.data["updated"] = _now()
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        self.data["targets"] = targets(self.data)
        self.data["summary"] = summary(self.data)
        save_json(self.json_path, self.data)

    def start(self, previous):
        import torch
        dev = "cpu (dry run)" if self.dry else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?")
        run = {"started": _now(), "mode": "quick" if self.quick else ("dry-run" if self.dry else "full"),
               "budget_s": self.budget, "argv": sys.argv[1:]}
        if previous:
            self.data = previous
            self.data.setdefault("runs", []).append(run)
            self.data["device"] = self.data.get("device") or dev
        else:
            self.data = {"schema": SCHEMA, "device": dev, "dry_run": self.dry, "started": run["started"],
                         "runs": [run], "order": NAMES, "sections": {}}
        self.data["complete"] = False
        self.log(f"\n{'=' * 100}\n[gpu_check {_now()}] {run['mode']} run, budget {self.budget:.0f} s, "
                 f"argv {sys.argv[1:]}\n")
        self.save()

    # ---------------------------------------------------------------- one section
    def wanted(self, name):
        if self.only and name not in self.only:
            return False
        if self.quick:
            rec = self.data["sections"].get(name)
            if name == "build" and not self.dry and not _cuda_extension_built():
                return True  # a fresh machine: the native kernels must be built again for the rerun
            return not (rec and rec.get("ok") is True)
        return True

    def run_all(self):
        todo = [s for s in SECTIONS if self.wanted(s[0])]
        for i, (name, cap, _) in enumerate(todo):
            reserve = sum(r for _, _, r in todo[i + 1:])
            timeout = min(cap, self.left() - reserve)
            self.run_section(name, timeout)
        self.data["complete"] = True
        self.save()

    def run_section(self, name, timeout):
        rec = {"ok": False, "status": "running", "started": _now(), "timeout_s": round(timeout, 1)}
        if timeout < 10:
            rec.update(status="skipped", reason=f"no time left in the {self.budget:.0f} s budget; rerun with --quick")
            self.data["sections"][name] = rec
            self.say(f"{name}: skipped (no time left)")
            self.save()
            return
        self.data["sections"][name] = rec
        self.current = name
        self.save()  # a kill from here on leaves "running" for this section
        self.say(f"{name}: start (cap {timeout:.0f} s)")
        self.log(f"\n{'-' * 100}\n[section {name}] {_now()}\n")
        t = time.time()
        fault = os.environ.get(FAULT_ENV, "")
        try:
            if fault == f"{name}:exit":
                os._exit(3)  # test hook: the process dies mid-run
            if fault == f"{name}:raise":
                raise RuntimeError(f"injected fault in section {name} ({FAULT_ENV})")
            result, ok, status = getattr(self, "sec_" + name)(timeout)
            rec.update(result=result, ok=bool(ok), status=status)
        except SectionSkip as e:
            rec.update(status="skipped", reason=str(e), ok=self.dry)
        except Exception as e:  # a broken section is recorded; the next one runs
            import traceback
            rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=_tail(traceback.format_exc()))
            self.log(traceback.format_exc())
        rec["seconds"] = round(time.time() - t, 1)
        rec["finished"] = _now()
        self.current = None
        self.say(f"{name}: {rec['status']}{'' if rec['ok'] else ' (NOT OK)'} in {rec['seconds']} s")
        self.save()

    def sub(self, cmd, timeout, env=None):
        """Run ``cmd`` with its output appended to the log; (rc or None on timeout, seconds)."""
        self.log(f"$ {' '.join(cmd)}\n")
        t = time.time()
        with open(self.log_path, "a") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the whole process group (pytest workers too)
                p.wait()
                rc = None
                f.write(f"\n[gpu_check] TIMEOUT after {timeout:.0f} s: killed\n")
        return rc, time.time() - t

    def log_text_since(self, offset):
        with open(self.log_path) as f:
            f.seek(offset)
            return f.read()

    # ---------------------------------------------------------------- the sections
    def sec_env(self, timeout):
        info = versions()
        self.data["versions"] = info
        if not self.dry:
            self.data["device"] = info.get("device", self.data.get("device"))
        return info, self.dry or info.get("cuda_available", False), "ok"

    def sec_build(self, timeout):
        res = {}
        ok_build = True
        if not self.dry:
            env = dict(self.env)
            env["AWPFAST_CUDA"] = "1"
            env.setdefault("AWPFAST_CUDA_ARCHS", "90")
            res["cuda_archs"] = env["AWPFAST_CUDA_ARCHS"]
            rc, sec = self.sub([self.py, "setup.py", "build_ext", "--inplace", "-j", "8"], max(10, timeout - 20), env)
            res.update(build_rc=rc, build_seconds=round(sec, 1))
            ok_build = rc == 0
            if not ok_build:
                self.say("!!! BUILD FAILED (AWPFAST_CUDA=1): the native CUDA kernels are missing; see gpu_check.log")
        else:
            res["build"] = "skipped in a dry run (status of the installed extensions only)"
        code = ("import json, torch, awpfast.ops as o; from awpfast.ops import native as n; "
                "print('STATUS ' + json.dumps({'native_cpu': list(n.available()), 'cuda_status': "
                "list(n.cuda_status()) if torch.cuda.is_available() else [False, 'no CUDA device'], "
                "'backends': o.available_backends()}))")
        q = subprocess.run([self.py, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True,
                           timeout=max(10, min(60, timeout)))
        self.log(q.stdout + q.stderr)
        line = next((ln for ln in q.stdout.splitlines() if ln.startswith("STATUS ")), None)
        if line:
            res.update(json.loads(line[7:]))
        else:
            res["status_error"] = _tail(q.stderr, 1500)
        cuda_ok = bool(res.get("cuda_status", [False])[0])
        if not self.dry and not cuda_ok:
            self.say(f"!!! native CUDA kernels NOT usable: {res.get('cuda_status')}")
        ok = ok_build and line is not None and (self.dry or cuda_ok)
        return res, ok, "ok" if ok else "failed"

    def _pytest(self, name, files, kexpr, timeout):
        files = [f for f in files if os.path.exists(os.path.join(ROOT, f))]
        if not files:
            raise SectionSkip("no test files")
        xml = os.path.join(self.outdir, f"pytest_{name}.xml")
        cmd = [self.py, "-m", "pytest", "-p", "no:cacheprovider"]
        if self.dry:
            cmd += ["--collect-only", "-q"]
        else:
            cmd += ["-v", "-rfE", "--durations=15", f"--junitxml={xml}", "-o", "junit_family=xunit2"]
            if self.data.get("versions", {}).get("pytest_xdist"):
                cmd += ["-n", "4"]
        cmd += files
        if kexpr:
            cmd += ["-k", kexpr]
        env = dict(self.env)
        env["AWPFAST_TEST_TIMEOUT"] = str(TEST_TIMEOUT_S)
        offset = os.path.getsize(self.log_path)
        if os.path.exists(xml):
            os.remove(xml)
        rc, sec = self.sub(cmd, timeout, env)
        text = self.log_text_since(offset)
        res = (parse_junit(xml) if not self.dry else None) or parse_pytest_log(text)
        res.update(rc=rc, files=files, k=kexpr, seconds=round(sec, 1))
        if rc is None:
            res["note"] = "timed out: counts come from the log lines up to the kill"
            return res, False, "timeout"
        c = res["counts"]
        if self.dry:
            ok = rc == 0 and (res.get("collected") or 0) > 0
        else:
            ok = rc == 0 and c["failed"] == 0 and c["errors"] == 0 and c["passed"] > 0
        return res, ok, "ok" if ok else "failed"

    def sec_tests_kernels(self, timeout):
        return self._pytest("tests_kernels", TESTS_KERNELS, "not cpu", timeout)

    def sec_tests_cuda(self, timeout):
        files = sorted(os.path.relpath(os.path.join(ROOT, "tests", f), ROOT)
                       for f in os.listdir(os.path.join(ROOT, "tests"))
                       if f.startswith("test_cuda_") and f.endswith(".py") and f != "test_cuda_compile.py")
        return self._pytest("tests_cuda", files, None, timeout)

    def sec_tests_family(self, timeout):
        return self._pytest("tests_family", TESTS_FAMILY, "not cpu", timeout)

    def sec_bench_family(self, timeout):
        if self.dry:
            args = ["--device", "cpu", "--backends", "foreach", "--rules", "sam", "--reps", "1"]
        else:
            args = ["--device", "cuda", "--backends", "foreach,triton,native", "--reps", "20"]
        res, rc = self._script(["benchmarks/bench_family_kernels.py"] + args, timeout, "family.json")
        rows = res.get("rows", [])
        bad = [r for r in rows if not (r.get("max_rel_err_vs_fp64", 1.0) < 1e-4)]
        res["rows_not_ok"] = [{k: r.get(k) for k in ("rule", "backend", "max_rel_err_vs_fp64")} for r in bad]
        ok = rc == 0 and bool(rows) and not bad
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")

    def sec_tests_compile(self, timeout):
        return self._pytest("tests_compile", ["tests/test_compile.py"], None, timeout)

    def _script(self, args, timeout, json_name):
        path = os.path.join(self.tmp, json_name)
        if os.path.exists(path):
            os.remove(path)
        rc, sec = self.sub([self.py] + args + ["--json", path], timeout)
        res = load_json(path) or {}
        res["rc"], res["seconds"] = rc, round(sec, 1)
        if rc is None:
            res["note"] = "timed out: rows up to the kill"
        return res, rc

    def sec_ddp_smoke(self, timeout):
        dev = "cpu" if self.dry else "cuda"
        extra = ["--steps", "1", "--batch", "4"] if self.dry else []
        res, rc = self._script(["benchmarks/ddp_smoke.py", "--device", dev] + extra, timeout, "ddp.json")
        ok = rc == 0 and res.get("ok") is True
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")

    def _bench_ok(self, res, rc):
        rows = res.get("rows", [])
        bad = [r for r in rows if "error" in r or r.get("verified_ok") is False]
        res["rows_not_ok"] = [{k: r.get(k) for k in ("model", "norm", "dtype", "variant", "impl", "error", "err",
                                                    "err_v", "err_p", "restore_exact") if k in r} for r in bad]
        ok = rc == 0 and bool(rows) and not bad and res.get("complete", True)
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")

    def sec_bench_weight(self, timeout):
        if self.dry:
            args = ["--device", "cpu", "--models", "small-cnn", "--reps", "1"]
        else:
            args = ["--device", "cuda", "--dtypes", "float32,bfloat16", "--models", "preact18,wrn34-10",
                    "--reps", "20", "--k", "10"]
        res, rc = self._script(["benchmarks/bench_weight_side.py"] + args, timeout, "weight.json")
        return self._bench_ok(res, rc)

    def sec_bench_pgd(self, timeout):
        if self.dry:
            args = ["--device", "cpu", "--reps", "1", "--inner", "1", "--batch", "8"]
        else:
            args = ["--device", "cuda", "--dtypes", "float32,bfloat16", "--reps", "30", "--inner", "20"]
        res, rc = self._script(["benchmarks/bench_pgd.py"] + args, timeout, "pgd.json")
        return self._bench_ok(res, rc)

    def sec_bench_train(self, timeout):
        if self.dry:
            args = ["--device", "cpu", "--model", "small-cnn", "--batch", "4", "--attack-steps", "1",
                    "--repeats", "1", "--warmup", "0"]
        else:
            args = ["--device", "cuda", "--model", "wrn34-10", "--batch", "128", "--repeats", "3", "--warmup", "1"]
        res, rc = self._script(["benchmarks/bench_train_step.py"] + args, timeout, "train.json")
        ok = rc == 0 and bool(res.get("rows"))
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")

    def sec_continual_cifar(self, timeout):
        data = os.path.join(self.tmp, "cifar-100-python")
        n = (3, 2) if self.dry else (100, 20)
        code = f"from awpfast.continual.cifar import write_synthetic_cifar100 as w; w({data!r}, {n[0]}, {n[1]})"
        t0 = time.time()
        rc, _ = self.sub([self.py, "-c", code], max(10, timeout / 3))
        res, ok = {"write_rc": rc}, rc == 0
        methods = ("gpm",) if self.dry else ("gpm", "fs-dgpm")  # second-order FS on a CPU: too slow for a dry run
        for i, method in enumerate(methods if ok else ()):
            left = (timeout - (time.time() - t0)) / (len(methods) - i)
            r, rc = self._script(["-m", "awpfast.continual", "--preset", "cifar100-paper", "--method", method,
                                  "--data-dir", data, "--tasks", "2", "--epochs", "1", "--quiet", "--overwrite",
                                  "--device", "cpu" if self.dry else "cuda"] + (["--samples-per-task", "8"] if self.dry
                                                                                else []), max(5, left), f"cl_{method}.json")
            A = r.get("acc_matrix") or []
            res[method] = {k: r.get(k) for k in ("rc", "device", "acc", "seconds_per_task", "basis_sizes")}
            ok = ok and rc == 0 and len(A) == 2 and all(len(row) == 2 for row in A)
        return res, ok, "ok" if ok else "failed"

    def sec_bench_ladder(self, timeout):
        if self.dry:
            args = ["--device", "cpu", "--model", "small-cnn", "--batch", "4", "--attack-steps", "1",
                    "--repeats", "2", "--warmup", "0", "--rungs", "a,b,c,d,e,f", "--cheap-at", "d"]
        else:
            args = ["--device", "cuda", "--model", "wrn34-10", "--batch", "128", "--attack-steps", "10",
                    "--repeats", "10", "--warmup", "2", "--rungs", "a,b,c,d,e,f", "--cheap-at", "d,f"]
        res, rc = self._script(["benchmarks/bench_train_step.py", "--ladder"] + args, timeout, "ladder.json")
        ok = rc == 0 and bool(res.get("rungs")) and not res.get("partial", True)
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")

    def sec_bench_compile(self, timeout):
        if self.dry:  # the plumbing only: Dynamo with the eager backend, no Inductor build
            args = ["--device", "cpu", "--models", "small-cnn", "--batch", "2", "--attack-steps", "1",
                    "--steps", "1", "--warmup", "0", "--backend", "eager", "--no-warm"]
        else:
            args = ["--device", "cuda", "--models", "wrn34-10", "--dtype", "bfloat16", "--batch", "128",
                    "--attack-steps", "10", "--steps", "10", "--warmup", "2"]
        res, rc = self._script(["benchmarks/bench_compile.py"] + args, timeout, "compile.json")
        rows = res.get("rows", [])
        bad = [r for r in rows if "error" in r or r.get("fallbacks_in_awpfast")
               or (r.get("steady_state") or {}).get("frames")]
        res["rows_not_ok"] = [{k: r.get(k) for k in ("model", "error", "fallbacks_in_awpfast", "steady_state")}
                              for r in bad]
        ok = rc == 0 and bool(rows) and not bad and res.get("complete", False)
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")


# --------------------------------------------------------------------------- targets (issue 8)
def _t(value, target, ok, **kw):
    return dict(value=value, target=target, ok=ok, **kw)


def _res(data, name):
    return ((data.get("sections") or {}).get(name) or {}).get("result") or {}


def targets(data):
    """The GPU run's targets, each met (ok True), missed (False) or not measured (None)."""
    out = {}
    b = _res(data, "build")
    if "cuda_status" in b:
        out["native_cuda_kernels_usable"] = _t(bool(b["cuda_status"][0]), "true", bool(b["cuda_status"][0]),
                                               note=b["cuda_status"][1] or None)
    rows = _res(data, "bench_weight").get("rows", [])

    def row(model, dtype, variant):
        return next((r for r in rows if r.get("model") == model and r.get("dtype") == dtype
                     and r.get("variant") == variant and "median_ms" in r), None)

    def kernel_ms(r):
        return r.get("graph_ms") or r.get("loop_ms") or r["median_ms"]

    def steady_ms(r):
        return r.get("loop_ms") or r["median_ms"]

    for dt in ("float32", "bfloat16"):
        fe, ref = row("wrn34-10", dt, "foreach-simple"), row("wrn34-10", dt, "reference-eager")
        for be in ("triton", "native"):
            r = row("wrn34-10", dt, be)
            key = f"wrn_{dt}_{be}"
            if r is None:
                miss = next((q for q in rows if q.get("model") == "wrn34-10" and q.get("dtype") == dt
                             and q.get("variant") == be), None)
                if miss is not None:
                    out[key + "_x_floor"] = _t(None, "<= 1.25", False, note=miss.get("error", "no timing"))
                continue
            xf = kernel_ms(r) / r["floor_ms"]
            out[key + "_x_floor"] = _t(xf, "<= 1.25", xf <= 1.25, note=f"kernel time; one isolated call "
                                       f"{r['x_floor']:.2f}x floor", verified=r.get("verified_ok"))
            if fe:
                v = steady_ms(fe) / steady_ms(r)
                out[key + "_vs_foreach_simple"] = _t(v, ">= 2", v >= 2)
            if ref:
                v = steady_ms(ref) / steady_ms(r)
                out[key + "_vs_reference_eager"] = _t(v, ">= 20", v >= 20)
    prow = [r for r in _res(data, "bench_pgd").get("rows", []) if r.get("norm") == "Linf"
            and r.get("dtype") == "float32"]
    eager = next((r for r in prow if r["impl"] == "eager"), None)
    for r in prow:
        if r["impl"] == "eager":
            continue
        key = f"pgd_linf_{r['impl']}"
        if r.get("kernels") is not None:
            out[key + "_launches"] = _t(r["kernels"], "== 1", r["kernels"] == 1)
        sp = r.get("speedup_vs_eager")
        if sp is not None:
            note = None
            if "graph_us" in r:
                note = (f"kernel {r['graph_us']:.1f} us (graph replay), launch {r.get('launch_us', 0):.1f} us; "
                        f"eager kernel {(eager or {}).get('graph_us', float('nan')):.1f} us")
            out[key + "_vs_eager"] = _t(sp, ">= 3", sp >= 3, note=note)
    trows = {r["config"]: r for r in _res(data, "bench_train").get("rows", [])}
    fast = trows.get("awpfast bf16+cl")
    if fast:
        out["train_bf16cl_vs_reference_fp32"] = _t(fast["speedup_vs_reference_at_awp"], ">= 3.5",
                                                   fast["speedup_vs_reference_at_awp"] >= 3.5)
        out["train_at_awp_over_at"] = _t(fast["awp_overhead"], "<= 1.10", fast["awp_overhead"] <= 1.10)
        if "awp_extra_over_fwd_bwd" in fast:
            out["train_awp_extra_over_fwd_bwd"] = _t(fast["awp_extra_over_fwd_bwd"], "report (floor 1.0)", None)
    lad = {r["rung"]: r for r in _res(data, "bench_ladder").get("rungs", [])}
    if "a" in lad and "c" in lad:  # issue 19: the same algorithm, reported (no target)
        out["ladder_same_algorithm_a_to_c"] = _t(lad["c"].get("speedup_at_awp_vs_a"), "report", None,
                                                 note="AT-AWP step, reference pattern -> awpfast with the same "
                                                      "train-mode attack and input-only gradients (same x_adv)")
    for rung in ("c", "f"):
        if rung in lad:
            out[f"ladder_{rung}_awp_extra_over_fwd_bwd"] = _t(lad[rung].get("awp_extra_over_fwd_bwd"),
                                                              "report (floor 1.0)", None)
    outcomes = _res(data, "tests_cuda").get("outcomes") or {}
    for be in ("triton", "native"):
        got = sorted({o for t, o in outcomes.items() if "capture_full_awp_step" in t and be in t})
        if got:
            verdict = False if ("failed" in got or "error" in got) else (True if got == ["passed"] else None)
            out[f"cuda_graph_full_awp_step_{be}"] = _t("/".join(got), "replays equal eager", verdict)
    d = _res(data, "ddp_smoke")
    if d:
        out[f"ddp_1rank_{d.get('backend', '')}_smoke"] = _t(d.get("max_rel_diff"), "equal to no-DDP",
                                                            d.get("ok") is True, note=d.get("why") or d.get("error"))
    if data.get("dry_run"):  # CPU plumbing: nothing here is a GPU measurement
        for tv in out.values():
            tv["ok"] = None
            tv["note"] = "dry run (CPU): not a GPU result"
    return out


def summary(data):
    v = data.get("versions") or {}
    lines = [f"awpfast gpu_check on {data.get('device')} | torch {v.get('torch')} (CUDA {v.get('cuda_runtime')}) | "
             f"triton {v.get('triton')} | {v.get('nvcc', 'nvcc ?')} | commit {str(v.get('git_commit', '?'))[:10]}"
             + (" (dirty)" if v.get("git_dirty") else "")]
    b = _res(data, "build")
    if b and not (b.get("cuda_status") or [True])[0] and not data.get("dry_run"):
        lines.append(f"  !!! NATIVE CUDA KERNELS NOT USABLE: {b.get('cuda_status')} (build rc {b.get('build_rc')})")
    for name in data.get("order", NAMES):
        rec = (data.get("sections") or {}).get(name)
        if rec is None:
            lines.append(f"  {name:14s} not run")
            continue
        extra = ""
        res = rec.get("result") or {}
        if "counts" in res:
            c = res["counts"]
            extra = (f"  {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                     f"{c.get('skipped', 0)} skipped" + (f", {res['collected']} collected" if res.get("collected")
                                                         else ""))
            for f in res.get("failures", [])[:8]:
                extra += f"\n      {f['kind'].upper()} {f['test']}"
        elif res.get("rows_not_ok"):
            extra = f"  rows not ok: {res['rows_not_ok'][:4]}"
        elif rec.get("error") or rec.get("reason"):
            extra = "  " + (rec.get("error") or rec.get("reason"))[:160]
        lines.append(f"  {name:14s} {rec.get('status', '?'):8s} ok={str(rec.get('ok')):5s} "
                     f"{rec.get('seconds', 0):6.1f} s{extra}")
    w = _res(data, "bench_weight")
    if w.get("rows"):
        lines.append(f"  perturb+restore, ms per call (copy bw {w.get('copy_bandwidth_gbs', 0):.0f} GB/s): single / "
                     f"loop / graph, x floor (kernel), err, restore")
        for r in w["rows"]:
            if "median_ms" not in r:
                lines.append(f"    {r['model']:9s} {r['dtype']:9s} {r['variant']:16s} error {r.get('error', '')[:60]}")
                continue
            nan = float("nan")
            err = r.get("err_v", r.get("err_p", nan))
            kern = r.get("graph_ms") or r.get("loop_ms") or r["median_ms"]
            lines.append(f"    {r['model']:9s} {r['dtype']:9s} {r['variant']:16s} {r['median_ms']:8.3f} "
                         f"{r.get('loop_ms', nan):8.3f} {r.get('graph_ms', nan):8.3f} {kern / r['floor_ms']:6.2f}x "
                         f"{err:8.1e} {'exact' if r.get('restore_exact') else 'INEXACT'}")
    p = _res(data, "bench_pgd")
    if p.get("rows"):
        lines.append("  PGD step (batch %s): us loop / single / graph, vs eager, kernels, err" % p.get("batch"))
        for r in p["rows"]:
            nan = float("nan")
            lines.append(f"    {r['norm']:5s} {r['dtype']:9s} {r['impl']:8s} {r['median_us']:8.1f} "
                         f"{r.get('single_us', nan):8.1f} {r.get('graph_us', nan):8.1f} "
                         f"{(r.get('speedup_vs_eager') or 0):6.2f}x {str(r.get('kernels')):>4s} {r.get('err', nan):8.1e}")
    t = _res(data, "bench_train")
    if t.get("rows"):
        lines.append("  train step: AT-AWP ms, AT ms, AWP/AT, fwd+bwd ms, AWP extra / fwd+bwd, vs reference")
        for r in t["rows"]:
            lines.append(f"    {r['config']:18s} {r['at_awp_ms']:8.1f} {r['at_ms']:8.1f} {r['awp_overhead']:6.3f} "
                         f"{r.get('fwd_bwd_ms', float('nan')):8.1f} {r.get('awp_extra_over_fwd_bwd', float('nan')):6.3f} "
                         f"{r['speedup_vs_reference_at_awp']:6.2f}x")
    lr = _res(data, "bench_ladder")
    if lr.get("rungs"):
        la = (lr.get("loadavg") or {}).get("one_minute_median")
        lines.append(f"  ladder ({lr.get('model')}, batch {lr.get('batch')}, PGD-{lr.get('attack_steps')}, "
                     f"{lr.get('measured_rounds')} rounds, load {la}): AT-AWP ms, AT ms, AWP extra ms, "
                     "extra / fwd+bwd, vs (a)")
        for r in lr["rungs"]:
            lines.append(f"    ({r['rung']}) {r['name'][:30]:30s} {r['at_awp_ms']['median']:8.1f} "
                         f"{r['at_ms']['median']:8.1f} {r['awp_extra_ms']['median']:7.1f} "
                         f"{r['awp_extra_over_fwd_bwd']:6.2f} {r.get('speedup_at_awp_vs_a', float('nan')):6.2f}x")
        for r in lr.get("cheap_rows", []):
            if "step_ms" in r:
                lines.append(f"    at ({r['at_rung']}) {r['label']:10s} step {r['step_ms']:8.1f} ms, extra "
                             f"{r['awp_extra_ms']:7.1f} ms, {r['awp_extra_over_fwd_bwd']:5.2f} x fwd+bwd")
    fk = _res(data, "bench_family")
    if fk.get("rows"):
        lines.append(f"  family seam ops on WRN-34-10, ms (copy bw {fk.get('copy_bandwidth_gbs', 0):.0f} GB/s): "
                     "median, x floor, vs first backend, err vs float64")
        for r in fk["rows"]:
            lines.append(f"    {r['rule']:19s} {r['backend']:8s} {r['median_ms']:8.3f} {r['x_floor']:6.2f}x "
                         f"{r['speedup_vs_first']:6.2f}x {r['max_rel_err_vs_fp64']:8.1e}")
    tg = data.get("targets") or {}
    if tg:
        lines.append("  targets:")
        for k, tv in tg.items():
            val = tv["value"]
            val = f"{val:.3g}" if isinstance(val, float) else str(val)
            verdict = {True: "MET", False: "MISSED", None: "(report)"}[tv["ok"]]
            lines.append(f"    {k:36s} {val:>14s} (target {tv['target']}) {verdict}"
                         + (f"  [{tv['note']}]" if tv.get("note") else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="results folder (created; holds gpu_check.json, gpu_check.log, pytest XML)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="exercise the plumbing without CUDA (CPU, tiny sizes)")
    ap.add_argument("--quick", action="store_true", help="rerun only the sections of OUTDIR/gpu_check.json "
                                                         "that are not ok")
    ap.add_argument("--only", default=None, help=f"comma list of sections to run (of {','.join(NAMES)})")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR/gpu_check.json")
    a = ap.parse_args(argv)

    only = None
    if a.only:
        only = [s.strip() for s in a.only.split(",") if s.strip()]
        bad = [s for s in only if s not in NAMES]
        if bad:
            print(f"gpu_check: unknown section(s) {bad}; choose from {', '.join(NAMES)}", file=sys.stderr)
            return 2
    if os.path.exists(a.outdir) and not os.path.isdir(a.outdir):
        print(f"gpu_check: {a.outdir} is a file, not a folder; give a folder for the results", file=sys.stderr)
        return 2
    json_path = os.path.join(a.outdir, JSON_NAME)
    previous = load_json(json_path) if os.path.exists(json_path) else None
    if a.quick and previous is None:
        print(f"gpu_check: --quick needs an earlier run's {json_path} (copy it there first)", file=sys.stderr)
        return 2
    if previous is not None and not a.quick and not a.overwrite:
        print(f"gpu_check: {json_path} already holds a run; pass --quick to rerun its failed sections, "
              "--overwrite to replace it, or give a new folder", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available() and not a.dry_run:
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a CUDA "
              "machine, or pass --dry-run to exercise the plumbing on the CPU.", file=sys.stderr)
        return 2
    if previous is not None and a.quick and bool(previous.get("dry_run")) != bool(a.dry_run):
        print("gpu_check: --quick must match the earlier run's mode (dry run or not)", file=sys.stderr)
        return 2
    os.makedirs(a.outdir, exist_ok=True)
    chk = Check(a.outdir, a.dry_run, a.budget, a.quick, only)
    if a.overwrite and not a.quick:
        previous = None
        for name in os.listdir(a.outdir):
            if name in (JSON_NAME, LOG_NAME) or (name.startswith("pytest_") and name.endswith(".xml")):
                os.remove(os.path.join(a.outdir, name))

    def on_term(signum, frame):  # the caller's timeout: record which section was running
        if chk.data is not None and chk.current:
            chk.data["sections"][chk.current].update(status="killed", ok=False, error=f"signal {signum}")
            chk.save()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    chk.start(previous if a.quick else None)
    try:
        chk.run_all()
    finally:
        shutil.rmtree(chk.tmp, ignore_errors=True)
    text = chk.data["summary"]
    print("\n" + text + f"\n  total {chk.data['elapsed_s']} s" + (" (DRY RUN: CPU plumbing only)" if a.dry_run else ""))
    print(f"wrote {json_path}")
    bad = [n for n, r in chk.data["sections"].items() if not r.get("ok")]
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
