"""The weight-perturbation rules, one module each, on one engine (:class:`awpfast.optim.WeightPerturbation`).

* :mod:`.awp`: :class:`AWP` (Wu et al. 2020), per-layer ``v_l = gamma ||w_l|| g_l / ||g_l||``;
* :mod:`.sam`: :class:`SAM` with adaptive SAM / ASAM, one global norm;
* :mod:`.box`: :class:`BoxAWP`, the clamped step of competition NLP fine-tuning;
* :mod:`.rwp`: :class:`RWP` (Yu et al. 2022), AWP's adversary under the Loss Stationary Condition,
  several ascent passes and one global norm;

Each module holds its wrapper class and the functional form of its perturbation over the engine's
flat tensor lists; the engine keeps selection, buffers, restore and the step protocol. Same
protocol for all: ``perturb(closure)`` -> the user's backward at ``w + v`` -> ``step()``. A new
rule is one module here (a subclass of the engine implementing its hooks, see
:class:`awpfast.optim.WeightPerturbation`), its test, its docs and its option entry.
"""
from .awp import AWP
from .box import BoxAWP
from .rwp import RWP
from .sam import SAM

__all__ = ["AWP", "SAM", "BoxAWP", "RWP"]
