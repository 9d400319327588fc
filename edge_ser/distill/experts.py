"""Expert-trajectory buffer on disk: full-data training runs whose weights are saved after every epoch.

Shared by MTT (experts from random initialisations, as in Cazenavette et al. 2022) and fixed-init
distillation (experts that all start at the shipped θ0 and differ only in data order / augmentation).

Each trajectory is one ``.npz`` file holding, for every tensor of the model's state dict, an array of
shape ``(epochs + 1, *tensor.shape)`` (index 0 = the initial weights). A buffer directory is keyed by
a hash of the training data, the model config, the expert recipe and the initialisation, so experts are
trained once and reused; a half-written trajectory is never visible (write-temp + rename).

>>> buf = expert_buffer(train, model_cfg, ExpertConfig(epochs=20), theta0=theta0, count=2)  # doctest: +SKIP
>>> traj = load_trajectory(buf[0]); traj.epochs, traj.state(5)["classifier.weight"].shape  # doctest: +SKIP
(20, (8, 256))
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..config import ModelConfig, TrainConfig, _JsonMixin
from ..data import FeatureSet
from ..files import atomic_write


@dataclass(frozen=True)
class ExpertConfig(_JsonMixin):
    """How an expert is trained on the full (real) training set.

    Default = the paper's recipe (Adam, lr 1e-3, constant rate), plus the SpecAugment and class
    balancing our full-data baseline uses. ``optimizer="sgd"`` (lr 1e-2, no momentum) is the original
    MTT recipe.
    """

    epochs: int = 20
    optimizer: str = "adam"     # "adam" (paper) | "sgd" (Cazenavette et al.)
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    specaugment: bool = True
    class_balance: bool = True


@dataclass
class Trajectory:
    """One expert run: ``states[key][e]`` is tensor ``key`` after ``e`` epochs (0 = initial)."""

    states: Dict[str, np.ndarray]
    meta: Dict

    @property
    def epochs(self) -> int:
        return next(iter(self.states.values())).shape[0] - 1

    def state(self, epoch: int) -> Dict[str, np.ndarray]:
        return {k: v[epoch] for k, v in self.states.items()}


def data_sha256(train: FeatureSet) -> str:
    """Content hash of a training set (features, labels, speakers)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train.X).tobytes())
    h.update(np.ascontiguousarray(train.y).tobytes())
    h.update("\0".join(train.speakers.tolist()).encode())
    h.update("\0".join(train.classes).encode())
    return h.hexdigest()


def buffer_dir(train: FeatureSet, model_cfg: ModelConfig, expert_cfg: ExpertConfig,
               theta0: Optional[Mapping[str, np.ndarray]] = None, root=None) -> Path:
    """Where the trajectories for this (data, model, recipe, init) live."""
    from ..corpora.extract import cache_dir
    from ..models import state_sha256

    key = json.dumps({"data": data_sha256(train), "model": model_cfg.to_dict(), "expert": expert_cfg.to_dict(),
                      "theta0": state_sha256(theta0) if theta0 is not None else "random"}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(root) if root is not None else cache_dir() / "experts" / digest


def train_expert(train: FeatureSet, model_cfg: ModelConfig, expert_cfg: ExpertConfig, init: Mapping[str, np.ndarray],
                 seed: int, path: Path, threads: Optional[int] = None, progress: bool = False, bar=None) -> Path:
    """Train one expert from the weights ``init`` and save its per-epoch trajectory to ``path``. ``bar``: a tqdm
    bar advanced once per epoch (then ``progress`` does not add fit's own per-epoch bar)."""
    import torch

    from ..models import build_model, load_state_arrays, state_arrays
    from ..train import fit

    if threads:
        torch.set_num_threads(int(threads))
    model = load_state_arrays(build_model(model_cfg, 0), init)
    snaps: List[Dict[str, np.ndarray]] = [state_arrays(model)]
    cfg = TrainConfig(epochs=expert_cfg.epochs, batch_size=expert_cfg.batch_size, lr=expert_cfg.lr,
                      weight_decay=expert_cfg.weight_decay, optimizer=expert_cfg.optimizer, momentum=0.0,
                      specaugment=expert_cfg.specaugment, class_balance=expert_cfg.class_balance, seed=seed)
    t0 = time.perf_counter()
    # fit() anneals the rate (cosine); the trajectory is what it is, we only record it
    def on_epoch(epoch, record):
        snaps.append(state_arrays(model))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")

    fit(model, train.X, train.y, cfg, num_classes=train.num_classes, progress=progress and bar is None,
        on_epoch=on_epoch)
    stacked = {k: np.stack([s[k] for s in snaps]) for k in snaps[0]}
    meta = {"seed": seed, "seconds": time.perf_counter() - t0, "expert": expert_cfg.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write=lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **stacked), durable=False)
    return path


def load_trajectory(path) -> Trajectory:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        states = {k: z[k] for k in z.files if k != "__meta__"}
    return Trajectory(states, meta)


def expert_buffer(train: FeatureSet, model_cfg: ModelConfig, expert_cfg: ExpertConfig = ExpertConfig(),
                  theta0: Optional[Mapping[str, np.ndarray]] = None, count: int = 2, seed: int = 0,
                  root=None, threads: Optional[int] = None, progress: bool = False) -> List[Path]:
    """Paths of ``count`` expert trajectories, training (and caching) the missing ones.

    With ``theta0`` every expert starts at θ0 (fixed-init); without, expert ``i`` starts from
    ``build_model(model_cfg, seed=1000 + seed + i)`` with θ0's input statistics (MTT).
    """
    from ..models import build_model, input_stats, set_input_stats, state_arrays
    from .common import make_bar

    root = buffer_dir(train, model_cfg, expert_cfg, theta0, root)
    paths = [root / f"expert_{seed + i:03d}.npz" for i in range(count)]
    missing = sum(not p.exists() for p in paths)
    # one bar over every epoch still to train (cached experts cost nothing and are not counted)
    bar = make_bar(progress and missing > 0, missing * expert_cfg.epochs, f"experts ({missing} to train)", unit="epoch")
    for i, path in enumerate(paths):
        if not path.exists():
            if theta0 is not None:
                init = dict(theta0)
            else:
                model = build_model(model_cfg, 1000 + seed + i)
                set_input_stats(model, *input_stats(train.X))
                init = state_arrays(model)
            train_expert(train, model_cfg, expert_cfg, init, seed=seed + i, path=path, threads=threads,
                         progress=progress, bar=bar)
    if bar is not None:
        bar.close()
    return paths
