"""The evaluation protocol shared by tests and benchmarks: train on a (synthetic) set, score UAR on held-out speakers.

Two initialisations: ``"theta0"`` (the deployment case: the fixed θ0 from the pack, the schedule's
seed varied per run) and ``"random"`` (fresh inits ``build_model(model_cfg, seed=1000+s)`` with θ0's
input statistics copied in, so only the learnable weights differ). Results are mean ± std over seeds.

>>> res = evaluate_synthetic(syn, model_cfg, theta0, test, seeds=(0, 1, 2))   # doctest: +SKIP
>>> f"{100 * res['uar_mean']:.1f} ± {100 * res['uar_std']:.1f}"                 # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..config import ModelConfig, TrainConfig
from ..data import FeatureSet
from ..metrics import mean_std

INITS = ("theta0", "random")


def init_model(model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray], init: str = "theta0", seed: int = 0):
    """A model ready to train: θ0 itself (``init="theta0"``) or a fresh random init ``seed=1000+seed``
    carrying θ0's input-normalisation statistics (``init="random"``)."""
    import torch

    from ..models import build_model, load_state_arrays

    if init == "theta0":
        return load_state_arrays(build_model(model_cfg), theta0)
    if init == "random":
        model = build_model(model_cfg, seed=1000 + int(seed))
        with torch.no_grad():
            for key in ("input_norm.mean", "input_norm.std"):
                model.get_buffer(key).copy_(torch.as_tensor(np.asarray(theta0[key])))
        return model
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _summary(runs: Sequence[Dict], extra: Optional[Dict] = None) -> Dict:
    uars = [r["uar"] for r in runs]
    was = [r["wa"] for r in runs]
    f1s = [r["f1"] for r in runs]
    u_m, u_s = mean_std(uars)
    w_m, w_s = mean_std(was)
    f_m, f_s = mean_std(f1s)
    out = {"uar_mean": u_m, "uar_std": u_s, "uars": uars, "wa_mean": w_m, "wa_std": w_s, "was": was,
           "f1_mean": f_m, "f1_std": f_s, "seeds": [r["seed"] for r in runs],
           "train_seconds": [r["seconds"] for r in runs]}
    out.update(extra or {})
    return out


def evaluate_synthetic(syn, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray], test: FeatureSet,
                       seeds: Iterable[int] = (0, 1, 2), init: str = "theta0", progress: bool = False) -> Dict:
    """Train on ``syn.X, syn.y`` with ``syn.schedule`` once per seed and score on ``test``.

    Returns ``dict(uar_mean, uar_std, uars, wa_mean, wa_std, was, f1_mean, f1_std, seeds, train_seconds,
    init, n_train)``. From θ0 the runs differ only through the schedule's seed (batch order, augmentation);
    with a full-batch, non-augmented schedule they are identical, so the std is then 0 by construction.

    >>> evaluate_synthetic(syn, model_cfg, theta0, test, seeds=(0,), init="random")["uar_mean"]  # doctest: +SKIP
    """
    from ..schedule import train_schedule
    from ..train import evaluate_arrays

    runs = []
    for s in seeds:
        model = init_model(model_cfg, theta0, init, s)
        sched = dataclasses.replace(syn.schedule, seed=int(syn.schedule.seed) + int(s))
        t0 = time.perf_counter()
        train_schedule(model, syn.X, syn.y, sched, progress=progress)
        sc = evaluate_arrays(model, test.X, test.y, model_cfg.num_classes)
        runs.append({"seed": int(s), "uar": sc["uar"], "wa": sc["wa"], "f1": sc["f1"],
                     "seconds": time.perf_counter() - t0})
    return _summary(runs, {"init": init, "n_train": int(len(syn.X))})


def evaluate_full(train: FeatureSet, test: FeatureSet, model_cfg: ModelConfig, seeds: Iterable[int] = (0, 1, 2),
                  train_cfg: TrainConfig = TrainConfig(epochs=30), theta0: Optional[Mapping[str, np.ndarray]] = None,
                  inits: Sequence[str] = INITS, progress: bool = False) -> Dict[str, Dict]:
    """The full-data baseline: :func:`edge_ser.train.fit` on all of ``train`` from θ0 and/or random inits.

    ``theta0`` defaults to ``build_model(model_cfg, seed=0)`` with ``train``'s input statistics (what
    ``edge-ser pack --seed 0`` ships). From θ0 the seed varies ``train_cfg.seed`` (batch order,
    SpecAugment); from random inits it also picks the init (``1000 + seed``). Returns ``{init: summary}``
    with the keys of :func:`evaluate_synthetic`.

    >>> evaluate_full(train, test, model_cfg, seeds=(0,), train_cfg=TrainConfig(epochs=1))  # doctest: +SKIP
    """
    from ..models import build_model, input_stats, set_input_stats, state_arrays
    from ..train import evaluate_arrays, fit

    if theta0 is None:
        model = build_model(model_cfg, seed=0)
        set_input_stats(model, *input_stats(train.X))
        theta0 = state_arrays(model)
    out = {}
    for init in inits:
        runs = []
        for s in seeds:
            model = init_model(model_cfg, theta0, init, s)
            t0 = time.perf_counter()
            fit(model, train.X, train.y, dataclasses.replace(train_cfg, seed=int(s)),
                num_classes=model_cfg.num_classes, progress=progress)
            sc = evaluate_arrays(model, test.X, test.y, model_cfg.num_classes)
            runs.append({"seed": int(s), "uar": sc["uar"], "wa": sc["wa"], "f1": sc["f1"],
                         "seconds": time.perf_counter() - t0})
        out[init] = _summary(runs, {"init": init, "n_train": int(len(train)), "train_config": train_cfg.to_dict()})
    return out
