"""The server's full-data fit and evaluation of a model on log-Mel features (the baseline, experts, teachers).

The loss and augmentations are the device recipe's (:mod:`edge_ser.schedule`), so a full-data fit and a device's
training on a pack treat clips alike; this module adds what only the server needs (AdamW or momentum SGD over
all the data, cosine annealing, class balancing, evaluation).

>>> from edge_ser.config import ModelConfig, TrainConfig          # doctest: +SKIP
>>> model = build_model(ModelConfig(num_classes=8), seed=0)         # doctest: +SKIP
>>> history = fit(model, train.X, train.y, TrainConfig(epochs=30))  # doctest: +SKIP
>>> evaluate_arrays(model, test.X, test.y, 8)["uar"]                # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .config import TrainConfig
from .metrics import scores
from .schedule import loss_fn, spec_augment, time_shift  # noqa: F401  (the device recipe; time_shift re-exported)


def set_threads(threads: Optional[int]) -> None:
    """Pin torch's intra-op threads (None leaves torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, cfg: TrainConfig = TrainConfig(),
        num_classes: Optional[int] = None, val: Optional[tuple] = None, progress: bool = False,
        on_epoch: Optional[Callable[[int, Dict], None]] = None) -> List[Dict]:
    """Train ``model`` in place on ``X`` (N, n_mels, frames) with labels ``y`` (N,) int or (N, C) soft.

    Cosine learning-rate decay, optional class balancing and SpecAugment (per ``cfg``). ``val=(Xv, yv)``
    adds validation UAR to each epoch's record. Returns one dict per epoch (loss, seconds, val_uar).
    """
    set_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y))
    soft = yt.dtype.is_floating_point
    C = num_classes or (yt.shape[1] if soft else int(yt.max()) + 1)
    weight = None
    if cfg.class_balance:
        counts = (yt.sum(0) if soft else torch.bincount(yt, minlength=C)).float()
        weight = torch.where(counts > 0, counts.sum() / (C * counts.clamp_min(1e-6)), torch.zeros_like(counts))
    opt = make_optimizer(model.parameters(), cfg)
    steps_per_epoch = max(1, -(-len(Xt) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    history: List[Dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(Xt), generator=gen)
        for s in range(0, len(Xt), cfg.batch_size):
            idx = order[s: s + cfg.batch_size]
            if len(idx) < 2 and len(Xt) >= 2:  # BatchNorm needs two examples
                continue
            xb, yb = Xt[idx], yt[idx]
            if cfg.specaugment:
                xb = spec_augment(xb, model.input_norm.mean, gen)
            loss = loss_fn(model(xb), yb, weight, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        record = {"epoch": epoch + 1, "loss": total / max(1, seen), "seconds": time.perf_counter() - t0}
        if val is not None:
            record["val_uar"] = evaluate_arrays(model, val[0], val[1], C)["uar"]
        history.append(record)
        if on_epoch:
            on_epoch(epoch, record)
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_uar")})
            bar.update(1)
    if bar is not None:
        bar.close()
    return history


@torch.no_grad()
def predict_logits(model: torch.nn.Module, X: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for ``X`` in eval mode, batched."""
    model.eval()
    out = [model(torch.as_tensor(np.asarray(X[i: i + batch_size], dtype=np.float32))).numpy()
           for i in range(0, len(X), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate_arrays(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, num_classes: int,
                    class_names=None) -> Dict:
    """UAR / WA / F1 / confusion of ``model`` on features ``X`` with labels ``y``."""
    pred = predict_logits(model, X).argmax(axis=1)
    return scores(y, pred, num_classes, class_names)
