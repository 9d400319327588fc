"""Distribution Matching (DM, Zhao & Bilen, WACV 2023): match mean embeddings of real and synthetic data
under randomly initialised networks, one fresh network per iteration.

Read top to bottom like the reference code (DatasetCondensation/main_DM.py). The synthetic log-Mels are
optimised in θ0's normalised input space (``(x - mean) / std`` per Mel band) so the paper's image
learning rate (1.0, SGD momentum 0.5) applies; they are stored back in raw log-Mel space. BatchNorm
networks embed all classes of a batch in one forward pass (train-mode statistics), as the reference
does for ``ConvNetBN``.

The settings (image learning rate, real batch, the schedule a pack ships, default iterations):
:class:`~.settings.DMSettings`.

>>> syn = distill_dm(train, DistillConfig(method="dm", ipc=10, iterations=200), model_cfg, theta0)  # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Mapping, Optional

import numpy as np

from ..config import ModelConfig
from ..data import FeatureSet
from ..schedule import Schedule
from .base import DistillConfig, SyntheticSet
from .common import peak_rss_mb, setup_threads
from .coreset import class_indices


def paper_schedule(n: int, cfg: DistillConfig) -> Schedule:
    """The DC/DM evaluation recipe, shortened (:class:`~.settings.PaperScheduleSettings`): SGD with momentum
    and weight decay, mini-batches (the whole set when it is smaller)."""
    s = cfg.settings
    return Schedule(optimizer="sgd", lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, epochs=s.epochs,
                    batch_size=0 if n <= s.batch_size else s.batch_size, augment=False, seed=cfg.seed)


def random_net(model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray], seed: int, use_theta0: bool):
    """θ0 itself, or a fresh init (``build_model(model_cfg, seed)``) with θ0's input statistics."""
    from .evaluate import init_model

    if use_theta0:
        return init_model(model_cfg, theta0, "theta0")
    return init_model(model_cfg, theta0, "random", seed - 1000)


def init_synthetic(train: FeatureSet, cfg: DistillConfig, rng: np.random.Generator):
    """(X, y): ``ipc`` random real utterances per class (``cfg.init="real"``) or Gaussian noise with the
    training set's per-band mean and std (``"noise"``); y hard labels, class-major order."""
    idx, X = [], []
    for ix in class_indices(train):
        idx.append(rng.choice(ix, size=cfg.ipc, replace=len(ix) < cfg.ipc))
    idx = np.concatenate(idx)
    if cfg.init == "real":
        X = train.X[idx].copy()
    else:
        mean = train.X.mean(axis=(0, 2))[None, :, None]
        std = train.X.std(axis=(0, 2))[None, :, None]
        X = (mean + std * rng.standard_normal((len(idx),) + train.X.shape[1:])).astype(np.float32)
    y = np.repeat(np.arange(train.num_classes), cfg.ipc).astype(np.int64)
    return X, y, idx


def teacher_soft_labels(train: FeatureSet, X: np.ndarray, model_cfg, theta0, epochs: int, seed: int,
                        temperature: float = 2.0) -> np.ndarray:
    """Soft labels for ``X`` from θ0 trained ``epochs`` epochs on real data (softmax at ``temperature``)."""
    import torch

    from ..config import TrainConfig
    from ..train import fit, predict_logits
    from .evaluate import init_model

    teacher = init_model(model_cfg, theta0, "theta0")
    fit(teacher, train.X, train.y, TrainConfig(epochs=int(epochs), seed=seed), num_classes=train.num_classes)
    logits = torch.as_tensor(predict_logits(teacher, X)) / temperature
    return torch.softmax(logits, dim=1).numpy().astype(np.float32)


def validation_uar(X, y, schedule, model_cfg, theta0, val: Optional[FeatureSet]) -> Optional[float]:
    """Train θ0 on (X, y) with ``schedule`` and return UAR on ``val`` (None without ``val``)."""
    if val is None:
        return None
    from ..schedule import train_schedule
    from ..train import evaluate_arrays
    from .evaluate import init_model

    model = init_model(model_cfg, theta0, "theta0")
    train_schedule(model, X, y, schedule)
    return float(evaluate_arrays(model, val.X, val.y, model_cfg.num_classes)["uar"])


def distill_dm(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray],
               val: Optional[FeatureSet] = None, progress: bool = False, workdir=None) -> SyntheticSet:
    """Distribution Matching for ``model_cfg`` networks; see the module docstring for the params."""
    import torch

    setup_threads(cfg.threads)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    s = cfg.settings
    iterations = cfg.iterations_or_default
    lr_img, batch_real, theta0_prob, eval_every = s.lr_img, s.batch_real, s.theta0_prob, s.eval_every
    C = train.num_classes
    by_class = class_indices(train)

    # 1. synthetic data, in θ0's normalised input space
    mean = torch.as_tensor(np.asarray(theta0["input_norm.mean"]))[None, :, None]
    std = torch.as_tensor(np.asarray(theta0["input_norm.std"])).clamp_min(1e-3)[None, :, None]
    X0, y_syn, init_idx = init_synthetic(train, cfg, rng)
    z_syn = ((torch.as_tensor(X0) - mean) / std).requires_grad_(True)
    optimizer_img = torch.optim.SGD([z_syn], lr=lr_img, momentum=0.5)
    schedule = paper_schedule(len(y_syn), cfg)
    history = []

    def current_X():
        return (z_syn.detach() * std + mean).numpy().astype(np.float32)

    bar = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="dm", unit="it")
    for it in bar:
        # 2. a fresh network (or θ0), used only as a feature extractor
        net = random_net(model_cfg, theta0, int(rng.integers(1 << 30)) + 1000, rng.random() < theta0_prob)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)

        # 3. mean embedding per class, real vs synthetic; all classes in one forward pass (BatchNorm)
        real_idx = np.concatenate([rng.choice(ix, size=min(batch_real, len(ix)), replace=False) for ix in by_class])
        real_y = train.y[real_idx]
        with torch.no_grad():
            emb_real = net.embed(torch.as_tensor(train.X[real_idx]))
        emb_syn = net.embed(z_syn * std + mean)
        loss = torch.zeros(())
        for c in range(C):
            mu_real = emb_real[torch.as_tensor(real_y == c)].mean(dim=0)
            mu_syn = emb_syn[c * cfg.ipc:(c + 1) * cfg.ipc].mean(dim=0)
            loss = loss + ((mu_real - mu_syn) ** 2).sum()

        # 4. update the synthetic data
        optimizer_img.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_img.step()

        record = {"iteration": it + 1, "loss": float(loss.detach()) / C}
        if val is not None and (it + 1 == iterations or (eval_every and (it + 1) % eval_every == 0)):
            record["val_uar"] = validation_uar(current_X(), y_syn, schedule, model_cfg, theta0, val)
        history.append(record)
        if progress:
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_uar")})

    X = current_X()
    y = y_syn
    if cfg.soft_labels:
        y = teacher_soft_labels(train, X, model_cfg, theta0, s.teacher_epochs, cfg.seed)
    stats = {"seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(), "iterations": iterations,
             "init_indices": init_idx.tolist(), "history": history}
    return SyntheticSet(X=X, y=y, classes=train.classes, schedule=schedule, method=cfg.method, ipc=cfg.ipc,
                        stats=stats)
