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


class StreamingResampler:
    """Polyphase resampler that, fed in any chunks, gives the same samples as ``audio.resample`` on
    the whole signal (scipy ``resample_poly``, Kaiser(5) window, zero padding at both ends).

    >>> r = StreamingResampler(48000, 16000)
    >>> y = np.concatenate([r.process(np.ones(4800)), r.flush()])
    >>> len(y)
    1600
    """

    def __init__(self, src_rate: int, dst_rate: int):
        ratio = Fraction(int(dst_rate), int(src_rate)).limit_denominator(1000)
        self.up, self.down = ratio.numerator, ratio.denominator
        self.src_rate, self.dst_rate = int(src_rate), int(dst_rate)
        self.identity = self.up == self.down == 1
        if not self.identity:
            from scipy.signal import firwin

            max_rate = max(self.up, self.down)
            half_len = 10 * max_rate
            h = firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
            n_pre_pad = self.down - half_len % self.down
            self.h = np.concatenate([np.zeros(n_pre_pad), h])
            self.pre = (half_len + n_pre_pad) // self.down
        self.x = np.zeros(0, dtype=np.float64)
        self.base = 0          # absolute input index of self.x[0] (a multiple of down)
        self.n_in = 0          # input samples received
        self.m = 0             # output samples produced

    def _n_hi(self, m: int) -> int:          # last input index that output m uses
        return ((m + self.pre) * self.down) // self.up

    def _n_lo(self, m: int) -> int:          # first input index that output m uses
        return -((len(self.h) - 1 - (m + self.pre) * self.down) // self.up)

    def inputs_needed(self, outputs: int) -> int:
        """Input samples that must have arrived before output sample ``outputs - 1`` can be computed."""
        if self.identity:
            return outputs
        return self._n_hi(outputs - 1) + 1 if outputs > 0 else 0

    def _compute(self, m1: int) -> np.ndarray:
        from scipy.signal import upfirdn

        m0 = self.m
        if m1 <= m0:
            return np.zeros(0, dtype=np.float32)
        s = max(0, self._n_lo(m0)) // self.down * self.down
        e = min(self.n_in, self._n_hi(m1 - 1) + 1)
        xs = self.x[s - self.base: e - self.base]
        k0 = m0 + self.pre - s * self.up // self.down
        y = upfirdn(self.h, xs, self.up, self.down)[k0: k0 + (m1 - m0)] if len(xs) else np.zeros(0)
        if len(y) < m1 - m0:
            y = np.concatenate([y, np.zeros(m1 - m0 - len(y))])
        self.m = m1
        new_base = max(0, self._n_lo(m1)) // self.down * self.down
        if new_base > self.base:
            self.x = self.x[new_base - self.base:]
            self.base = new_base
        return y.astype(np.float32)

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed input samples; return every output sample that is now fully determined."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        self.n_in += len(x)
        if self.identity:
            self.m += len(x)
            return x
        self.x = np.concatenate([self.x, x.astype(np.float64)])
        m_end = (self.n_in * self.up - 1) // self.down - self.pre + 1 if self.n_in else 0
        return self._compute(max(self.m, m_end))

    def flush(self) -> np.ndarray:
        """End of signal: the remaining outputs (input beyond the end counts as zeros)."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        total = -(-self.n_in * self.up // self.down)
        return self._compute(total)


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
