"""benchmarks/gpu_check.py on the CPU: nothing of a one-shot GPU run may be lost.

* a run killed inside a section (``os._exit``) leaves a valid JSON with every earlier
  section and the killed one marked "running"; a section that raises is recorded and the
  run goes on; ``--quick`` reruns exactly the sections that are not ok;
* an existing result folder is never overwritten without ``--quick``/``--overwrite``;
* the JUnit / ``pytest -v`` parsers, the targets and the summary;
* the per-test timeout of tests/conftest.py (AWPFAST_TEST_TIMEOUT).
(The whole ``--dry-run`` takes several minutes here: it is run by hand, see
benchmarks/README.md, not in this suite.)
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, load_source

gc = load_source("awpfast_gpu_check", "benchmarks/gpu_check.py")


def _run(args, fault=None, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop(gc.FAULT_ENV, None)
    if fault:
        env[gc.FAULT_ENV] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")] + args,
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_killed_run_keeps_finished_sections_and_raise_is_recorded(tmp_path):
    out = tmp_path / "run"
    # the process dies inside "build", after "env" finished
    r = _run(["--dry-run", str(out), "--only", "env,build"], fault="build:exit")
    assert r.returncode == 3, r.stderr[-2000:]
    data = json.loads((out / "gpu_check.json").read_text())  # valid JSON, not a partial file
    assert data["device"] and data["dry_run"] is True and data["complete"] is False
    env = data["sections"]["env"]
    assert env["ok"] is True and env["status"] == "ok" and "python" in env["result"]
    assert data["sections"]["build"]["status"] == "running" and data["sections"]["build"]["ok"] is False
    assert not (out / "gpu_check.json.tmp").exists()
    assert "[section env]" in (out / "gpu_check.log").read_text()
    env_finished = env["finished"]

    # a section that raises is recorded as an error; the run completes; env (ok) is kept
    r = _run(["--dry-run", "--quick", str(out), "--only", "env,build"], fault="build:raise")
    assert r.returncode == 1, r.stderr[-2000:]
    data = json.loads((out / "gpu_check.json").read_text())
    b = data["sections"]["build"]
    assert b["status"] == "error" and b["ok"] is False and "injected fault" in b["error"]
    assert data["sections"]["env"]["finished"] == env_finished, "--quick must not rerun a section that is ok"
    assert data["complete"] is True and len(data["runs"]) == 2
    assert "build" in data["summary"] and "error" in data["summary"]


def test_refuses_to_overwrite_and_bad_arguments(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "gpu_check.json").write_text('{"sections": {}}')
    r = _run(["--dry-run", str(out)])
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out / "gpu_check.json").read_text()) == {"sections": {}}
    r = _run(["--dry-run", "--quick", str(tmp_path / "empty")])
    assert r.returncode == 2 and "--quick needs" in r.stderr
    r = _run(["--dry-run", str(out), "--overwrite", "--only", "nonsense"])
    assert r.returncode == 2 and "unknown section" in r.stderr
    f = tmp_path / "file"
    f.write_text("x")
    r = _run(["--dry-run", str(f)])
    assert r.returncode == 2 and "is a file" in r.stderr


def test_quick_selects_sections_not_ok(tmp_path):
    chk = gc.Check(str(tmp_path), True, 100, True, None)
    chk.data = {"sections": {"env": {"ok": True}, "build": {"ok": False}, "tests_kernels": {"ok": True},
                             "tests_cuda": {"status": "running", "ok": False}, "bench_pgd": {"status": "skipped"}}}
    wanted = [n for n in gc.NAMES if chk.wanted(n)]
    assert wanted == ["build", "tests_cuda", "ddp_smoke", "bench_weight", "bench_pgd", "bench_train", "tests_family",
                      "bench_family", "bench_seam", "tests_compile", "continual_cifar", "bench_ladder", "bench_compile"]
    chk.only = ["build", "env"]
    assert [n for n in gc.NAMES if chk.wanted(n)] == ["build"]


def test_quick_rebuilds_on_a_fresh_machine(tmp_path, monkeypatch):
    """A device machine starts bare: a --quick rerun there must build the native kernels
    again even though the earlier run's build section was ok."""
    chk = gc.Check(str(tmp_path), False, 100, True, None)
    chk.data = {"sections": {n: {"ok": True} for n in gc.NAMES}}
    chk.data["sections"]["tests_kernels"] = {"ok": False}
    monkeypatch.setattr(gc, "_cuda_extension_built", lambda: False)
    assert [n for n in gc.NAMES if chk.wanted(n)] == ["build", "tests_kernels"]
    monkeypatch.setattr(gc, "_cuda_extension_built", lambda: True)
    assert [n for n in gc.NAMES if chk.wanted(n)] == ["tests_kernels"]


def test_section_time_caps_respect_the_budget(tmp_path, monkeypatch):
    chk = gc.Check(str(tmp_path), True, 60, False, None)
    chk.data = {"sections": {}, "order": gc.NAMES}
    seen = {}
    monkeypatch.setattr(chk, "run_section", lambda name, timeout: seen.__setitem__(name, timeout))
    monkeypatch.setattr(chk, "save", lambda: None)
    chk.run_all()
    assert seen["env"] <= 60 - sum(s.reserve for s in gc.SECTIONS if s.name != "env") + 1e-6
    assert list(seen) == gc.NAMES and all(t <= s.cap for s, t in zip(gc.SECTIONS, seen.values()))
    assert seen["bench_train"] <= 60


def test_parsers(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.test_a" name="test_ok"/>
          <testcase classname="tests.test_a" name="test_bad[x]"><failure message="assert 1 == 2">trace</failure></testcase>
          <testcase classname="tests.test_a" name="test_err"><error message="boom"/></testcase>
          <testcase classname="tests.test_a" name="test_skip"><skipped message="no CUDA device"/></testcase>
        </testsuite></testsuites>"""))
    r = gc.parse_junit(str(xml))
    assert r["counts"] == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert r["failures"][0]["test"] == "tests.test_a::test_bad[x]" and "assert 1 == 2" in r["failures"][0]["message"]
    assert r["skip_reasons"] == {"no CUDA device": 1} and r["outcomes"]["tests.test_a::test_ok"] == "passed"
    assert gc.parse_junit(str(tmp_path / "missing.xml")) is None
    log = ("tests/test_a.py::test_one PASSED [ 10%]\n"
           "[gw1] [ 20%] FAILED tests/test_a.py::test_two[cuda]\n"
           "tests/test_a.py::test_three SKIPPED (no CUDA)\n"
           "[gpu_check] TIMEOUT after 60 s: killed\n")
    r = gc.parse_pytest_log(log)
    assert r["counts"]["passed"] == 1 and r["counts"]["failed"] == 1 and r["counts"]["skipped"] == 1
    assert r["failures"] == [{"test": "tests/test_a.py::test_two[cuda]", "kind": "failed", "message": ""}]
    assert gc.parse_pytest_log("506 tests collected in 3.2s")["collected"] == 506


def test_targets_and_summary():
    n = 46_100_000
    rows = [
        {"model": "wrn34-10", "dtype": "float32", "variant": "reference-eager", "median_ms": 20.0, "loop_ms": 19.0,
         "floor_ms": 0.5, "x_floor": 40.0, "elements": n},
        {"model": "wrn34-10", "dtype": "float32", "variant": "foreach-simple", "median_ms": 1.5, "loop_ms": 1.4,
         "floor_ms": 0.5, "x_floor": 3.0, "elements": n},
        {"model": "wrn34-10", "dtype": "float32", "variant": "triton", "median_ms": 0.7, "loop_ms": 0.62,
         "graph_ms": 0.6, "floor_ms": 0.5, "x_floor": 1.4, "elements": n, "verified_ok": True, "err_v": 3e-6,
         "restore_exact": True},
        {"model": "wrn34-10", "dtype": "float32", "variant": "native", "error": "RuntimeError()"}]
    pgd = [{"norm": "Linf", "dtype": "float32", "impl": "eager", "median_us": 30.0, "graph_us": 20.0, "kernels": 7,
            "speedup_vs_eager": 1.0},
           {"norm": "Linf", "dtype": "float32", "impl": "triton", "median_us": 12.0, "graph_us": 6.0, "launch_us": 9.0,
            "kernels": 1, "speedup_vs_eager": 2.5}]
    train = [{"config": "awpfast bf16+cl", "at_awp_ms": 100.0, "at_ms": 95.0, "awp_overhead": 1.05,
              "fwd_bwd_ms": 8.0, "awp_extra_over_fwd_bwd": 0.625, "speedup_vs_reference_at_awp": 4.0}]
    data = {"device": "GPU X", "dry_run": False, "order": gc.NAMES, "sections": {
        "build": {"ok": False, "status": "failed", "result": {"cuda_status": [False, "nvcc failed"], "build_rc": 1}},
        "tests_cuda": {"ok": False, "status": "failed", "result": {"counts": {"passed": 3, "failed": 1}, "outcomes": {
            "tests.test_cuda_awp::test_capture_full_awp_step[triton]": "passed",
            "tests.test_cuda_awp::test_capture_full_awp_step[native]": "failed"}}},
        "bench_weight": {"ok": False, "status": "failed", "result": {"copy_bandwidth_gbs": 3000, "rows": rows}},
        "bench_pgd": {"ok": True, "status": "ok", "result": {"batch": 128, "rows": pgd}},
        "bench_train": {"ok": True, "status": "ok", "result": {"rows": train}}}}
    t = gc.targets(data)
    assert t["native_cuda_kernels_usable"]["ok"] is False
    assert abs(t["wrn_float32_triton_x_floor"]["value"] - 1.2) < 1e-9 and t["wrn_float32_triton_x_floor"]["ok"]
    assert abs(t["wrn_float32_triton_vs_foreach_simple"]["value"] - 1.4 / 0.62) < 1e-9
    assert t["wrn_float32_triton_vs_reference_eager"]["ok"] is True
    assert t["wrn_float32_native_x_floor"]["ok"] is False and "RuntimeError" in t["wrn_float32_native_x_floor"]["note"]
    assert t["pgd_linf_triton_launches"]["ok"] and t["pgd_linf_triton_vs_eager"]["ok"] is False
    assert t["train_bf16cl_vs_reference_fp32"]["ok"] and t["train_at_awp_over_at"]["ok"]
    assert t["train_awp_extra_over_fwd_bwd"]["ok"] is None
    assert t["cuda_graph_full_awp_step_triton"]["ok"] is True
    assert t["cuda_graph_full_awp_step_native"]["ok"] is False
    data["targets"] = t
    text = gc.summary(data)
    assert "NATIVE CUDA KERNELS NOT USABLE" in text and "MISSED" in text and "MET" in text and "GPU X" in text
    assert "error RuntimeError" in text
    data["dry_run"] = True
    assert all(v["ok"] is None for v in gc.targets(data).values())


def test_no_cuda_without_dry_run_is_refused(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = _run([str(tmp_path / "x")])
    assert r.returncode == 2 and "--dry-run" in r.stderr and "Traceback" not in r.stderr


def test_per_test_timeout(tmp_path):
    """conftest's AWPFAST_TEST_TIMEOUT fails a slow test with a clear message and the run goes
    on to the next test (no pytest-timeout needed)."""
    (tmp_path / "conftest.py").write_text((open(os.path.join(ROOT, "tests", "conftest.py")).read()))
    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""\
        import time
        def test_slow():
            time.sleep(30)
        def test_after():
            assert True
        """))
    env = dict(os.environ, AWPFAST_TEST_TIMEOUT="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert "1 failed, 1 passed" in r.stdout, r.stdout[-2000:]
    assert "exceeded AWPFAST_TEST_TIMEOUT=1 s" in r.stdout


def test_pytest_section_outside_dry_run(tmp_path):
    """The real (non-dry) pytest section: -v, JUnit XML in the results folder, counts,
    failures and per-test outcomes; a section killed at its cap keeps the log's results."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_some.py").write_text(textwrap.dedent("""\
        import time, pytest
        def test_ok():
            assert True
        def test_bad():
            assert 1 == 2, "planted"
        @pytest.mark.skip(reason="planted skip")
        def test_skip():
            pass
        def test_slow():
            time.sleep(float(__import__("os").environ.get("SLOW", "0")))
        """))
    out = tmp_path / "out"
    out.mkdir()
    chk = gc.Check(str(out), False, 100, False, None)
    chk.data = {"sections": {}, "versions": {"pytest_xdist": False}}
    open(chk.log_path, "w").close()
    res, ok, status = chk._pytest("tests_x", [str(tests / "test_some.py")], None, 120)
    assert (ok, status) == (False, "failed")
    assert res["counts"]["passed"] == 2 and res["counts"]["failed"] == 1 and res["counts"]["skipped"] == 1
    assert "planted" in res["failures"][0]["message"] and (out / "pytest_tests_x.xml").exists()
    assert res["skip_reasons"] == {"planted skip": 1}
    chk.env["SLOW"] = "60"
    res, ok, status = chk._pytest("tests_x", [str(tests / "test_some.py")], None, 8)
    assert (ok, status) == (False, "timeout") and res["rc"] is None
    assert res["counts"]["passed"] >= 1 and res["counts"]["failed"] == 1, res
    assert "TIMEOUT after 8 s" in (out / "gpu_check.log").read_text()


@pytest.mark.slow  # about a minute on a 2-core CPU (every rung and cheap row, RWP's 10 passes included): make test-all
def test_bench_ladder_section_dry(tmp_path):
    """The training-step ladder's section on the CPU, tiny: every rung a-f, the cheap-ascent rows at (d),
    the load average per round, (b) and (c) give the same x_adv; its targets and summary lines."""
    chk = gc.Check(str(tmp_path), True, 600, False, None)
    chk.data = {"sections": {}}
    res, ok, status = chk.execute("bench_ladder", 300)
    assert ok and status == "ok", (status, res.get("rc"), open(chk.log_path).read()[-3000:])
    assert [r["rung"] for r in res["rungs"]] == ["a", "b", "c", "d", "e", "f"]
    assert [r["same_algorithm_as_a"] for r in res["rungs"]] == [True, True, True, False, False, False]
    assert res["x_adv_b_equals_c"]["max_abs_diff"] <= 1e-6
    assert len(res["loadavg"]["per_round"]) == 2 and len(res["loadavg"]["start"]) == 3
    for r in res["rungs"]:
        assert r["at_awp_ms"]["n"] == 2 and r["awp_extra_ms"]["median"] == r["awp_extra_ms"]["median"]
    assert {r["label"] for r in res["cheap_rows"]} >= {"AT", "separate", "sourced", "every2", "every4"}
    data = {"device": "cpu", "dry_run": False, "order": gc.NAMES,
            "sections": {"bench_ladder": {"ok": True, "status": "ok", "result": res}}}
    t = gc.targets(data)
    assert t["ladder_same_algorithm_a_to_c"]["ok"] is None and t["ladder_c_awp_extra_over_fwd_bwd"]["value"] > -1e9
    data["targets"] = t
    assert "(c) + input-only attack gradients" in gc.summary(data)
