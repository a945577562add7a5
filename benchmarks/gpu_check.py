#!/usr/bin/env python
"""One-shot check of awpfast on a CUDA machine: build, correctness, then speed.

    python benchmarks/gpu_check.py OUTDIR              # the full run (about 8 minutes on an H100)
    python benchmarks/gpu_check.py --quick OUTDIR      # rerun only the sections that are not ok
    python benchmarks/gpu_check.py --dry-run OUTDIR    # the plumbing, on a machine without CUDA

:data:`SECTIONS` (in order of value, correctness first; benchmarks/README.md describes each): the
environment, the CUDA build, four pytest sections, the DDP smoke test, the benchmarks and a
continual-learning run, each a subprocess with a time cap, so a crash, a hang or a CUDA error in
one cannot take the others down. A benchmark section runs its script with ``--json`` and asks the
script's module for its ``verdict``, ``summary_lines`` and ``targets``: no benchmark's rows are
read here. Tests run without ``-x``, with a per-test timeout (AWPFAST_TEST_TIMEOUT, see
tests/conftest.py) and, where pytest-xdist is installed, 4 worker processes.

OUTDIR gets gpu_check.json (rewritten atomically at the start and end of every section: ``device``,
per-section ``ok``/``status``/``seconds``/``result``, the GPU targets met or missed, a text summary;
a run killed at any point leaves every finished section in it, the running one "running"),
gpu_check.log (the output of every subprocess) and pytest_<section>.xml (JUnit XML).
``--quick`` reruns the sections of OUTDIR/gpu_check.json whose ``ok`` is not true, keeping the
others. An OUTDIR that already holds a gpu_check.json is refused unless ``--quick`` or
``--overwrite`` is given. Without CUDA and without ``--dry-run`` it exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _gpu_check_parts as parts  # noqa: E402
from _gpu_check_parts import (FAULT_ENV, SectionSkip, _cuda_extension_built, _now, _tail, child_env,  # noqa: E402,F401
                              load_json, parse_junit, parse_pytest_log, pytest_command, pytest_result, save_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
JSON_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"
SCHEMA = 2
TEST_TIMEOUT_S = 60


class Section(NamedTuple):
    name: str
    cap: float       # seconds on an H100
    reserve: float   # seconds kept for it while earlier sections run
    kind: str        # "own" (a Check.sec_<name> method), "pytest" or "bench"
    spec: tuple = ()  # pytest: (files, -k); bench: (module, dry-run args, full args)


def own(name, cap, reserve):
    return Section(name, cap, reserve, "own")


def tests(name, cap, reserve, files, k=None):
    return Section(name, cap, reserve, "pytest", (files, k))


def bench(name, cap, reserve, module, dry, full):
    return Section(name, cap, reserve, "bench", (module, dry.split(), full.split()))


def _cuda_test_files():
    return sorted(f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests"))
                  if f.startswith("test_cuda_") and f.endswith(".py") and f != "test_cuda_compile.py")


_TRAIN_DRY = "--device cpu --model small-cnn --batch 4 --attack-steps 1 --repeats {} --warmup 0"
SECTIONS = [
    own("env", 30, 5),
    own("build", 150, 20),
    tests("tests_kernels", 120, 30, ["tests/test_ops.py", "tests/test_ops_add_scaled.py", "tests/test_native.py",
                                     "tests/test_triton.py"], "not cpu"),
    tests("tests_cuda", 100, 30, _cuda_test_files),
    bench("ddp_smoke", 45, 15, "ddp_smoke", "--device cpu --steps 1 --batch 4", "--device cuda"),
    bench("bench_weight", 100, 30, "bench_weight_side", "--device cpu --models small-cnn --reps 1",
          "--device cuda --dtypes float32,bfloat16 --models preact18,wrn34-10 --reps 20 --k 10"),
    bench("bench_pgd", 45, 15, "bench_pgd", "--device cpu --reps 1 --inner 1 --batch 8",
          "--device cuda --dtypes float32,bfloat16 --reps 30 --inner 20"),
    bench("bench_train", 100, 30, "bench_train_step", _TRAIN_DRY.format(1),
          "--device cuda --model wrn34-10 --batch 128 --repeats 3 --warmup 1"),
    tests("tests_family", 90, 20, ["tests/test_kernels_family.py", "tests/test_ops_family.py"], "not cpu"),
    bench("bench_family", 60, 15, "bench_family_kernels", "--device cpu --backends foreach --rules sam --reps 1",
          "--device cuda --backends foreach,triton,native --reps 20"),
    # host issue time of one seam call per backend (no synchronize): whether the seam is host-bound on a GPU
    bench("bench_seam", 45, 10, "bench_seam_host", "--device cpu --backends foreach --tensors 4 --rounds 1 --number 2",
          "--device cuda --rounds 9 --number 200"),
    tests("tests_compile", 90, 20, ["tests/test_compile.py"]),
    own("continual_cifar", 90, 20),
    # last but one, so that a short budget skips it first (``--only bench_ladder``: ~2 min on an H100)
    bench("bench_ladder", 240, 60, "bench_train_step",
          "--ladder " + _TRAIN_DRY.format(2) + " --rungs a,b,c,d,e,f --cheap-at d",
          "--ladder --device cuda --model wrn34-10 --batch 128 --attack-steps 10 --repeats 10 --warmup 2 "
          "--rungs a,b,c,d,e,f --cheap-at d,f"),
    # the dry run: Dynamo with the eager backend, no Inductor build
    bench("bench_compile", 300, 30, "bench_compile", "--device cpu --models small-cnn --batch 2 --attack-steps 1 "
          "--steps 1 --warmup 0 --backend eager --no-warm", "--device cuda --models wrn34-10 --dtype bfloat16 "
          "--batch 128 --attack-steps 10 --steps 10 --warmup 2"),
]
NAMES = [s.name for s in SECTIONS]
BY_NAME = {s.name: s for s in SECTIONS}
TARGETS_FROM = ("build", "bench_weight", "bench_pgd", "bench_train", "bench_ladder", "tests_cuda", "ddp_smoke",
                "bench_seam")
LINES_FROM = ("bench_weight", "bench_pgd", "bench_train", "bench_ladder", "bench_family", "bench_seam", "bench_compile")


def bench_module(name):
    """The benchmark module ``benchmarks/<name>.py`` (this folder is on sys.path), imported once."""
    return importlib.import_module(name)


# --------------------------------------------------------------------------- the runner
class Check:
    def __init__(self, outdir, dry, budget, quick, only):
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
        todo = [s for s in SECTIONS if self.wanted(s.name)]
        for i, sec in enumerate(todo):
            timeout = min(sec.cap, self.left() - sum(s.reserve for s in todo[i + 1:]))
            self.run_section(sec.name, timeout)
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
            res, ok, status = self.execute(name, timeout)
            rec.update(result=res, ok=bool(ok), status=status)
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

    # ---------------------------------------------------------------- the sections
    def execute(self, name, timeout):
        """Run section ``name``: ``(result, ok, status)``."""
        sec = BY_NAME[name]
        if sec.kind == "own":
            return getattr(parts, "sec_" + name)(self, timeout)
        if sec.kind == "pytest":
            files, k = sec.spec
            return self._pytest(name, files() if callable(files) else files, k, timeout)
        module, dry, full = sec.spec
        res, rc = self._script([f"benchmarks/{module}.py"] + (dry if self.dry else full), timeout, name + ".json")
        ok, not_ok = bench_module(module).verdict(res)
        if not_ok is not None:
            res["rows_not_ok"] = not_ok
        ok = rc == 0 and ok
        return res, ok, "timeout" if rc is None else ("ok" if ok else "failed")

    def _pytest(self, name, files, kexpr, timeout):
        files = [f for f in files if os.path.exists(os.path.join(ROOT, f))]
        if not files:
            raise SectionSkip("no test files")
        xml = os.path.join(self.outdir, f"pytest_{name}.xml")
        if os.path.exists(xml):
            os.remove(xml)
        offset = os.path.getsize(self.log_path)
        xdist = self.data.get("versions", {}).get("pytest_xdist")
        rc, sec = self.sub(pytest_command(self.py, files, kexpr, xml, self.dry, xdist), timeout,
                           dict(self.env, AWPFAST_TEST_TIMEOUT=str(TEST_TIMEOUT_S)))
        with open(self.log_path) as f:
            f.seek(offset)
            text = f.read()
        return pytest_result(xml, text, self.dry, rc, dict(files=files, k=kexpr, seconds=round(sec, 1)))

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


# --------------------------------------------------------------------------- targets and summary
def result(data, name):
    """Section ``name``'s result in a gpu_check.json (``{}`` when it has none): what its benchmark
    module reads (scripts/docs_numbers.py reads committed runs through this)."""
    return ((data.get("sections") or {}).get(name) or {}).get("result") or {}


def _from_module(name, res, what):
    """A benchmark section's ``targets`` / ``summary_lines`` from its module (a module that cannot
    be read here costs its own lines only)."""
    try:
        fn = getattr(bench_module(BY_NAME[name].spec[0]), what, None)
        return fn(res) if fn else ({} if what == "targets" else [])
    except Exception as e:
        return {} if what == "targets" else [f"  {name}: no {what} ({type(e).__name__}: {e})"]


def _own_targets(name, res):
    out = {}
    if name == "build" and "cuda_status" in res:
        ok = bool(res["cuda_status"][0])
        out["native_cuda_kernels_usable"] = dict(value=ok, target="true", ok=ok, note=res["cuda_status"][1] or None)
    for be in ("triton", "native") if name == "tests_cuda" else ():
        got = sorted({o for t, o in (res.get("outcomes") or {}).items() if "capture_full_awp_step" in t and be in t})
        if got:
            verdict = False if ("failed" in got or "error" in got) else (True if got == ["passed"] else None)
            out[f"cuda_graph_full_awp_step_{be}"] = dict(value="/".join(got), target="replays equal eager", ok=verdict)
    return out


def targets(data):
    """The GPU run's targets, each met (ok True), missed (False) or not measured (None)."""
    out = {}
    for name in TARGETS_FROM:
        res = result(data, name)
        if res:
            out.update(_own_targets(name, res) if BY_NAME[name].kind != "bench" else
                       _from_module(name, res, "targets"))
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
    b = result(data, "build")
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
    for name in LINES_FROM:
        if result(data, name):
            lines += _from_module(name, result(data, name), "summary_lines")
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

    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    json_path = os.path.join(a.outdir, JSON_NAME)
    previous = load_json(json_path) if os.path.exists(json_path) else None

    def no_cuda():
        import torch
        return not torch.cuda.is_available() and not a.dry_run

    refusals = [  # (why not, the message), in order
        (lambda: [s for s in only or () if s not in NAMES],
         f"unknown section(s) {[s for s in only or () if s not in NAMES]}; choose from {', '.join(NAMES)}"),
        (lambda: os.path.exists(a.outdir) and not os.path.isdir(a.outdir),
         f"{a.outdir} is a file, not a folder; give a folder for the results"),
        (lambda: a.quick and previous is None, f"--quick needs an earlier run's {json_path} (copy it there first)"),
        (lambda: previous is not None and not a.quick and not a.overwrite,
         f"{json_path} already holds a run; pass --quick to rerun its failed sections, --overwrite to replace it, "
         "or give a new folder"),
        (no_cuda, "no CUDA device is visible (torch.cuda.is_available() is False). Run it on a CUDA machine, or "
                  "pass --dry-run to exercise the plumbing on the CPU."),
        (lambda: previous is not None and a.quick and bool(previous.get("dry_run")) != bool(a.dry_run),
         "--quick must match the earlier run's mode (dry run or not)")]
    for why, message in refusals:
        if why():
            print(f"gpu_check: {message}", file=sys.stderr)
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
