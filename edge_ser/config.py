"""Frozen configuration dataclasses shared by server, device and benchmarks.

Every knob the pipeline has lives here with a default that serves; configs travel inside packs as JSON.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional, Tuple


class _JsonMixin:
    """to_dict / from_dict / to_json helpers for frozen dataclasses (tuples survive a JSON round trip)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FeatureConfig(_JsonMixin):
    """The audio front-end: 16 kHz mono -> fixed-length clip -> log-Mel (n_mels x num_frames).

    Length policy (training clips and live windows alike): a clip longer than ``clip_seconds`` is
    cropped to the ``clip_seconds`` window with the most energy (searched on a 10 ms grid); a shorter
    clip is repeated end to end until it fills the window (the paper's policy; ``pad_mode="zero"``
    zero-pads instead). Frames are not centred: ``num_frames = 1 + (num_samples - n_fft) // hop``.
    Log-Mel = ``log(mel_power + log_floor)`` with an HTK Mel scale and un-normalised triangles.
    """

    sample_rate: int = 16000
    n_fft: int = 400            # 25 ms window
    hop_length: int = 160       # 10 ms hop
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 8000.0
    clip_seconds: float = 3.0
    log_floor: float = 1e-6
    pad_mode: str = "repeat"    # "repeat" | "zero"
    crop: str = "energy"        # "energy" | "center" | "start"

    def __post_init__(self):
        if self.pad_mode not in ("repeat", "zero"):
            raise ValueError(f"pad_mode must be 'repeat' or 'zero', got {self.pad_mode!r}")
        if self.crop not in ("energy", "center", "start"):
            raise ValueError(f"crop must be 'energy', 'center' or 'start', got {self.crop!r}")
        if not 0 < self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError("need 0 < f_min < f_max <= sample_rate/2")
        if self.num_samples < self.n_fft:
            raise ValueError("clip_seconds is shorter than one FFT window")

    @property
    def num_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def num_frames(self) -> int:
        return 1 + (self.num_samples - self.n_fft) // self.hop_length


@dataclass(frozen=True)
class ModelConfig(_JsonMixin):
    """A compact SER network. ``arch="convnet"`` is the dataset-distillation ConvNet
    (conv3x3 -> norm -> ReLU -> 2x2 pool per block); ``arch="cnn6"`` is the paper's CNN-6.

    ``stem_pool`` (Mel bins, frames) average-pools the normalised log-Mels once before the first block.
    The default (2, 2) makes every conv 4x cheaper (training on a one-core device, and distillation,
    which back-propagates through training) at the cost of some time-frequency detail; ``(1, 1)`` keeps
    full resolution.

    ``norm="batch"`` folds into the convolutions at export (clean int8 ONNX and TFLite);
    ``"instance"`` and ``"none"`` are there for experiments.
    """

    arch: str = "convnet"
    num_classes: int = 8
    n_mels: int = 64
    num_frames: int = 298
    channels: Tuple[int, ...] = (16, 32, 64, 64)
    stem_pool: Tuple[int, int] = (2, 2)
    norm: str = "batch"
    pool: str = "avg"           # pooling inside blocks: "avg" | "max"
    dropout: float = 0.0

    def __post_init__(self):
        if self.arch not in ("convnet", "cnn6"):
            raise ValueError(f"unknown arch {self.arch!r} (convnet, cnn6)")
        if self.norm not in ("batch", "instance", "none"):
            raise ValueError(f"unknown norm {self.norm!r} (batch, instance, none)")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"unknown pool {self.pool!r} (avg, max)")
        if self.num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if len(self.stem_pool) != 2 or min(self.stem_pool) < 1:
            raise ValueError(f"stem_pool must be two positive ints (Mel bins, frames), got {self.stem_pool!r}")


@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """Ordinary supervised training (full-data baseline, coreset evaluation)."""

    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"     # "adam" | "sgd"
    momentum: float = 0.9
    specaugment: bool = True    # light time/frequency masking on real data
    label_smoothing: float = 0.0
    class_balance: bool = True  # weight the loss by inverse class frequency (UAR is the metric)
    seed: int = 0
    threads: Optional[int] = None


def default_model_config(num_classes: int, features: FeatureConfig = FeatureConfig(), **overrides) -> ModelConfig:
    """The default compact model sized for a feature config and a class count."""
    return ModelConfig(num_classes=num_classes, n_mels=features.n_mels,
                       num_frames=features.num_frames, **overrides)
