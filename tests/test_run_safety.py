"""Nothing is lost between runs: one run per folder (a lock, refused with the holder's pid, a killed
holder's lock taken over), a default ``--out`` per set of options, ``--resume`` only of the folder's
own run (its run id) and nothing written before every check passed, ``--json`` files never
replaced without ``--overwrite``, a full disk named and its partial file removed."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from awpfast import evaluate as E
from awpfast import train as T
from awpfast.train import config as config_
from awpfast.checkpoint import LOCK_FILE, atomic_save, run_lock
from awpfast.errors import UsageError

TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "64", "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "64", "--val-samples", "32", "--no-progress",
        "--no-plot", "--quiet"]


def _digest(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f == LOCK_FILE:
            continue
        with open(os.path.join(folder, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished 1-epoch runs (different seeds) in two folders; tests that write copy them."""
    base = tmp_path_factory.mktemp("runs")
    a, b = str(base / "a"), str(base / "b")
    assert T.main(TINY + ["--epochs", "1", "--out", a, "--seed", "1"]) == 0
    assert T.main(TINY + ["--epochs", "1", "--out", b, "--seed", "2"]) == 0
    return a, b


# ----------------------------------------------------------------------------- the lock
_HOLDER = """
import sys, time
from awpfast.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, folder], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_locked_folder_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = str(tmp_path / "run")
    p = _holder(out)
    try:
        assert T.main(TINY + ["--epochs", "1", "--out", out]) == 2
        err = _err(capsys)
        assert f"pid {p.pid}" in err and "in use by another awpfast-train run" in err and len(err.splitlines()) == 1
        assert not os.path.exists(os.path.join(out, "args.json"))
    finally:
        p.kill()
        p.wait()


def test_a_killed_runs_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    p = _holder(out)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert os.path.isfile(os.path.join(out, LOCK_FILE))
    assert T.main(TINY + ["--epochs", "1", "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "last.pt"))


def test_run_lock_is_exclusive_within_one_process_too(tmp_path):
    with run_lock(str(tmp_path)):
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            with run_lock(str(tmp_path)):
                pass
    with run_lock(str(tmp_path)):  # released
        pass


def test_resume_of_a_running_folder_is_refused(two_runs, tmp_path, capsys):
    out = str(tmp_path / "a")
    shutil.copytree(two_runs[0], out)
    before = _digest(out)
    with run_lock(out):
        assert T.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "2"]) == 2
    assert "in use by another awpfast-train run" in _err(capsys)
    assert _digest(out) == before


def test_two_concurrent_cli_runs_on_one_folder_leave_one_complete_run(tmp_path):
    """Two awpfast-train processes started together on one --out: exactly one trains, the other is
    refused (exit 2, naming the holder); the folder holds the one run's files, consistent."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "awpfast.train"] + TINY + ["--epochs", "2", "--out", out, "--threads", "1"]
    ps = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = [(p.wait(timeout=300), p.stderr.read()) for p in ps]
    codes = sorted(r for r, _ in res)
    assert codes == [0, 2], res
    err = next(e for r, e in res if r == 2)
    assert "in use by another awpfast-train run" in err or "already holds a run" in err
    with open(os.path.join(out, "args.json")) as f:
        run_id = json.load(f)["run_id"]
    assert torch.load(os.path.join(out, "last.pt"), weights_only=False)["run_id"] == run_id


# ----------------------------------------------------------------------------- default --out
def test_default_out_differs_with_any_option_that_changes_the_numbers():
    def out(*argv):
        a = T.build_parser().parse_args(list(argv))
        config_.resolve_defaults(a)
        return a.out

    base = out()
    assert base.startswith(os.path.join("runs", "at-awp-small-cnn-digits-s0-"))
    others = {out("--lr", "0.05"), out("--eps", "0.1"), out("--epochs", "31"), out("--awp-every", "2"),
              out("--label-noise", "0.1"), out("--batch-size", "64")}
    assert base not in others and len(others) == 6
    assert out() == base  # deterministic


# ----------------------------------------------------------------------------- --resume provenance
def test_resume_of_another_runs_checkpoint_is_refused_and_writes_nothing(two_runs, tmp_path, capsys):
    a = str(tmp_path / "a")
    shutil.copytree(two_runs[0], a)
    shutil.copyfile(os.path.join(two_runs[1], "last.pt"), os.path.join(a, "last.pt"))  # b's last.pt in a
    before = _digest(a)
    assert T.main(["--resume", os.path.join(a, "last.pt")]) == 2  # finished: would have "repaired" a
    err = _err(capsys)
    assert "another run" in err and "run id" in err
    assert T.main(["--resume", os.path.join(a, "last.pt"), "--epochs", "2"]) == 2  # a continuation
    assert "another run" in _err(capsys)
    assert _digest(a) == before


def test_resume_of_the_folders_own_run_still_works(two_runs, tmp_path):
    a = str(tmp_path / "a")
    shutil.copytree(two_runs[0], a)
    rid = json.load(open(os.path.join(a, "args.json")))["run_id"]
    assert T.main(["--resume", os.path.join(a, "last.pt"), "--epochs", "2"]) == 0
    assert json.load(open(os.path.join(a, "args.json")))["run_id"] == rid
    for f in ("last.pt", "best.pt"):
        assert torch.load(os.path.join(a, f), weights_only=False)["run_id"] == rid


def test_a_checkpoint_without_run_id_resumes_only_into_the_folder_it_recorded(two_runs, tmp_path, capsys):
    """Checkpoints written before run ids: the folder recorded in their args decides."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(two_runs[0], a)
    shutil.copytree(two_runs[1], b)
    ck = torch.load(os.path.join(b, "last.pt"), weights_only=False)
    del ck["run_id"]
    torch.save(ck, os.path.join(a, "last.pt"))  # b's (legacy) checkpoint in a, a's args.json without an id
    rec = json.load(open(os.path.join(a, "args.json")))
    del rec["run_id"]
    json.dump(rec, open(os.path.join(a, "args.json"), "w"))
    bp = torch.load(os.path.join(a, "best.pt"), weights_only=False)
    del bp["run_id"]
    torch.save(bp, os.path.join(a, "best.pt"))
    before = _digest(a)
    assert T.main(["--resume", os.path.join(a, "last.pt"), "--epochs", "2"]) == 2
    assert "was written by the run in" in _err(capsys)
    assert _digest(a) == before


# ----------------------------------------------------------------------------- --json
def test_evaluate_json_is_not_replaced_without_overwrite(two_runs, tmp_path, capsys):
    target = tmp_path / "res.json"
    target.write_text('{"keep": 1}')
    ck = os.path.join(two_runs[0], "best.pt")
    assert E.main([ck, "--steps", "1", "--samples", "8", "--no-autoattack", "--json", str(target)]) == 2
    err = _err(capsys)
    assert "already exists" in err and "--overwrite" in err
    assert json.loads(target.read_text()) == {"keep": 1}
    assert E.main([ck, "--steps", "1", "--samples", "8", "--no-autoattack", "--json", str(target),
                   "--overwrite"]) == 0
    assert json.loads(target.read_text())["n"] == 8


# ----------------------------------------------------------------------------- full disk
def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"v": 1}, path)
    before = open(path, "rb").read()

    def full(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UsageError, match="is full") as e:
        atomic_save({"v": 2}, path)
    assert str(tmp_path) in str(e.value)
    assert not os.path.exists(path + ".tmp")
    assert open(path, "rb").read() == before
