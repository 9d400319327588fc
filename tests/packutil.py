"""Test helper: small packs written directly from arrays (a fake synthetic set), so pack and transport
tests do not depend on distillation. Shared by test_pack.py, test_transport.py and the fuzz harness.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_ser.config import FeatureConfig, ModelConfig
from edge_ser.packfile import write_pack
from edge_ser.schedule import Schedule

CLASSES = ("neutral", "happy", "sad", "angry")
SMALL_FEATURES = FeatureConfig(clip_seconds=0.5)          # (64, 48) log-Mels


def fake_theta(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"features.0.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
            "features.1.running_mean": np.zeros(8, np.float32),
            "features.1.num_batches_tracked": np.array(0, np.int64),
            "classifier.weight": rng.standard_normal((len(CLASSES), 32)).astype(np.float32)}


def make_pack(path, private_key=None, seed: int = 0, ipc: int = 2, sequence=None, fc: FeatureConfig = SMALL_FEATURES,
              soft: bool = False, **kw) -> dict:
    """Write a valid pack of ``ipc`` random samples per class; returns write_pack's dict."""
    rng = np.random.default_rng(seed)
    m = ipc * len(CLASSES)
    X = rng.standard_normal((m, fc.n_mels, fc.num_frames)).astype(np.float32)
    y = np.repeat(np.arange(len(CLASSES)), ipc).astype(np.int64)
    if soft:
        y = np.eye(len(CLASSES), dtype=np.float32)[y] * 0.9 + 0.025
    mc = ModelConfig(num_classes=len(CLASSES), n_mels=fc.n_mels, num_frames=fc.num_frames, channels=(8,))
    gi = X[:3]
    gl = rng.standard_normal((3, len(CLASSES))).astype(np.float32)
    args = dict(X=X, y=y, classes=CLASSES, feature_config=fc, model_config=mc, schedule=Schedule(lr=0.05, epochs=3),
                theta0=fake_theta(seed), golden_inputs=gi, golden_logits=gl, golden_tolerance=0.05,
                provenance={"corpus": "fake", "method": "test", "ipc": ipc}, sequence=sequence,
                private_key=private_key)
    args.update(kw)
    return write_pack(Path(path), **args)


def make_trainable_pack(path, private_key=None, sequence=None, deployment="ser/packs", seed: int = 0,
                        epochs: int = 15, **kw) -> dict:
    """A pack a device can really train (small ConvNet, golden logits from honest training, as
    tests/_packlike.py builds them), written and signed like a server's."""
    from _packlike import make_pack as packlike

    p = packlike(epochs=epochs, seed=seed)
    args = dict(X=p.X, y=p.y, classes=p.classes, feature_config=p.feature_config, model_config=p.model_config,
                schedule=p.schedule, theta0=p.theta0, golden_inputs=p.golden_inputs, golden_logits=p.golden_logits,
                golden_tolerance=p.golden_tolerance, calibration=p.calibration, provenance=p.provenance,
                sequence=sequence, private_key=private_key, deployment=deployment)
    args.update(kw)
    return write_pack(Path(path), **args)
