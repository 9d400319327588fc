"""Coreset baselines: a random real subset, herding and k-center, ``ipc`` real utterances per class.

Selection happens per class. Herding and k-center work in an embedding: by default θ0's penultimate
features (``model.embed``) with its BatchNorm statistics re-estimated on the training set (no weight is
trained; the product has θ0 anyway and this costs one forward pass). ``embed="trained"`` instead trains a
copy of θ0 on all training data for ``embed_epochs`` epochs first. The settings, including the schedule a device
trains a real subset with: :class:`~.settings.CoresetSettings`.

>>> syn = herding(train, DistillConfig(method="herding", ipc=10), model_cfg, theta0)   # doctest: +SKIP
>>> syn.X.shape, syn.schedule.optimizer                                                 # doctest: +SKIP
((80, 64, 298), 'adam')
"""
from __future__ import annotations

import time
from typing import Dict, List, Mapping

import numpy as np

from ..config import ModelConfig
from ..data import FeatureSet
from ..schedule import Schedule
from .base import DistillConfig, SyntheticSet
from .common import peak_rss_mb


def real_subset_schedule(n: int, seed: int, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                         augment: bool = True) -> Schedule:
    """How a device trains θ0 on ``n`` real utterances: Adam at ``lr``, about ``steps`` steps (at least 10
    epochs), mini-batches of ``batch_size`` (full batch below that), SpecAugment. Tuned on RAVDESS random subsets."""
    bs = 0 if n <= batch_size else batch_size
    steps_per_epoch = 1 if bs == 0 else -(-n // bs)
    epochs = max(10, int(round(steps / steps_per_epoch)))
    return Schedule(optimizer="adam", lr=lr, epochs=epochs, batch_size=bs, augment=augment, weight_decay=0.0,
                    seed=seed)


def class_indices(train: FeatureSet) -> List[np.ndarray]:
    """Indices of each class's utterances, in corpus order."""
    return [np.flatnonzero(train.y == c) for c in range(train.num_classes)]


def embed_features(train: FeatureSet, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray],
                   mode: str = "theta0", epochs: int = 2, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """Penultimate features of every training utterance under θ0 (BatchNorm statistics re-estimated on
    ``train``, weights untouched) or under θ0 briefly trained on ``train`` (``mode="trained"``)."""
    import torch

    from ..config import TrainConfig
    from ..models import build_model, load_state_arrays
    from ..train import fit

    model = load_state_arrays(build_model(model_cfg), theta0)
    if mode == "trained":
        fit(model, train.X, train.y, TrainConfig(epochs=int(epochs), seed=seed), num_classes=train.num_classes)
    elif mode != "theta0":
        raise ValueError(f"coreset embed must be 'theta0' or 'trained', got {mode!r}")
    X = torch.as_tensor(train.X)
    with torch.no_grad():
        if mode == "theta0":  # cumulative BN statistics over the whole training set
            bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for s in range(0, len(X), batch_size):
                model.embed(X[s: s + batch_size])
        model.eval()
        out = [model.embed(X[s: s + batch_size]).numpy() for s in range(0, len(X), batch_size)]
    return np.concatenate(out).astype(np.float64)


def herding_select(E: np.ndarray, k: int) -> np.ndarray:
    """Welling's herding: greedily pick rows of ``E`` whose running mean tracks the mean of all rows.

    >>> herding_select(np.array([[0.], [1.], [2.], [10.]]), 1).tolist()
    [2]
    """
    mu = E.mean(axis=0)
    chosen: List[int] = []
    total = np.zeros_like(mu)
    for i in range(min(k, len(E))):
        cand = np.linalg.norm(mu[None, :] - (total[None, :] + E) / (i + 1), axis=1)
        cand[chosen] = np.inf
        j = int(np.argmin(cand))
        chosen.append(j)
        total += E[j]
    return np.asarray(chosen, dtype=np.int64)


def kcenter_select(E: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-center (farthest-point) starting from the row nearest the mean.

    >>> kcenter_select(np.array([[0.], [1.], [2.], [10.]]), 2).tolist()
    [2, 3]
    """
    first = int(np.argmin(np.linalg.norm(E - E.mean(axis=0), axis=1)))
    chosen = [first]
    dist = np.linalg.norm(E - E[first], axis=1)
    for _ in range(1, min(k, len(E))):
        j = int(np.argmax(dist))
        chosen.append(j)
        dist = np.minimum(dist, np.linalg.norm(E - E[j], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def _result(train: FeatureSet, idx: np.ndarray, cfg: DistillConfig, t0: float, extra: Dict) -> SyntheticSet:
    stats = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "iterations": 0,
             "indices": idx.tolist()}
    short = {c: int((train.y == i).sum()) for i, c in enumerate(train.classes) if (train.y == i).sum() < cfg.ipc}
    if short:
        stats["short_classes"] = short  # classes with fewer than ipc utterances: all of them are taken
    stats.update(extra)
    s = cfg.settings
    schedule = real_subset_schedule(len(idx), cfg.seed, steps=s.steps, lr=s.lr, batch_size=s.batch_size,
                                    augment=s.augment)
    return SyntheticSet(X=train.X[idx].copy(), y=train.y[idx].copy(), classes=train.classes,
                        schedule=schedule, method=cfg.method, ipc=cfg.ipc, stats=stats)


def random_subset(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0, val=None,
                  progress: bool = False, workdir=None) -> SyntheticSet:
    """``ipc`` utterances per class drawn uniformly without replacement (``numpy`` generator, ``cfg.seed``)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    idx = np.concatenate([np.sort(rng.choice(ix, size=min(cfg.ipc, len(ix)), replace=False))
                          for ix in class_indices(train)])
    return _result(train, idx, cfg, t0, {})


def _embedded_select(select, train, cfg, model_cfg, theta0) -> SyntheticSet:
    t0 = time.perf_counter()
    mode = cfg.settings.embed
    E = embed_features(train, model_cfg, theta0, mode, cfg.settings.embed_epochs, cfg.seed)
    idx = np.concatenate([ix[select(E[ix], cfg.ipc)] for ix in class_indices(train)])
    return _result(train, idx, cfg, t0, {"embed": mode})


def herding(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0, val=None,
            progress: bool = False, workdir=None) -> SyntheticSet:
    """Per-class herding in θ0's embedding (see the module docstring). Deterministic."""
    return _embedded_select(herding_select, train, cfg, model_cfg, theta0)


def kcenter(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0, val=None,
            progress: bool = False, workdir=None) -> SyntheticSet:
    """Per-class greedy k-center in θ0's embedding (see the module docstring). Deterministic."""
    return _embedded_select(kcenter_select, train, cfg, model_cfg, theta0)
