"""A Pack-like object built in memory for device tests (same attributes as edge_ser.packfile.Pack).

Small features (32 Mels x 48 frames) and a narrow ConvNet keep train-local tests within seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from edge_ser.config import FeatureConfig, ModelConfig
from edge_ser.schedule import Schedule

CLASSES = ("neutral", "happy", "sad", "angry")
FEATURES = FeatureConfig(n_mels=32, clip_seconds=0.5, f_min=50.0, f_max=8000.0)
MODEL = ModelConfig(num_classes=4, n_mels=32, num_frames=FEATURES.num_frames, channels=(8, 16))


@dataclass
class PackLike:
    path: str
    pack_id: str
    sequence: int
    format_version: str
    classes: Tuple[str, ...]
    feature_config: FeatureConfig
    model_config: ModelConfig
    schedule: Schedule
    theta0: Dict[str, np.ndarray]
    theta0_sha256: str
    X: np.ndarray
    y: np.ndarray
    golden_inputs: np.ndarray
    golden_logits: np.ndarray
    golden_tolerance: float
    calibration: Optional[np.ndarray]
    provenance: Dict[str, Any] = field(default_factory=dict)
    signed: bool = False
    key_id: Optional[str] = None


def class_data(n_per_class: int, seed: int, cfg: FeatureConfig = FEATURES):
    """Log-Mel-like inputs whose class is a band of raised energy (learnable by a small CNN)."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for c in range(len(CLASSES)):
        for _ in range(n_per_class):
            x = rng.normal(-6.0, 1.0, (cfg.n_mels, cfg.num_frames)).astype(np.float32)
            lo = c * cfg.n_mels // len(CLASSES)
            x[lo: lo + cfg.n_mels // len(CLASSES)] += 4.0
            X.append(x)
            y.append(c)
    return np.stack(X), np.array(y, dtype=np.int64)


def make_pack(ipc: int = 5, epochs: int = 15, seed: int = 0, golden: bool = True) -> PackLike:
    """Pack-like object; golden logits are computed by honestly training θ0 with the schedule (as a server does)."""
    import torch

    from edge_ser.models import build_model, input_stats, set_input_stats, state_arrays, state_sha256
    from edge_ser.schedule import train_schedule

    X, y = class_data(ipc, seed)
    model = build_model(MODEL, seed=seed)
    set_input_stats(model, *input_stats(X))
    theta0 = state_arrays(model)
    schedule = Schedule(lr=0.05, epochs=epochs, momentum=0.9)
    gi, _ = class_data(2, seed + 100)
    torch.set_num_threads(1)
    train_schedule(model, X, y, schedule)
    with torch.no_grad():
        gl = model(torch.from_numpy(gi)).numpy()
    calib, _ = class_data(3, seed + 200)
    return PackLike(path="<memory>", pack_id=f"test-{seed}", sequence=1, format_version="1.0.0", classes=CLASSES,
                    feature_config=FEATURES, model_config=MODEL, schedule=schedule, theta0=theta0,
                    theta0_sha256=state_sha256(theta0), X=X, y=y, golden_inputs=gi, golden_logits=gl,
                    golden_tolerance=1e-3, calibration=calib,
                    provenance={"test_speakers": ["Actor_03"], "corpus": "synthetic"})
