"""`make demo`: a short AT-AWP training run on the embedded data (no download).

scikit-learn's handwritten digits (8x8, 3-channel), a small CNN, L-inf PGD-10 adversarial
training with AWP (gamma = 0.01), the reference piecewise LR schedule; the test split (clean
and PGD-20) and the training subset are evaluated every 5 epochs, at the last epoch and at each
new best validation epoch (the small validation split every epoch). It prints its expected
duration first: about 30 s on a quiet 2-core CPU (see ``EXPECTED_S``), longer when the CPU is
shared. Outputs (metrics, plot, checkpoints) go to ``runs/demo`` (or the folder given as the
first argument), replacing an earlier demo run there.

The equivalent command line::

    awpfast-train --method at --awp-gamma 0.01 --model small-cnn --width 16 --data digits \
        --image-size 8 --eps 0.15 --alpha 0.0375 --lr 0.05 --epochs 25 --train-eval-samples 300 \
        --eval-every 5 --out runs/demo --overwrite
"""
from __future__ import annotations

import os
import sys
import time

# The bound printed before the run (seconds, quiet 2-core CPU): from a demo run on this project's
# 2-core machine with evaluation every epoch (2026-12-02: 10 s of training + 12 s of evaluation
# over 25 epochs, plus start-up); evaluating every 5 epochs only shortens it.
EXPECTED_S = 30

import torch

from .cli import ArgumentParser, cli_main
from .train import build_parser, run


def _load_note() -> str:
    """``; load average now X on N cores: expect it to take longer`` when the CPU is busy, else
    ``""`` (no factor: at load 7.6-10.6 on 2 cores one run took 378 s, 12x the quiet bound)."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):  # no load average on this platform
        return ""
    if load <= cores:
        return ""
    return f"; load average now {load:.1f} on {cores} cores: expect it to take longer"


def main(argv=None) -> int:
    """``make demo`` / ``python -m awpfast.demo [OUT]``: returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    p = ArgumentParser(prog="python -m awpfast.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="runs/demo", help="output folder (replaced if it holds an earlier demo)")
    out = p.parse_args(argv).out
    cli = ["--method", "at", "--awp-gamma", "0.01", "--model", "small-cnn", "--width", "16",
           "--data", "digits", "--image-size", "8", "--eps", "0.15", "--alpha", "0.0375",
           "--lr", "0.05", "--epochs", "25", "--train-eval-samples", "300", "--eval-every", "5", "--seed", "0",
           "--out", out, "--overwrite"]
    if torch.get_num_threads() > 2:
        cli += ["--threads", "2"]

    def body(args):
        print("awpfast demo: AT-AWP on scikit-learn digits (embedded, offline)")
        print("  awpfast-train " + " ".join(cli))
        print(f"expected duration: about {EXPECTED_S} s on a quiet 2-core CPU{_load_note()}", flush=True)
        t0 = time.perf_counter()
        summary = run(args)
        last, best = summary["last"], summary["best"]
        print()
        print(f"test accuracy after {last['epoch']} epochs ({time.perf_counter() - t0:.0f} s), "
              f"L-inf eps = 0.15, 500 test images:")
        print(f"  clean           {100 * last['test_clean_acc']:6.2f} %")
        print(f"  robust (PGD-20) {100 * last['test_robust_acc']:6.2f} %   (best epoch by validation "
              f"{best['epoch']}: {100 * best['test_robust_acc']:.2f} %)")
        print(f"metrics, plot and checkpoints in {summary['out']}/ ; evaluate with: "
              f"python -m awpfast.evaluate {summary['out']}/best.pt")
        return 0

    return cli_main("awpfast demo", lambda: build_parser().parse_args(cli), body)


if __name__ == "__main__":
    sys.exit(main())
