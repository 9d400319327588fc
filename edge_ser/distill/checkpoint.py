"""Resumable distillation: a work folder per (settings, model, data, θ0) and atomic, pickle-free checkpoints."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import numpy as np

from ..config import ModelConfig
from ..data import FeatureSet
from ..files import atomic_write
from .base import DistillConfig

#: part of every checkpoint key: bump it when a method's defaults change what its checkpoints mean, so a run does
#: not resume from one written under other defaults (the history of bumps is in CHANGELOG.md)
CHECKPOINT_VERSION = 4

#: DistillConfig fields a run may change and still resume: more iterations continue a shorter run
_RESUMABLE = ("threads", "iterations")


def workdir_for(cfg: DistillConfig, model_cfg: ModelConfig, train: FeatureSet, theta0, workdir) -> Path:
    """``workdir`` or ``cache_dir()/distill/<hash of config, model, data and θ0>``."""
    if workdir is not None:
        path = Path(workdir)
    else:
        from ..corpora.extract import cache_dir
        from ..models import state_sha256
        from .experts import data_sha256

        settings = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}
        key = json.dumps({"version": CHECKPOINT_VERSION, "cfg": settings, "model": model_cfg.to_dict(),
                          "data": data_sha256(train), "theta0": state_sha256(theta0)}, sort_keys=True, default=str)
        path = cache_dir() / "distill" / hashlib.sha256(key.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_checkpoint(path: Path, arrays: Dict[str, np.ndarray], meta: Dict) -> None:
    """Atomic checkpoint: arrays + a JSON meta record (write-temp, rename)."""
    atomic_write(path, write=lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays))


def load_checkpoint(path: Path, cfg: DistillConfig):
    """(arrays, meta) if a checkpoint of this exact config exists, else None."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        arrays = {k: z[k] for k in z.files if k != "__meta__"}

    def same(c):
        return {k: v for k, v in c.items() if k not in _RESUMABLE}

    return (arrays, meta) if same(meta.get("cfg", {})) == same(json.loads(cfg.to_json())) else None


def rng_state(gen) -> np.ndarray:
    """A torch.Generator's state as a plain array (for a checkpoint)."""
    return gen.get_state().numpy().copy()


def opt_state_to_arrays(opt):
    """A torch optimiser's state as flat arrays + JSON meta (so checkpoints need no pickle)."""
    sd = opt.state_dict()
    arrays, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for key, val in st.items():
            name = f"opt_{pid}_{key}"
            arrays[name] = val.detach().numpy().copy() if hasattr(val, "numpy") else np.asarray(val)
            meta["state"][str(pid)][key] = name
    return arrays, meta


def opt_state_from_arrays(arrays, meta):
    """Inverse of :func:`opt_state_to_arrays`: a state dict for ``opt.load_state_dict``."""
    import torch

    state = {int(pid): {key: torch.as_tensor(arrays[name]) for key, name in st.items()}
             for pid, st in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}
