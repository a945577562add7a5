"""Adversarial training with AWP: ``python -m awpfast.train`` / ``awpfast-train``.

Runs offline out of the box (scikit-learn's digits, a small CNN)::

    awpfast-train --method at --awp-gamma 0.01 --epochs 30 --out runs/at-awp
    awpfast-train --method trades --model preact18 --data cifar10 --data-dir ~/data --amp bf16 --channels-last
    torchrun --nproc_per_node 4 -m awpfast.train --model wrn34-10 --data cifar10 --data-dir ~/data

Each epoch: one pass of adversarial training (attack, AWP ascent, descent at ``w + v``, restore),
then clean and PGD-20 accuracy on a held-out validation split (``--val-samples`` training images,
never trained on), on the test split and on a fixed subset of the training split.
Writes to ``--out``: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.png`` (train/test
clean and robust accuracy per epoch), ``last.pt`` and ``best.pt`` (best validation PGD-20
accuracy; best test PGD-20 with ``--val-samples 0``). A folder that already holds a run is
never overwritten: ``--resume`` continues it exactly (model, optimizer with AWP state, LR schedule,
grad scaler, the loader's generator and the torch / CUDA / numpy / python RNG states),
``--overwrite`` replaces it.

Every option is validated before anything is written; errors are one line (set
``AWPFAST_DEBUG=1`` for the traceback).

The training step is the reference recipe (Wu et al. 2020) without its proxy model: see
:mod:`awpfast.train.loop`.

``--recipe at-awp-reference`` / ``trades-awp-reference`` (and ``at-reference`` / ``trades-reference``)
set the options of the reference scripts instead of ours, including the train-mode AT attack and the
order in which their forwards feed BatchNorm (``--forward-order reference``); docs/recipes.md lists
both side by side. ``--track-flatness`` logs the flatness of the adversarial weight loss landscape
each epoch (:func:`flatness_epoch`) without changing the trajectory; ``--label-noise P`` flips a
fixed fraction of the training labels.

Under ``torchrun --nproc_per_node N``, ``--batch-size`` is the global batch: each process trains
on ``batch_size / N`` examples per step (the split must be even), the model is wrapped in
``DistributedDataParallel`` (or ``fully_shard`` with ``--fsdp``) and passed wrapped to
``awpfast.AWP``; only rank 0 prints, plots and writes.

The package: :mod:`.config` (recipes, the parser, the defaults table, the validated ``RunConfig``),
:mod:`.loop` (the ``Trainer`` and its epochs, saving, ``run``), :mod:`.report` (metrics lines,
``metrics.jsonl``, the plot). ``main`` (parse -> config -> run) lives here, above both.
"""
from __future__ import annotations

import sys

from .._lazy import lazy_getattr
from ..cli import cli_main, explicit_options
from .config import DEFAULTS, RunConfig, build_parser, make_config, preflight

__all__ = ["main", "run", "build_parser", "make_config", "RunConfig", "DEFAULTS", "preflight"]

# ``run`` needs torch: imported on first use (PEP 562), so that main() answers a bad command line
# before importing torch. Every other name lives in its own module (config, loop, report).
__getattr__ = lazy_getattr(__name__, {"run": ".loop", **dict.fromkeys(("config", "loop", "report"), None)})


def main(argv=None) -> int:
    """``awpfast-train``: returns the exit status (0 ok, 2 bad input, 1 failure). The command line is
    checked (:func:`~awpfast.train.config.preflight`) before torch is imported."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)

    def parse():
        args = parser.parse_args(argv)
        args._explicit = explicit_options(parser, argv)
        preflight(args, args._explicit)
        return args

    def body(args):
        from .loop import run
        run(args)
        if "torch.distributed" in sys.modules:  # under torchrun: every rank done (rank 0 writes last)
            import torch.distributed as dist   # before any rank tears its process group down
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        return 0

    return cli_main("awpfast-train", parse, body)
