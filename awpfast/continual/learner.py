"""Continual learners: plain SGD (fine-tuning), GPM, FS-ER and FS-DGPM on one code path.

=========  ============  ==========  ============  ===========================
method     replay        GPM memory  FS step       soft weights lam
=========  ============  ==========  ============  ===========================
sgd        no            no          no            -
gpm        no            yes         no            lam = 1 (hard projection)
fs-er      yes           no          yes           - (perturbation = full grad)
fs-dgpm    yes           yes         yes           learned, lam = sigmoid(tau*theta)
=========  ============  ==========  ============  ===========================

One ``observe(x, y)`` per incoming batch runs ``glances`` updates on it (the FS-DGPM PMNIST
protocol). An update: gradient (of the current-batch loss, or of the FS meta loss at the
perturbed weights on current + replayed samples), clip of its global norm, for DGPM one SGD
step on ``theta`` with ``d loss / d lam``, projection ``g <- g - (g M) diag(lam) M^T`` with
the updated ``lam``, optimizer step. ``end_task`` updates the GPM bases.

Soft weights: the official code stores ``lam`` raw, and after every step replaces each
``lam`` by a new ``nn.Parameter(sigmoid(tau * lam))``; its optimizer keeps pointing at the
replaced tensors, so after the first step of a task the used ``lam`` only follows the map
``lam <- sigmoid(tau * lam)`` (fixed point ~0.99995 for tau = 10), and no gradient reaches
it. Here ``lam = sigmoid(tau * theta)`` is a function of a persistent logit ``theta`` that
one optimizer (SGD with momentum, lr ``eta2``) updates every step by gradient descent on
the FS loss, which is what the paper describes: a soft weight per basis vector, learned.
``theta`` restarts at ``lam_init`` for every task (the official code also re-creates its
soft weights per task). docs/continual.md says more.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fs import fs_step
from .gpm import GPMMemory
from .replay import ReservoirMemory

__all__ = ["METHODS", "BASES", "SOFT", "Config", "ContinualLearner", "mlp", "acc_bwt"]

METHODS = ("sgd", "gpm", "fs-er", "fs-dgpm")
BASES = ("auto", "task", "replay")  #: Config.basis
SOFT = ("sigmoid", "bounded")       #: Config.soft


@dataclass
class Config:
    """Hyperparameters; the defaults are the official FS-DGPM PMNIST settings."""
    method: str = "fs-dgpm"
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 10
    glances: int = 5            #: updates per incoming batch
    epochs: int = 1
    grad_clip: float = 2.0      #: global gradient-norm clip, and the FS perturbation's element clip
    norm_clip: bool = True      #: apply the global gradient-norm clip (GPM's own code has none)
    memory_size: int = 200      #: reservoir replay capacity (fs-er, fs-dgpm)
    rep_samples: int = 300      #: samples used for the basis SVD after each task
    rep_layer_samples: Optional[Tuple[int, ...]] = None  #: per protected layer, the first n of those (GPM's batch_list)
    basis: str = "auto"         #: "task" (GPM: the finished task's samples, bases grow) or
    #: "replay" (official FS-DGPM: rebuild from the replay memory); "auto": gpm->task, fs-dgpm->replay
    thres: Union[float, Tuple[float, ...]] = 0.99  #: energy threshold of the first task (one, or one per layer)
    thres_add: float = 0.0005   #: added per task
    thres_last: float = 0.99999999999
    eta1: float = 0.05          #: FS perturbation step
    eta2: float = 0.01          #: learning rate of the soft-weight logits theta
    inner_steps: int = 2        #: FS inner chunks per batch
    tau: float = 10.0           #: sigmoid temperature, lam = sigmoid(tau * theta)
    lam_init: float = 1.0       #: initial theta of each task
    learn_lambda: bool = True   #: False: lam stays sigmoid(tau * lam_init), the official code's effective behaviour
    soft: str = "sigmoid"       #: "sigmoid": lam = sigmoid(tau*theta); "bounded": lam itself, projected SGD on [lam_floor, 1]
    lam_floor: float = 0.5      #: lower bound of the bounded soft weights
    task_classes: int = 0       #: > 0: multi-head, label y uses the output block y // task_classes (its task's head)
    freeze_bn_after_first: bool = False  #: BatchNorm affine parameters learn on task 0 only (GPM's AlexNet)
    eval_batch: int = 1000      #: test batch (matters for BatchNorm without running statistics)
    second_order: bool = False  #: FS through the inner gradients (functional path)
    backend: Optional[str] = None  #: seam backend for the perturb/restore ops

    def validate(self) -> "Config":
        """Raise ValueError naming the bad field; return self."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be 'auto', 'task' or 'replay', got {self.basis!r}")
        for name in ("lr", "momentum", "grad_clip", "eta1", "eta2", "tau", "lam_init", "lam_floor", "thres_add",
                     "thres_last"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("batch_size", "glances", "epochs", "inner_steps", "rep_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eta1", "eta2", "grad_clip", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.soft not in SOFT:
            raise ValueError(f"soft must be one of {', '.join(SOFT)}, got {self.soft!r}")
        if not 0.0 <= self.lam_floor < 1.0:
            raise ValueError(f"lam_floor must be in [0, 1), got {self.lam_floor}")
        ths = self.thres if isinstance(self.thres, (tuple, list)) else (self.thres,)
        if not ths or not all(0.0 < float(t) <= 1.0 for t in ths):
            raise ValueError(f"thres must lie in (0, 1], got {self.thres}")
        if not self.thres_add >= 0.0:
            raise ValueError(f"thres_add must be >= 0 (the threshold grows per task), got {self.thres_add}")
        if self.rep_layer_samples is not None and any(int(k) < 1 for k in self.rep_layer_samples):
            raise ValueError(f"rep_layer_samples must be >= 1 each, got {self.rep_layer_samples}")
        if self.task_classes < 0 or self.eval_batch < 1:
            raise ValueError("task_classes must be >= 0 and eval_batch >= 1")
        if self.memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {self.memory_size}")
        if self.basis_source == "replay" and self.memory_size < 1:
            raise ValueError("basis='replay' needs a replay memory: memory_size >= 1")
        return self

    @property
    def uses_gpm(self) -> bool:
        return self.method in ("gpm", "fs-dgpm")

    @property
    def uses_fs(self) -> bool:
        return self.method in ("fs-er", "fs-dgpm")

    @property
    def uses_replay(self) -> bool:
        return self.method in ("fs-er", "fs-dgpm")

    @property
    def basis_source(self) -> str:
        if self.basis != "auto":
            return self.basis
        return "replay" if self.method == "fs-dgpm" else "task"

    def threshold(self, task: int):
        """The energy threshold(s) after ``task``: ``thres + task * thres_add``, capped at ``thres_last``."""
        if isinstance(self.thres, (tuple, list)):
            return [min(float(t) + task * self.thres_add, self.thres_last) for t in self.thres]
        return min(self.thres + task * self.thres_add, self.thres_last)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("thres", "rep_layer_samples"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d


def acc_bwt(acc_matrix) -> tuple:
    """(ACC, BWT) of a T x T accuracy matrix: ACC = mean of the last row; BWT = mean over
    j < T-1 of ``acc[T-1][j] - acc[j][j]`` (0 for one task)."""
    T = len(acc_matrix)
    last = acc_matrix[T - 1]
    acc = sum(last) / T
    bwt = sum(last[j] - acc_matrix[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    return acc, bwt


def mlp(n_in: int, hidden: int = 100, n_out: int = 10) -> nn.Sequential:
    """The bias-free MLP ``n_in-hidden-hidden-n_out`` with ReLUs of the PMNIST benchmarks."""
    return nn.Sequential(nn.Linear(n_in, hidden, bias=False), nn.ReLU(),
                         nn.Linear(hidden, hidden, bias=False), nn.ReLU(),
                         nn.Linear(hidden, n_out, bias=False))


@dataclass
class _Stats:
    steps: int = 0
    lam_min: List[float] = field(default_factory=list)
    lam_mean: List[float] = field(default_factory=list)


class ContinualLearner:
    """Trains ``model`` on a stream of tasks with one of ``METHODS`` (see the module docstring).

    ``generator`` (CPU) drives every random choice outside the model's initialization:
    batch shuffles, replay sampling, the samples used for the bases. ``protect``: the
    ``nn.Linear`` / ``nn.Conv2d`` modules GPM protects (default: all of them; leave task
    heads out).
    """

    def __init__(self, model: nn.Module, cfg: Config, generator: Optional[torch.Generator] = None,
                 protect: Optional[Sequence[nn.Module]] = None):
        self.cfg = cfg.validate()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.memory = GPMMemory(model, self.params, layers=protect) if cfg.uses_gpm else None
        self.bn_index = [i for i, p in enumerate(self.params)
                         if any(p is q for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                for q in m.parameters(recurse=False))]
        self.replay = ReservoirMemory(cfg.memory_size if (cfg.uses_replay or cfg.basis_source == "replay") else 0,
                                      self.gen)
        self.backups = [torch.empty_like(p) for p in self.params] if cfg.uses_fs else None
        self.theta: Optional[List[Optional[torch.Tensor]]] = None
        self.opt_theta = None
        self.optimizer = None
        self.task = -1
        self.stats = _Stats()

    # ------------------------------------------------------------------ tasks
    def begin_task(self, t: int) -> None:
        """Fresh optimizer (and, for DGPM, fresh soft weights) for task ``t``."""
        self.task = t
        self.optimizer = torch.optim.SGD(self.params, lr=self.cfg.lr, momentum=self.cfg.momentum)
        self.theta, self.opt_theta = None, None
        if self.cfg.method == "fs-dgpm" and not self.memory.is_empty():
            start = 1.0 if self.cfg.soft == "bounded" else float(self.cfg.lam_init)
            self.theta = [None if M is None else torch.full((M.shape[1],), start, dtype=M.dtype, device=M.device)
                          for M in self.memory.bases]
            live = [th for th in self.theta if th is not None]
            self.opt_theta = torch.optim.SGD(live, lr=self.cfg.eta2, momentum=self.cfg.momentum)

    def lambdas(self) -> Optional[List[Optional[torch.Tensor]]]:
        """The soft weights in use (``None``: hard projection, lam = 1)."""
        if self.theta is None:
            return None
        if self.cfg.soft == "bounded":
            return [None if th is None else th.clone() for th in self.theta]
        return [None if th is None else torch.sigmoid(self.cfg.tau * th) for th in self.theta]

    @torch.no_grad()
    def end_task(self, x_task: torch.Tensor) -> None:
        """Update the GPM bases after a task (``x_task``: that task's training inputs)."""
        if self.memory is None:
            return
        cfg = self.cfg
        th = cfg.threshold(self.task)
        xs = self.replay.all()[0] if cfg.basis_source == "replay" else x_task
        pick = torch.randperm(len(xs), generator=self.gen)[:cfg.rep_samples]
        reps = self.memory.representations(xs[pick])
        if cfg.rep_layer_samples:
            n = len(pick)  # columns are sample-major: the first k samples are the first k * (columns / n)
            reps = [R[:, :min(k, n) * (R.shape[1] // n)] for R, k in zip(reps, cfg.rep_layer_samples)]
        self.memory.update(reps, th, rebuild=cfg.basis_source == "replay")
        if self.theta is not None:
            lam = torch.cat([t for t in self.lambdas() if t is not None])
            self.stats.lam_min.append(float(lam.min()))
            self.stats.lam_mean.append(float(lam.mean()))

    def memory_bytes(self) -> dict:
        """Bytes held by the GPM bases, the soft-weight logits and the replay memory."""
        return {"bases": self.memory.memory_bytes() if self.memory else 0,
                "soft_weights": sum(t.numel() * t.element_size() for t in (self.theta or []) if t is not None),
                "replay": self.replay.memory_bytes()}

    # ------------------------------------------------------------------ training
    def _block(self, logits, y):
        """Multi-head outputs: each sample's own task block of ``task_classes`` logits and its label in it."""
        C = self.cfg.task_classes
        blocks = logits.reshape(logits.shape[0], -1, C)
        return blocks[torch.arange(len(y), device=y.device), torch.div(y, C, rounding_mode="floor")], y % C

    def _loss(self, logits, y):
        if self.cfg.task_classes:
            logits, y = self._block(logits, y)
        return F.cross_entropy(logits, y)

    def observe(self, x: torch.Tensor, y: torch.Tensor, remember: bool = True) -> float:
        """Train on one incoming batch (``glances`` updates); returns the last loss.
        ``remember=False``: do not offer the batch to the replay memory (later epochs)."""
        if self.optimizer is None:
            raise RuntimeError("call begin_task(t) before observe()")
        loss = 0.0
        for _ in range(self.cfg.glances):
            perm = torch.randperm(x.shape[0], generator=self.gen)
            xb, yb = x[perm], y[perm]
            loss = self._update(xb, yb)
        if self.replay.capacity and remember:
            self.replay.add(x, y)
        return loss

    def _update(self, x, y) -> float:
        cfg = self.cfg
        lam_grads = None
        if cfg.uses_fs:
            if cfg.uses_replay and len(self.replay):
                rx, ry = self.replay.sample(x.shape[0])
                mx, my = torch.cat([x, rx.to(x.device)]), torch.cat([y, ry.to(y.device)])
            else:
                mx, my = x, y
            n = x.shape[0]
            size = -(-n // cfg.inner_steps)
            chunks = [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]
            lambdas = self.lambdas()
            res = fs_step(self.model, self.params, self._loss, chunks, (mx, my), eta1=cfg.eta1, clip=cfg.grad_clip,
                          memory=self.memory, lambdas=lambdas, lambda_grad=self.theta is not None and cfg.learn_lambda,
                          backups=self.backups, second_order=cfg.second_order, backend=cfg.backend)
            grads, lam_grads, loss = res.grads, res.lambda_grads, res.loss
            for p, g in zip(self.params, grads):
                p.grad = g
        else:
            self.optimizer.zero_grad(set_to_none=False)
            loss = self._loss(self.model(x), y)
            loss.backward()
            loss = loss.detach()
        if self.task > 0 and cfg.freeze_bn_after_first:
            for i in self.bn_index:
                self.params[i].grad.zero_()
        if cfg.norm_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        lambdas = None
        if self.theta is not None and lam_grads is not None:
            lambdas = self._step_theta(lam_grads)
        if self.memory is not None and not self.memory.is_empty():
            self.memory.project_out_([p.grad for p in self.params], lambdas)
        self.optimizer.step()
        self.stats.steps += 1
        return float(loss)

    def _step_theta(self, lam_grads):
        """Sigmoid: d loss / d theta = d loss / d lam * tau * lam * (1 - lam); clip; SGD step.
        Bounded: the same step on lam itself (d loss / d lam), then lam clamped to [lam_floor, 1].
        Returns the new lam."""
        cfg = self.cfg
        live = []
        for th, gl in zip(self.theta, lam_grads):
            if th is None:
                continue
            g = gl if gl is not None else torch.zeros_like(th)
            if cfg.soft == "sigmoid":
                lam = torch.sigmoid(cfg.tau * th)
                g = g * (cfg.tau * lam * (1 - lam))
            th.grad = g
            live.append(th)
        torch.nn.utils.clip_grad_norm_(live, cfg.grad_clip)
        self.opt_theta.step()
        if cfg.soft == "bounded":
            with torch.no_grad():
                for th in live:
                    th.clamp_(cfg.lam_floor, 1.0)
        return self.lambdas()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch: Optional[int] = None) -> float:
        """Top-1 accuracy in percent (multi-head: within each sample's task block)."""
        correct = 0
        batch = batch or self.cfg.eval_batch
        for i in range(0, len(y), batch):
            out, yy = self.model(x[i:i + batch]), y[i:i + batch]
            if self.cfg.task_classes:
                out, yy = self._block(out, yy)
            correct += int((out.argmax(1) == yy).sum())
        return 100.0 * correct / max(len(y), 1)
