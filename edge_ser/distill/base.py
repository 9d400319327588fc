"""The distillation interface: one DistillConfig, one SyntheticSet, one ``distill()`` that dispatches.

Every method (fixed-init, mtt, dc, dm and the coresets random / herding / kcenter) is a function
``fn(train, cfg, model_cfg, theta0, val=None, progress=False, workdir=None) -> SyntheticSet`` registered
in :data:`METHODS` and imported lazily.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..config import ModelConfig, _JsonMixin
from ..data import FeatureSet
from ..schedule import Schedule

#: method name -> "module:function" (imported on use)
METHODS: Dict[str, str] = {
    "fixed-init": "edge_ser.distill.fixed_init:distill_fixed_init",
    "mtt": "edge_ser.distill.mtt:distill_mtt",
    "dc": "edge_ser.distill.dc:distill_dc",
    "dm": "edge_ser.distill.dm:distill_dm",
    "random": "edge_ser.distill.coreset:random_subset",
    "herding": "edge_ser.distill.coreset:herding",
    "kcenter": "edge_ser.distill.coreset:kcenter",
}
#: methods whose set is real clips, unchanged (a pack of them carries real utterances' features)
REAL_CLIP_METHODS = ("random", "herding", "kcenter")
#: the method ``edge-ser pack`` uses when none is given (the best measured; see benchmarks/RESULTS.md)
DEFAULT_METHOD = "fixed-init"


@dataclass(frozen=True)
class DistillConfig(_JsonMixin):
    """Common knobs; method-specific ones go in ``params``, checked against the method's typed settings
    (:mod:`edge_ser.distill.settings`) when the config is built: an unknown key or a bad value fails here."""

    method: str = DEFAULT_METHOD
    ipc: int = 10                   # synthetic samples per class
    iterations: Optional[int] = None  # outer iterations (None: the method's default)
    init: str = "real"              # synthetic set starts from random real samples, or "noise"
    soft_labels: bool = False       # learn soft labels alongside the features
    seed: int = 0
    threads: Optional[int] = None
    params: Tuple[Tuple[str, Any], ...] = ()   # method-specific overrides, as (key, value) pairs

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown distillation method {self.method!r}; known: {', '.join(METHODS)}")
        if self.ipc < 1:
            raise ValueError("ipc must be at least 1")
        if self.init not in ("real", "noise"):
            raise ValueError("init must be 'real' or 'noise'")
        self.settings  # noqa: B018 (validates params)

    @property
    def settings(self):
        """The method's typed settings with ``params`` applied (see :mod:`edge_ser.distill.settings`)."""
        from .settings import settings_for

        return settings_for(self.method, self.params)

    def param(self, key: str, default=None):
        """The raw ``params`` override for ``key`` (``default`` when not given). Kept for callers of the earlier
        API; the typed value with the method's default is ``cfg.settings.<key>``."""
        return dict(self.params).get(key, default)

    @property
    def iterations_or_default(self) -> int:
        """``iterations``, or the method's default when it is None."""
        return int(self.iterations) if self.iterations is not None else self.settings.default_iterations


@dataclass
class SyntheticSet:
    """What distillation produces and a pack carries."""

    X: np.ndarray                 # (M, n_mels, frames) float32, raw log-Mel space
    y: np.ndarray                 # (M,) int64 hard labels, or (M, C) float32 soft labels
    classes: Tuple[str, ...]
    schedule: Schedule            # how to train θ0 on (X, y); learned values included
    method: str
    ipc: int
    stats: Dict[str, Any] = field(default_factory=dict)  # seconds, peak_rss_mb, iterations, history ...

    @property
    def hard_labels(self) -> np.ndarray:
        return self.y if self.y.ndim == 1 else self.y.argmax(axis=1)


def distill(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray],
            val: Optional[FeatureSet] = None, progress: bool = False, workdir=None) -> SyntheticSet:
    """Distil ``train`` into ``cfg.ipc`` samples per class for the fixed initialisation ``theta0``.

    >>> syn = distill(train, DistillConfig(method="fixed-init", ipc=10), model_cfg, theta0)  # doctest: +SKIP
    """
    for i, c in enumerate(train.classes):
        if not (train.y == i).any():
            raise ValueError(f"class {c!r} has no training utterances; cannot distil it")
    module, fn = METHODS[cfg.method].split(":")
    return getattr(importlib.import_module(module), fn)(train, cfg, model_cfg, theta0, val=val,
                                                         progress=progress, workdir=workdir)
