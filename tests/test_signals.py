"""Ctrl-C and SIGTERM stop a run cleanly: exit 130 / 143 with one line, the write in progress
finished, no ``.tmp`` left, ``last.pt`` resumable; a signal that lands where Python swallows
exceptions (a ``__del__``, as in matplotlib's clean-up during the ``--track-flatness`` plot) is
not lost but raised at the next check point."""
import gc
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from awpfast.errors import Interrupted, check_interrupted, deferred_interrupts, handle_interrupts

TINY = ["--data", "synthetic", "--image-size", "8", "--model", "small-cnn", "--width", "4",
        "--batch-size", "64", "--attack-steps", "1", "--eval-steps", "1", "--eval-samples", "32",
        "--train-eval-samples", "32", "--train-samples", "64", "--val-samples", "32", "--no-progress",
        "--track-flatness", "--flatness-samples", "16", "--flatness-directions", "1", "--flatness-steps", "1"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_in_a_destructor_is_raised_at_the_next_check():
    class Swallows:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises here; Python ignores it
            time.sleep(0.05)

    with handle_interrupts():
        o = Swallows()
        del o
        gc.collect()
        with pytest.raises(Interrupted) as e:
            check_interrupted()
    assert e.value.exit_code == 130


def test_a_signal_inside_a_deferred_block_waits_for_its_end():
    done = []
    with handle_interrupts():
        with pytest.raises(Interrupted) as e:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append(True)  # the write goes on
    assert done == [True] and e.value.exit_code == 143


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stops_cleanly_on_a_signal_and_resumes(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "awpfast.train"] + TINY + ["--epochs", "400", "--out", str(out), "--threads", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "metrics.png").exists() and time.time() - t0 < 240:  # one epoch and its plot written
        time.sleep(0.2)
    assert (out / "metrics.png").exists(), p.communicate(timeout=60)
    for _ in range(3):  # several signals at several points of the loop (training, evaluation, plot)
        time.sleep(0.7)
        if p.poll() is None:
            p.send_signal(sig)
            break
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the run went on after the signal")
    assert p.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("awpfast-train: stopped by SIG") and "Traceback" not in err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    epoch = torch.load(out / "last.pt", weights_only=False)["epoch"]
    from awpfast import train as T
    assert T.main(["--resume", str(out / "last.pt"), "--epochs", str(epoch + 1), "--quiet", "--no-plot"]) == 0
