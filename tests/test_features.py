"""Tests of the log-Mel front-end: numpy vs torch twins, librosa as an independent reference, length policy.

The numpy twin runs on devices and the torch twin in training; both must give the same features.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_ser.config import FeatureConfig
from edge_ser.features import extract, fix_length, logmel, logmel_torch, mel_filterbank, num_frames, sliding_windows

CFG = FeatureConfig()
LENGTHS = [50, 399, 400, 401, 561, 4000, 16000, 48000, 50000]


def speechlike(n, seed=0):
    """Random signal with speech-like dynamics: noise and harmonics under a varying envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    env = 0.05 + 0.5 * np.abs(np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    x = rng.standard_normal(n) * 0.05 + sum(np.sin(2 * np.pi * k * rng.uniform(100, 200) * t) / k for k in (1, 2, 3))
    return (env * x).astype(np.float32)


@pytest.mark.parametrize("n", LENGTHS)
def test_numpy_and_torch_twins_agree(n):
    for seed in range(3):
        x = speechlike(n, seed) if seed else np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
        a = logmel(x, CFG)
        b = logmel_torch(x, CFG).numpy()
        assert a.shape == b.shape == (CFG.n_mels, num_frames(n, CFG))
        assert np.max(np.abs(a - b)) < 1e-4


def test_torch_twin_is_batched_and_differentiable():
    import torch

    x = torch.tensor(np.stack([speechlike(CFG.num_samples, s) for s in range(3)]), requires_grad=True)
    out = logmel_torch(x, CFG)
    assert out.shape == (3, CFG.n_mels, CFG.num_frames)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    single = logmel_torch(x[1].detach(), CFG)
    assert torch.allclose(single, out[1].detach(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, FeatureConfig(n_fft=512, hop_length=256, n_mels=40, f_min=20.0, f_max=7600.0)])
def test_against_librosa(cfg):
    librosa = pytest.importorskip("librosa", reason="librosa (test extra) is the independent reference")
    x = speechlike(24000, 7)
    ref = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=cfg.sample_rate, n_fft=cfg.n_fft,
                                         hop_length=cfg.hop_length, win_length=cfg.n_fft, window="hann",
                                         center=False, power=2.0, n_mels=cfg.n_mels, fmin=cfg.f_min,
                                         fmax=cfg.f_max, htk=True, norm=None)
    ours = logmel(x, cfg)
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - np.log(ref + cfg.log_floor))) < 1e-3
    fb_ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min,
                                 fmax=cfg.f_max, htk=True, norm=None)
    assert np.max(np.abs(mel_filterbank(cfg) - fb_ref)) < 1e-5


def test_mel_bin_of_a_tone_is_where_it_should_be():
    t = np.arange(CFG.num_samples) / CFG.sample_rate
    low, high = (logmel((0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32), CFG).mean(1).argmax() for f in (300, 3000))
    fb = mel_filterbank(CFG)
    freqs = np.linspace(0, CFG.sample_rate / 2, CFG.n_fft // 2 + 1)
    assert abs(freqs[fb[low].argmax()] - 300) < 80 and abs(freqs[fb[high].argmax()] - 3000) < 200


def test_fix_length_repeat_pad():
    x = np.arange(1, 1001, dtype=np.float32)
    y = fix_length(x, CFG)
    assert y.shape == (CFG.num_samples,)
    assert np.array_equal(y[:1000], x) and np.array_equal(y[1000:2000], x)
    assert y[-1] == x[(CFG.num_samples - 1) % 1000]


def test_fix_length_zero_pad():
    x = np.ones(1000, np.float32)
    y = fix_length(x, CFG.replace(pad_mode="zero"))
    assert y[:1000].sum() == 1000 and not y[1000:].any()


def test_energy_crop_picks_the_loud_part():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000 * 8) * 0.001).astype(np.float32)
    x[16000 * 4: 16000 * 6] += rng.standard_normal(32000).astype(np.float32) * 0.5   # loud 4-6 s
    y = fix_length(x, CFG)
    start = int(np.flatnonzero(np.isin(x, y[:50]))[0])
    assert 16000 * 3 <= start <= 16000 * 4          # the 3 s window covers the whole 2 s burst
    assert np.sum(y ** 2) > 0.99 * np.sum(x[16000 * 4: 16000 * 6] ** 2)


def test_center_and_start_crop():
    x = np.arange(CFG.num_samples + 1000, dtype=np.float32)
    assert fix_length(x, CFG.replace(crop="start"))[0] == 0
    assert fix_length(x, CFG.replace(crop="center"))[0] == 500
    assert np.array_equal(fix_length(x[: CFG.num_samples], CFG), x[: CFG.num_samples])


def test_fix_length_rejects_bad_input():
    with pytest.raises(ValueError):
        fix_length(np.zeros(0, np.float32), CFG)
    with pytest.raises(ValueError):
        fix_length(np.zeros((2, 100), np.float32), CFG)


def test_extract_shape_and_dtype():
    for n in (300, 48000, 100000):
        f = extract(speechlike(n), CFG)
        assert f.shape == (64, 298) == (CFG.n_mels, CFG.num_frames) and f.dtype == np.float32
        assert np.isfinite(f).all()


def test_sliding_windows():
    x = speechlike(16000 * 5)
    wins = list(sliding_windows(x, CFG, 0.5))
    assert [round(s, 3) for s, _ in wins] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(w.shape == (CFG.num_samples,) for _, w in wins)
    assert np.array_equal(wins[2][1], x[16000: 16000 + CFG.num_samples])
    short = list(sliding_windows(x[:8000], CFG, 0.5))
    assert len(short) == 1 and short[0][1].shape == (CFG.num_samples,)
