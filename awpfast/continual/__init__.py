"""awpfast.continual: continual learning with flattened sharpness (FS-DGPM) on the awpfast engine.

Parts: ``GPMMemory`` (per-layer bases of past tasks' inputs, the projections), ``fs_step``
(the flattening-sharpness step on the seam's fused perturb/restore ops), ``ReservoirMemory``
(replay), ``ContinualLearner`` (SGD, GPM, FS-ER, FS-DGPM) and the offline permuted-digits /
permuted-MNIST benchmark (``python -m awpfast.continual``). See docs/continual.md.
"""
from .data import Task, load_pool, make_tasks
from .fs import FSResult, fs_step
from .gpm import GPMMemory, energy_rank, layer_representation
from .learner import METHODS, Config, ContinualLearner, mlp
from .replay import ReservoirMemory
from .run import PRESETS, acc_bwt, run_experiment

__all__ = ["GPMMemory", "energy_rank", "layer_representation", "fs_step", "FSResult", "ReservoirMemory",
           "ContinualLearner", "Config", "METHODS", "mlp", "Task", "load_pool", "make_tasks", "PRESETS",
           "acc_bwt", "run_experiment"]
