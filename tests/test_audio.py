"""Tests of the audio loader: real files written with soundfile (bit depths, rates, channels) and bad input.

Every bad file must give one AudioError line naming the file; oddities that leave a file usable are notes.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from edge_ser.audio import MIN_SECONDS, AudioError, check_samples, load_audio, resample


def tone(freq=1000.0, seconds=1.0, rate=16000, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x, rate=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1.0 / rate)[int(np.argmax(spec))]


@pytest.mark.parametrize("subtype,tol", [("PCM_U8", 2e-2), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                         ("PCM_32", 1e-6), ("FLOAT", 1e-7)])
def test_bit_depths_read_back(tmp_path, subtype, tol):
    x = tone()
    path = tmp_path / f"tone_{subtype}.wav"
    sf.write(path, x, 16000, subtype=subtype)
    a = load_audio(path)
    assert a.samples.dtype == np.float32 and a.sample_rate == 16000 and a.source_rate == 16000
    assert a.samples.shape == x.shape
    assert np.max(np.abs(a.samples - x)) < tol
    assert a.notes == []


def test_flac_reads(tmp_path):
    x = tone()
    sf.write(tmp_path / "t.flac", x, 16000)
    assert np.max(np.abs(load_audio(tmp_path / "t.flac").samples - x)) < 1e-4


def test_stereo_is_mixed_to_mono_with_a_note(tmp_path):
    left, right = tone(1000, amp=0.4), tone(1000, amp=0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 16000, subtype="PCM_16")
    a = load_audio(tmp_path / "st.wav")
    assert a.channels == 2 and a.samples.ndim == 1
    assert np.max(np.abs(a.samples - (left + right) / 2)) < 1e-3
    assert any("stereo" in n for n in a.notes)


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000])
def test_resampled_to_16k_keeps_frequency(tmp_path, rate):
    sf.write(tmp_path / "r.wav", tone(1000, 1.0, rate), rate, subtype="PCM_16")
    a = load_audio(tmp_path / "r.wav")
    assert a.sample_rate == 16000 and a.source_rate == rate
    assert abs(len(a.samples) - 16000) <= 2
    assert abs(peak_hz(a.samples) - 1000.0) < 3.0
    # amplitude preserved (band-limited resampler, tone far below Nyquist)
    assert abs(np.sqrt(2) * a.samples[2000:-2000].std() - 0.5) < 0.01


def test_resample_removes_content_above_new_nyquist():
    x = tone(7000, 1.0, 48000) + tone(1000, 1.0, 48000)
    y = resample(x, 48000, 16000)       # 7 kHz stays (below 8 kHz), nothing aliases
    spec = np.abs(np.fft.rfft(y))
    freqs = np.fft.rfftfreq(len(y), 1 / 16000)
    assert spec[np.argmin(abs(freqs - 7000))] > 0.3 * spec.max()
    z = resample(tone(10000, 1.0, 48000), 48000, 16000)   # 10 kHz must vanish, not alias to 6 kHz
    assert np.sqrt(np.mean(z ** 2)) < 0.01


def _error(path):
    with pytest.raises(AudioError) as info:
        load_audio(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_corrupt_header(tmp_path):
    p = tmp_path / "corrupt.wav"
    sf.write(p, tone(), 16000, subtype="PCM_16")
    data = bytearray(p.read_bytes())
    data[:4] = b"JUNK"
    p.write_bytes(bytes(data))
    assert "not a readable audio file" in _error(p)


def test_truncated_wav_is_an_error(tmp_path):
    p = tmp_path / "trunc.wav"
    sf.write(p, tone(seconds=1.0), 16000, subtype="PCM_16")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(p)


def test_truncated_flac_is_an_error(tmp_path):
    p = tmp_path / "trunc.flac"
    sf.write(p, tone(seconds=1.0) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _error(p)


def test_zero_length_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    assert "empty file" in _error(p)


def test_wav_with_no_samples(tmp_path):
    p = tmp_path / "nosamples.wav"
    sf.write(p, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    assert "zero-length" in _error(p)


def test_non_audio_bytes_with_wav_extension(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is a text file, not audio\n" * 50)
    assert "not a readable audio file" in _error(p)


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "gone.wav")


def test_nan_samples(tmp_path):
    x = tone()
    x[100:200] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    assert "NaN" in _error(p)


def test_silence(tmp_path):
    p = tmp_path / "silence.wav"
    sf.write(p, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    assert "silent" in _error(p)


def test_too_short(tmp_path):
    p = tmp_path / "short.wav"
    sf.write(p, tone(seconds=MIN_SECONDS / 2), 16000, subtype="PCM_16")
    assert "too short" in _error(p)


def test_too_long_is_refused_before_reading(tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, tone(seconds=2.0, rate=8000), 8000, subtype="PCM_16")
    with pytest.raises(AudioError, match="too long"):
        load_audio(p, max_seconds=1.0)


def test_dc_offset_removed_and_noted(tmp_path):
    p = tmp_path / "dc.wav"
    sf.write(p, tone(amp=0.3) + 0.2, 16000, subtype="PCM_16")
    a = load_audio(p)
    assert abs(float(a.samples.mean())) < 1e-4
    assert any("DC offset +0.200" in n for n in a.notes)


def test_clipping_noted(tmp_path):
    p = tmp_path / "clip.wav"
    sf.write(p, np.clip(tone(amp=3.0), -1, 1), 16000, subtype="PCM_16")
    a = load_audio(p)
    assert any("clipping" in n for n in a.notes)


def test_clipping_with_dc_offset_still_noted():
    x = np.clip(tone(amp=1.5) + 0.3, -1, 1)   # clipped at +1 only; removing DC first would hide it
    notes = []
    check_samples(x, 16000, "x", notes)
    assert any("clipping" in n for n in notes) and any("DC offset" in n for n in notes)


def test_clean_file_has_no_notes(tmp_path):
    p = tmp_path / "clean.wav"
    sf.write(p, tone(amp=0.5), 16000, subtype="PCM_16")
    assert load_audio(p).notes == []
