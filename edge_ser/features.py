"""The one audio front-end: fixed-length clips and log-Mel features, as numpy and torch twins.

Training (torch), export calibration and live inference (numpy, no torch needed) all call this module,
so the features a device computes are the features the model was trained on. Both twins agree to 1e-4.

>>> from edge_ser.config import FeatureConfig
>>> cfg = FeatureConfig()
>>> wave = np.random.default_rng(0).standard_normal(cfg.num_samples).astype(np.float32) * 0.1
>>> logmel(fix_length(wave, cfg), cfg).shape
(64, 298)
"""
from __future__ import annotations

import functools

import numpy as np

from .config import FeatureConfig


def hz_to_mel(f):
    """HTK Mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    fb = np.maximum(0.0, np.minimum(lower, upper))
    fb.setflags(write=False)
    return fb  # (n_mels, n_fft//2+1), float64


def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """Triangular HTK Mel filters, shape ``(n_mels, n_fft // 2 + 1)``, un-normalised (peak 1)."""
    return _mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, float(cfg.f_min), float(cfg.f_max))


@functools.lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic Hann, as torch.hann_window
    w.setflags(write=False)
    return w


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Frames produced for a signal of ``num_samples`` (signals shorter than one window give 1 frame)."""
    return 1 + max(0, num_samples - cfg.n_fft) // cfg.hop_length


def fix_length(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Crop or pad a mono signal to exactly ``cfg.num_samples`` (policy documented on FeatureConfig)."""
    n = cfg.num_samples
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono 1-D signal, got shape {wave.shape}")
    if len(wave) == 0:
        raise ValueError("cannot fix the length of an empty signal")
    if len(wave) == n:
        return wave
    if len(wave) < n:
        if cfg.pad_mode == "repeat":
            reps = -(-n // len(wave))
            return np.tile(wave, reps)[:n]
        out = np.zeros(n, dtype=np.float32)
        out[: len(wave)] = wave
        return out
    if cfg.crop == "start":
        start = 0
    elif cfg.crop == "center":
        start = (len(wave) - n) // 2
    else:
        step = cfg.hop_length
        usable = len(wave) // step * step
        energy = np.square(wave[:usable].astype(np.float64)).reshape(-1, step).sum(axis=1)
        span = n // step
        csum = np.concatenate([[0.0], np.cumsum(energy)])
        totals = csum[span:] - csum[:-span] if len(energy) >= span else np.array([csum[-1]])
        start = int(np.argmax(totals)) * step
        start = min(start, len(wave) - n)
    return wave[start: start + n]


def logmel(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """numpy log-Mel of a mono 16 kHz signal of any length: ``(n_mels, num_frames(len))`` float32.

    This is the twin the device runs (no torch needed); :func:`logmel_torch` is the training twin.
    """
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a mono 1-D signal, got shape {x.shape}")
    if len(x) < cfg.n_fft:
        x = np.pad(x, (0, cfg.n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft)[:: cfg.hop_length]
    spec = np.fft.rfft(frames * _hann(cfg.n_fft).astype(np.float32), axis=1)
    power = (spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2)
    mel = power @ mel_filterbank(cfg).T.astype(np.float32)
    return np.log(mel + np.float32(cfg.log_floor)).T.astype(np.float32, copy=False)


def logmel_torch(wave, cfg: FeatureConfig):
    """torch log-Mel of ``(..., samples)`` -> ``(..., n_mels, frames)``; differentiable, batched."""
    import torch

    x = wave if isinstance(wave, torch.Tensor) else torch.as_tensor(np.asarray(wave, dtype=np.float32))
    x = x.to(torch.float32)
    if x.shape[-1] < cfg.n_fft:
        x = torch.nn.functional.pad(x, (0, cfg.n_fft - x.shape[-1]))
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float32, device=x.device)
    frames = x.unfold(-1, cfg.n_fft, cfg.hop_length) * window
    spec = torch.fft.rfft(frames, dim=-1)
    power = spec.real.square() + spec.imag.square()
    fb = torch.tensor(np.ascontiguousarray(mel_filterbank(cfg).T), dtype=torch.float32, device=x.device)
    mel = power @ fb
    return torch.log(mel + cfg.log_floor).transpose(-1, -2).contiguous()


def extract(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Fixed-length clip -> log-Mel, ``(n_mels, cfg.num_frames)``: what one model input is."""
    return logmel(fix_length(wave, cfg), cfg)


def sliding_windows(wave: np.ndarray, cfg: FeatureConfig, hop_seconds: float):
    """Yield ``(start_seconds, window)`` windows of ``cfg.clip_seconds`` every ``hop_seconds``.

    A signal shorter than one window yields it once, padded by the length policy.
    """
    n, hop = cfg.num_samples, max(1, int(round(hop_seconds * cfg.sample_rate)))
    if len(wave) <= n:
        yield 0.0, fix_length(wave, cfg)
        return
    for start in range(0, len(wave) - n + 1, hop):
        yield start / cfg.sample_rate, wave[start: start + n]
