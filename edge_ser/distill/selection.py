"""Scoring a synthetic set the way a device will use it, and choosing the device's step size and epochs.

Every score trains θ0 on the set with exactly ``train_schedule`` (the device's loop) and measures UAR on held-out
speakers, so what the server selects is what a device gets.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ..config import ModelConfig
from ..schedule import Schedule
from .common import make_bar


def score(model, val, num_classes: int) -> float:
    """UAR of ``model`` on ``val``: one FeatureSet, or a tuple of them (the mean of their UARs)."""
    from ..train import evaluate_arrays

    sets = val if isinstance(val, (tuple, list)) else (val,)
    return float(np.mean([evaluate_arrays(model, fs.X, fs.y, num_classes)["uar"] for fs in sets]))


def val_uar(X, y, schedule: Schedule, model_cfg: ModelConfig, theta0, val) -> float:
    """Validation UAR (see :func:`score`) of θ0 trained on (X, y) with exactly ``train_schedule``."""
    from ..models import build_model, load_state_arrays
    from ..schedule import train_schedule

    model = load_state_arrays(build_model(model_cfg, 0), theta0)
    train_schedule(model, X, y, schedule)
    return score(model, val, model_cfg.num_classes)


def select_schedule(X, y, schedule: Schedule, model_cfg: ModelConfig, theta0, val, lr_factors=(1.0,),
                    epoch_grid=(10, 20, 30, 40), extra_lrs=(), progress: bool = False
                    ) -> Tuple[Schedule, float, List[Dict]]:
    """Pick the (lr, epochs) with the best validation UAR, training θ0 exactly as ``train_schedule`` does.
    The step sizes tried: ``schedule.lr`` times each of ``lr_factors``, and each of ``extra_lrs``.

    With a constant step size the first ``e`` epochs of a longer run are exactly an ``e``-epoch run (same
    batches, same augmentation draws): one run per lr, scored as it passes each epoch in ``epoch_grid``. A
    decaying step size depends on the run's length, so there every (lr, epochs) is its own run. ``progress``
    shows one bar over all the epochs these runs train (the choice is a dozen full device trainings).
    """
    from ..models import build_model, load_state_arrays
    from ..schedule import train_schedule

    n = len(X)
    per_epoch = schedule.steps(n) // schedule.epochs
    grid = sorted({int(e) for e in epoch_grid})
    table, best = [], (-1.0, schedule)
    lrs = [schedule.lr * f for f in lr_factors] + [float(v) for v in extra_lrs]
    # (lr, the epoch counts one run scores on its way)
    runs = [(lr, grid) for lr in dict.fromkeys(lrs)] if schedule.decay == "none" else \
        [(lr, [e]) for lr in dict.fromkeys(lrs) for e in grid]
    bar = make_bar(progress, sum(wanted[-1] for _, wanted in runs),
                   f"schedule: {len(runs)} device run{'s' if len(runs) != 1 else ''}", unit="epoch")
    for lr, wanted in runs:
        model = load_state_arrays(build_model(model_cfg, 0), theta0)
        steps = [0]

        def on_step(lr=lr, model=model, steps=steps, wanted=wanted):
            nonlocal best
            steps[0] += 1
            epoch, done = divmod(steps[0], per_epoch)
            if done == 0 and bar is not None:
                bar.update(1)
            if done == 0 and epoch in wanted:
                uar = score(model, val, model_cfg.num_classes)
                model.train()
                table.append({"lr": lr, "epochs": epoch, "val_uar": uar})
                if uar > best[0] + 1e-9:
                    best = (uar, schedule.replace(lr=lr, epochs=epoch))
                if bar is not None:
                    bar.set_postfix(best_uar=f"{best[0]:.3f}", lr=f"{best[1].lr:.3g}", epochs=best[1].epochs)

        train_schedule(model, X, y, schedule.replace(lr=lr, epochs=wanted[-1]), on_step=on_step)
    if bar is not None:
        bar.close()
    return best[1], best[0], table
