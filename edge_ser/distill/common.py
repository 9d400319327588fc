"""Plumbing every iterative distiller shares: threads, the validation split, the starting set, progress bars."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..data import FeatureSet
from ..memory import peak_rss_mb  # noqa: F401  (re-exported: the distillers report it in their stats)


def setup_threads(threads: Optional[int]) -> None:
    """``threads`` torch threads; None keeps what the caller set (torch's default: all cores)."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def split_validation(train: FeatureSet, val: Optional[FeatureSet], n_speakers: int) -> Tuple[FeatureSet, FeatureSet]:
    """(train, val): ``val`` if given, else the last ``n_speakers`` training speakers held out."""
    if val is not None and len(val):
        return train, val
    speakers = train.speaker_ids()
    if len(speakers) <= n_speakers + 1:
        return train, train  # too few speakers to hold any out: validate on training speakers (optimistic)
    return train.split_speakers(speakers[-n_speakers:])


def init_synthetic(train: FeatureSet, ipc: int, init: str, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``ipc`` random real clips per class (or per-band Gaussian noise at the data's statistics)."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for c in range(train.num_classes):
        idx = np.flatnonzero(train.y == c)
        pick = rng.choice(idx, size=ipc, replace=len(idx) < ipc)
        X.append(train.X[pick])
        y += [c] * ipc
    X = np.concatenate(X).astype(np.float32)
    if init == "noise":
        mean, std = train.X.mean(axis=(0, 2)), train.X.std(axis=(0, 2))
        X = (mean[None, :, None] + std[None, :, None] * rng.standard_normal(X.shape)).astype(np.float32)
    return X, np.asarray(y, dtype=np.int64)


def make_bar(progress: bool, total: int, desc: str, initial: int = 0, unit: str = "it"):
    """A tqdm bar on stderr, or None when ``progress`` is off (callers test for None)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit)
