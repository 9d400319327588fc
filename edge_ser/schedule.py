"""The device recipe: how a device trains the fixed initialisation on a synthetic set, in one place.

The :class:`Schedule` (optimiser, step size and decay, epochs, mini-batch, augmentation) travels in a pack; the
augmentations (:func:`time_shift`, :func:`spec_augment`), the loss (:func:`loss_fn`), the optimiser step
(:class:`DeviceOptimizer`) and the loop (:func:`train_schedule`) are what a device runs. Distillation optimises
the synthetic set *for this exact procedure* (and may learn its step size), every server-side score trains with
it, and ``train-local`` replays it, so server-side evaluation and on-device training cannot drift apart. The
server's full-data fit (:mod:`edge_ser.train`) borrows the loss and SpecAugment from here, not the other way round.

>>> s = Schedule(lr=0.02, epochs=200)
>>> Schedule.from_dict(s.to_dict()) == s
True
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from .config import _JsonMixin

if TYPE_CHECKING:   # torch is imported where it is used: reading a schedule needs only numpy
    import torch


@dataclass(frozen=True)
class Schedule(_JsonMixin):
    optimizer: str = "sgd"      # "sgd" | "adam"
    lr: float = 0.01            # learned by the distiller where it can be
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 100           # passes over the synthetic set
    batch_size: int = 0         # 0: the whole synthetic set in every step
    augment: bool = False       # SpecAugment-style masking on the synthetic set
    seed: int = 0
    shift: int = 0              # roll each example along time by up to this many frames (pack format >= 1.2)
    decay: str = "none"         # "none": constant lr; "cosine": lr * (1 + cos(pi * step / steps)) / 2 (>= 1.2)

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"schedule optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"schedule lr must be a positive finite number, got {self.lr!r}")
        if self.epochs < 1 or self.batch_size < 0:
            raise ValueError("schedule needs epochs >= 1 and batch_size >= 0")
        if self.decay not in ("none", "cosine"):
            raise ValueError(f"schedule decay must be 'none' or 'cosine', got {self.decay!r}")
        if not (isinstance(self.shift, (int, np.integer)) and self.shift >= 0):
            raise ValueError(f"schedule shift must be a whole number of frames >= 0, got {self.shift!r}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        for key, off in (("shift", 0), ("decay", "none")):
            if d[key] == off:
                del d[key]      # so a schedule without them still reads on edge-ser before pack format 1.2
        return d

    def lr_at(self, step: int, total: int) -> float:
        """The step size of optimiser step ``step`` (0-based) of ``total``."""
        if self.decay == "cosine":
            return float(self.lr * 0.5 * (1.0 + np.cos(np.pi * step / max(1, total))))
        return float(self.lr)

    def steps(self, n: int) -> int:
        """Optimiser steps for a synthetic set of ``n`` samples."""
        bs = n if self.batch_size in (0, None) or self.batch_size >= n else self.batch_size
        return self.epochs * (-(-n // bs))


def spec_augment(x: "torch.Tensor", fill: "torch.Tensor", gen: "torch.Generator",
                 max_time: int = 30, max_freq: int = 8) -> "torch.Tensor":
    """One time mask and one frequency mask per example, filled with the per-band mean ``fill``."""
    import torch

    x = x.clone()
    b, n_mels, frames = x.shape
    for i in range(b):
        t = int(torch.randint(0, max_time + 1, (1,), generator=gen))
        t0 = int(torch.randint(0, max(1, frames - t), (1,), generator=gen))
        f = int(torch.randint(0, max_freq + 1, (1,), generator=gen))
        f0 = int(torch.randint(0, max(1, n_mels - f), (1,), generator=gen))
        x[i, :, t0:t0 + t] = fill[:, None]
        x[i, f0:f0 + f, :] = fill[f0:f0 + f, None]
    return x


def time_shift(x: "torch.Tensor", max_shift: int, gen: "torch.Generator") -> "torch.Tensor":
    """Roll every example along time by its own whole number of frames in ``[-max_shift, max_shift]``
    (circular: the frames pushed off one end come back at the other, as a repeated clip would).
    Differentiable in ``x`` (a gather), so the distiller can unroll through it."""
    import torch

    b, n_mels, frames = x.shape
    shifts = torch.randint(-int(max_shift), int(max_shift) + 1, (b,), generator=gen)
    index = (torch.arange(frames)[None, :] - shifts[:, None]) % frames
    return torch.gather(x, 2, index[:, None, :].expand(b, n_mels, frames))


def loss_fn(logits: "torch.Tensor", target: "torch.Tensor", weight: "Optional[torch.Tensor]" = None,
            label_smoothing: float = 0.0) -> "torch.Tensor":
    """Cross-entropy for hard labels (int) or soft labels (float rows summing to 1)."""
    import torch.nn.functional as F

    if target.dtype.is_floating_point:
        logp = F.log_softmax(logits, dim=1)
        per = -(target * logp)
        if weight is not None:
            per = per * weight[None, :]
        return per.sum(dim=1).mean()
    return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)


class DeviceOptimizer:
    """The schedule's optimiser step: torch.optim's single-tensor SGD (momentum, weight decay) and Adam
    updates, the same operations in the same order (bit for bit; tested against torch.optim), without
    torch.optim itself: constructing any torch.optim optimiser imports ``torch._dynamo`` and with it sympy
    and ~800 modules, about 55 MB of resident memory that a small device needs for training.

    >>> opt = DeviceOptimizer(model.parameters(), Schedule(lr=0.1))   # doctest: +SKIP
    >>> loss.backward(); opt.step(); opt.zero_grad()                   # doctest: +SKIP
    """

    BETAS = (0.9, 0.999)    # torch.optim.Adam's defaults
    EPS = 1e-8

    def __init__(self, params, schedule: Schedule):
        self.params = list(params)
        self.schedule = schedule
        self.lr = float(schedule.lr)            # the current step size (train_schedule sets it every step)
        self.state: List[Optional[object]] = [None] * len(self.params)   # momentum buffer, or Adam's moments
        self.steps = [0] * len(self.params)     # per parameter, as torch.optim counts them (updates it got)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        s = self.schedule
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                self.steps[i] += 1
                grad = p.grad
                if s.weight_decay != 0:
                    grad = grad.add(p, alpha=s.weight_decay)
                if s.optimizer == "sgd":
                    if s.momentum != 0:
                        if self.state[i] is None:
                            self.state[i] = grad = grad.detach().clone()
                        else:
                            grad = self.state[i].mul_(s.momentum).add_(grad, alpha=1)
                    p.add_(grad, alpha=-self.lr)
                    continue
                if self.state[i] is None:
                    self.state[i] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                     torch.zeros_like(p, memory_format=torch.preserve_format))
                exp_avg, exp_avg_sq = self.state[i]
                beta1, beta2 = self.BETAS
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = float(self.steps[i])
                step_size = self.lr / (1 - beta1 ** step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.EPS)
                p.addcdiv_(exp_avg, denom, value=-step_size)


def train_schedule(model, X: np.ndarray, y: np.ndarray, schedule: Schedule, progress: bool = False,
                   on_step=None, chunk_floats: Optional[int] = None, micro_batch: Optional[int] = None) -> List[Dict]:
    """Train ``model`` (in place, from whatever weights it holds: θ0 on a device) on the synthetic set.

    ``y`` is int labels (N,) or soft labels (N, C). Deterministic for a given torch build and thread
    count. Returns one record per epoch (loss, seconds). ``chunk_floats``: train through the model's
    ``forward_chunked`` (the same numbers in a fraction of the activation memory, for a tight budget).
    ``micro_batch``: accumulate each step's gradient over micro-batches of that many samples: the same
    steps, order and augmentation draws; only BatchNorm's batch statistics come from the micro-batches
    (so the result is close to, not equal to, the exact schedule's).
    """
    import torch

    gen = torch.Generator().manual_seed(schedule.seed)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y))
    n = len(Xt)
    bs = n if schedule.batch_size in (0, None) or schedule.batch_size >= n else schedule.batch_size
    opt = DeviceOptimizer(model.parameters(), schedule)
    total_steps, step_no = schedule.steps(n), 0
    history: List[Dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=schedule.epochs, desc="train-local", unit="epoch", leave=False)
    lean = bool(chunk_floats) and hasattr(model, "forward_chunked")
    bn_stats = [b for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                for b in (m.running_mean, m.running_var)] if lean else []
    model.train()
    for epoch in range(schedule.epochs):
        t0, total = time.perf_counter(), 0.0
        order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        for s in range(0, n, bs):
            idx = order[s: s + bs]
            xb = Xt[idx]
            if schedule.shift:
                xb = time_shift(xb, schedule.shift, gen)
            if schedule.augment:
                xb = spec_augment(xb, model.input_norm.mean, gen)
            opt.zero_grad(set_to_none=True)
            if micro_batch and micro_batch < len(idx):
                for m in range(0, len(idx), micro_batch):
                    part = loss_fn(model(xb[m: m + micro_batch]), yt[idx[m: m + micro_batch]])
                    part = part * (len(idx[m: m + micro_batch]) / len(idx))
                    part.backward()
                    total += float(part.detach()) * len(idx)
            else:
                if lean:
                    loss = loss_fn(model.forward_chunked(xb, chunk_floats), yt[idx])
                    running = [b.detach().clone() for b in bn_stats]   # backward's recomputation updates them again
                else:
                    loss = loss_fn(model(xb), yt[idx])
                loss.backward()
                if lean:
                    with torch.no_grad():
                        for b, r in zip(bn_stats, running):
                            b.copy_(r)
                total += float(loss.detach()) * len(idx)
            opt.lr = schedule.lr_at(step_no, total_steps)
            opt.step()
            step_no += 1
            if on_step:
                on_step()
        history.append({"epoch": epoch + 1, "loss": total / n, "seconds": time.perf_counter() - t0})
        if bar is not None:
            bar.set_postfix(loss=f"{total / n:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return history
