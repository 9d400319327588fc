"""Read any audio file into 16 kHz mono float32, with one clear error per bad file.

Handles wav/flac/ogg (whatever libsndfile reads), any sample rate, mono or multi-channel, 8/16/24/32-bit
integer and float. Problems that are not fatal (stereo, clipping, DC offset) are reported as notes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List

import numpy as np

#: Shortest clip accepted (seconds). Anything shorter cannot hold an emotional utterance.
MIN_SECONDS = 0.2
#: Peak amplitude below which a file counts as silent (about -80 dBFS).
SILENCE_PEAK = 1e-4
#: Longest file read whole (seconds); longer ones are refused rather than exhausting RAM.
MAX_SECONDS = 600.0
#: What libsndfile should find inside a file with each extension; a mismatch is decoded by content, noted.
EXTENSION_FORMATS = {".wav": ("WAV", "WAVEX", "RF64", "W64"), ".flac": ("FLAC",), ".ogg": ("OGG",),
                     ".mp3": ("MP3",), ".aiff": ("AIFF",), ".aif": ("AIFF",)}


class AudioError(ValueError):
    """A file that cannot serve as speech. ``str(err)`` is one line naming the file and the cause."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Audio:
    """Decoded audio: ``samples`` is float32 mono at ``sample_rate``; ``notes`` lists non-fatal oddities."""

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    channels: int
    notes: List[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.samples) / float(self.sample_rate)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed sinc) of a 1-D float signal."""
    if src_rate == dst_rate:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    ratio = Fraction(dst_rate, src_rate).limit_denominator(1000)
    y = resample_poly(x.astype(np.float64), ratio.numerator, ratio.denominator, window=("kaiser", 5.0))
    return y.astype(np.float32)


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average channels (frames x channels -> frames)."""
    if x.ndim == 1:
        return x
    return x.mean(axis=1)


def check_samples(samples: np.ndarray, sample_rate: int, path="<array>", notes: List[str] | None = None) -> np.ndarray:
    """Validate and clean a mono float signal in place of use; raise :class:`AudioError` when unusable.

    Removes a DC offset (noted), notes clipping, refuses NaN/inf, empty, too-short and silent input.
    """
    notes = notes if notes is not None else []
    if samples.size == 0:
        raise AudioError(path, "no audio samples (zero-length)")
    if not np.all(np.isfinite(samples)):
        raise AudioError(path, "contains NaN or infinite samples")
    seconds = samples.size / float(sample_rate)
    if seconds < MIN_SECONDS:
        raise AudioError(path, f"too short ({seconds:.3f} s < {MIN_SECONDS} s)")
    # clipping is judged on the samples as stored (full scale), before any DC offset is taken out
    clipped = float(np.mean(np.abs(samples) >= 0.999))
    mean = float(samples.mean())
    if abs(mean) > 0.01:
        notes.append(f"DC offset {mean:+.3f} removed")
    samples = samples - mean
    peak = float(np.max(np.abs(samples)))
    if peak < SILENCE_PEAK:
        raise AudioError(path, f"silent (peak {peak:.2e})")
    if clipped > 0.001:
        notes.append(f"clipping in {clipped:.1%} of samples")
    return samples.astype(np.float32, copy=False)


def load_audio(path, sample_rate: int = 16000, max_seconds: float = MAX_SECONDS) -> Audio:
    """Read ``path`` and return it as float32 mono at ``sample_rate``.

    >>> a = load_audio("speech.wav")            # doctest: +SKIP
    >>> a.samples.shape, a.sample_rate, a.notes  # doctest: +SKIP
    ((48000,), 16000, ['stereo (2 channels) mixed to mono'])

    Raises :class:`AudioError` (one line: file and cause) for anything unreadable, empty, silent,
    too short, too long, or holding NaN/inf.
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    if not os.path.isfile(path):
        raise AudioError(path, "not a regular file (a folder, FIFO or device)")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        info = sf.info(path)
    except Exception as exc:  # libsndfile says why; keep its words
        raise AudioError(path, f"not a readable audio file ({_short(exc)})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(path, "bad header (no sample rate or channels)")
    if info.frames / float(info.samplerate) > max_seconds:
        raise AudioError(path, f"too long ({info.frames / info.samplerate:.0f} s > {max_seconds:.0f} s); split it first")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(path, f"cannot decode ({_short(exc)})") from None
    notes: List[str] = []
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSION_FORMATS and info.format not in EXTENSION_FORMATS[ext]:
        notes.append(f"content is {info.format} although the name ends in {ext}")
    if data.shape[0] < info.frames:
        raise AudioError(path, f"truncated: header says {info.frames} frames, only {data.shape[0]} could be read")
    declared = _wav_declared_frames(path)
    if declared is not None and data.shape[0] < declared:
        raise AudioError(path, f"truncated: WAV header declares {declared} frames, the file holds {data.shape[0]}")
    if data.shape[1] > 1:
        notes.append(f"stereo ({data.shape[1]} channels) mixed to mono" if data.shape[1] == 2
                     else f"{data.shape[1]} channels mixed to mono")
    mono = to_mono(data)
    mono = check_samples(mono, rate, path, notes)
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
    return Audio(samples=mono, sample_rate=sample_rate, source_rate=int(rate), channels=int(data.shape[1]), notes=notes)


def _wav_declared_frames(path: str):
    """Frames a RIFF/WAVE header declares in its data chunk (libsndfile silently shortens a truncated
    file to what is there); ``None`` when not a plain WAV or the size is a streaming placeholder."""
    import struct

    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if cid == b"fmt " and pos + 8 + 14 <= len(head):
            block_align = struct.unpack("<H", head[pos + 20:pos + 22])[0]
        elif cid == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
