"""Live emotion recognition: capture (microphone or file) -> 16 kHz -> log-Mel -> runtime, one result per hop.

:mod:`edge_ser.capture` fills a ring buffer; here one consumer loop resamples (``audio.StreamingResampler``),
gates silence, computes THE front-end (edge_ser.features) on exactly the windows an offline pass uses, runs
the model (ONNX Runtime / TFLite via edge_ser.runtime, no torch), smooths, and yields one Result per hop.
What ``edge-ser listen`` prints is in :mod:`edge_ser.listen_cli`.

>>> for r in listen("model/", file="speech.wav", hop=0.5):     # doctest: +SKIP
...     print(f"{r.t_end:6.2f}s {r.emotion} {r.latency_ms:.1f} ms")
"""
from __future__ import annotations

import collections
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Deque, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .audio import StreamingResampler
from .capture import (  # noqa: F401 (re-exported)
    FALLBACK_RATES,
    DeviceWedged,
    FileSource,
    MicSource,
    RingBuffer,
    _bounded,
    list_input_devices,
    resolve_device,
)
from .features import extract

# ---------------------------------------------------------------- results and configuration

@dataclass(frozen=True)
class StreamConfig:
    """Streaming knobs. ``window``/``hop`` in seconds; ``smooth``: hops averaged; ``vad_db``: RMS dBFS gate."""

    window: float = 3.0
    hop: float = 0.5
    smooth: int = 3
    vad_db: float = -55.0           # gate on level_dbfs (loudest 10% of 20 ms frames)
    block_seconds: float = 0.064      # capture block (callback period); < ~50 ms made ALSA-pulse poll busily
    ring_seconds: float = 20.0        # ring buffer length; older unread audio is dropped (and counted)
    max_retries: int = 6              # reconnect attempts after a device is lost
    backoff_seconds: float = 0.5      # first retry delay, doubled each attempt (capped at 8 s)
    stall_seconds: float = 2.0        # no audio for this long from a running device = device lost

    def __post_init__(self):
        if not self.window > 0:
            raise ValueError(f"--window must be > 0 seconds, got {self.window}")
        if not self.hop > 0:
            raise ValueError(f"--hop must be > 0 seconds, got {self.hop}")
        if int(self.smooth) < 1:
            raise ValueError(f"--smooth must be >= 1 hop, got {self.smooth}")


@dataclass
class Result:
    """One hop: the window [t_start, t_end) seconds of stream time, smoothed emotion and probabilities.

    ``latency_ms``: capture end (arrival of the window's last needed sample) -> result ready; for an
    unpaced ``--file`` run, processing start -> result. ``level_db``: the gate's :func:`level_dbfs`.
    ``logits`` are the raw model outputs of this window (None when ``silent``: the window was below
    the gate and not run through the model).
    """

    t_start: float
    t_end: float
    emotion: Optional[str]
    probabilities: Dict[str, float]
    latency_ms: float
    silent: bool = False
    level_db: float = 0.0
    logits: Optional[List[float]] = None

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["t_start"], d["t_end"] = round(self.t_start, 4), round(self.t_end, 4)
        d["latency_ms"] = round(self.latency_ms, 3)
        d["level_db"] = round(self.level_db, 2)
        d["probabilities"] = {k: round(float(v), 5) for k, v in self.probabilities.items()}
        return d


# ---------------------------------------------------------------- windows, gate, smoothing

def rms_dbfs(x: np.ndarray) -> float:
    """RMS level in dB relative to full scale (1.0); -200 for digital silence."""
    x = np.asarray(x, dtype=np.float64)
    rms = math.sqrt(float(np.mean(x * x))) if len(x) else 0.0
    return 20.0 * math.log10(rms) if rms > 1e-10 else -200.0


def level_dbfs(x: np.ndarray, sample_rate: int = 16000, frame_seconds: float = 0.02, top: float = 0.1) -> float:
    """The silence gate's level: RMS dBFS of the loudest ``top`` fraction of ``frame_seconds`` frames.

    A 3 s window holding 0.5 s of soft speech and 2.5 s of room tone is not silent; whole-window RMS
    would call it so. Digital silence gives -200.

    >>> round(level_dbfs(np.r_[np.zeros(40000), 0.1 * np.ones(8000)].astype(np.float32)), 1)
    -20.0
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    frame = max(1, int(round(frame_seconds * sample_rate)))
    n = len(x) // frame * frame
    if n == 0:
        return rms_dbfs(x)
    energy = np.mean(np.square(x[:n]).reshape(-1, frame), axis=1)
    k = max(1, int(round(top * len(energy))))
    loud = float(np.mean(np.partition(energy, len(energy) - k)[-k:]))
    return 10.0 * math.log10(loud) if loud > 1e-20 else -200.0


def offline_windows(wave: np.ndarray, cfg, window: float, hop: float):
    """The windows an offline pass uses: ``(start_seconds, samples)`` of ``window`` s every ``hop`` s over
    a 16 kHz signal (a signal shorter than one window gives itself once). Equals
    ``features.sliding_windows`` when ``window == cfg.clip_seconds``."""
    n = int(round(window * cfg.sample_rate))
    step = max(1, int(round(hop * cfg.sample_rate)))
    if len(wave) <= n:
        yield 0.0, wave
        return
    for start in range(0, len(wave) - n + 1, step):
        yield start / cfg.sample_rate, wave[start: start + n]


class _Engine:
    """The consumer's state: 16 kHz history, window scheduling, gate, model, smoothing."""

    def __init__(self, runner, scfg: StreamConfig, device_rate: int):
        self.runner = runner
        self.cfg = runner.feature_config
        self.scfg = scfg
        self.classes = list(runner.classes)
        self.win_n = int(round(scfg.window * self.cfg.sample_rate))
        self.hop_n = max(1, int(round(scfg.hop * self.cfg.sample_rate)))
        self.history: Deque[np.ndarray] = collections.deque(maxlen=int(scfg.smooth))
        self.device_rate = int(device_rate)
        self.t_offset = 0.0
        self.reset(device_rate, 0.0)

    def reset(self, device_rate: int, t_offset: float) -> None:
        """Start a new segment (first start, or after a reconnect): fresh resampler and buffers."""
        self.device_rate = int(device_rate)
        self.resampler = StreamingResampler(self.device_rate, self.cfg.sample_rate)
        self.buf = np.zeros(0, dtype=np.float32)   # 16 kHz samples from absolute index self.buf_start
        self.buf_start = 0
        self.total16 = 0
        self.next_start = 0                         # 16 kHz start index of the next window
        self.emitted = 0
        self.arrivals: Deque[Tuple[int, float]] = collections.deque()
        self.t_offset = t_offset
        self.history.clear()

    def feed(self, y16: np.ndarray, arrivals) -> None:
        self.arrivals.extend(arrivals)
        self.buf = np.concatenate([self.buf, y16]) if len(self.buf) else y16
        self.total16 += len(y16)

    def capture_time(self, end16: int) -> Optional[float]:
        """Arrival time of the block that held the last device sample this window needed."""
        need = self.resampler.inputs_needed(end16)
        while len(self.arrivals) > 1 and self.arrivals[0][0] < need:
            self.arrivals.popleft()
        return self.arrivals[0][1] if self.arrivals else None

    def ready(self) -> bool:
        return self.next_start + self.win_n <= self.total16

    def take(self) -> Tuple[int, np.ndarray]:
        start = self.next_start
        win = self.buf[start - self.buf_start: start - self.buf_start + self.win_n]
        self.next_start += self.hop_n
        drop = min(self.next_start - self.buf_start, len(self.buf))
        if drop > 0:                                # keep buf_start + len(buf) == total16
            self.buf = self.buf[drop:]
            self.buf_start += drop
        return start, win

    def infer(self, start: int, win: np.ndarray, t_ref: float) -> Result:
        sr = self.cfg.sample_rate
        t0, t1 = self.t_offset + start / sr, self.t_offset + (start + len(win)) / sr
        db = level_dbfs(win, sr)
        self.emitted += 1
        if db < self.scfg.vad_db:
            self.history.clear()       # a fully silent window ends an utterance
            return Result(t0, t1, None, {}, (time.monotonic() - t_ref) * 1e3, silent=True, level_db=db)
        X = extract(win, self.cfg)[None]
        logits = np.asarray(self.runner.predict_logits(X), dtype=np.float32)[0]
        z = np.exp(logits - logits.max())
        self.history.append(z / z.sum())
        p = np.mean(np.stack(self.history), axis=0)
        emotion = self.classes[int(np.argmax(p))] if self.classes else str(int(np.argmax(p)))
        probs = {c: float(v) for c, v in zip(self.classes, p)}
        return Result(t0, t1, emotion, probs, (time.monotonic() - t_ref) * 1e3, silent=False, level_db=db,
                      logits=[float(v) for v in logits])


# ---------------------------------------------------------------- the stream

class Stream:
    """Iterator of :class:`Result` (what :func:`listen` returns); ``stats`` holds counters and
    ``close()`` stops capture (also done at exhaustion, on error and by ``with``)."""

    def __init__(self, runner, source, scfg: StreamConfig, duration: Optional[float] = None):
        self.runner, self.source, self.scfg, self.duration = runner, source, scfg, duration
        self.stats = {"hops": 0, "skipped_silent": 0, "overflows": 0, "dropped_samples": 0, "reconnects": 0,
                      "device": source.name, "device_rate": source.rate, "runtime": getattr(runner, "name", "?")}
        self._gen = self._run()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Result:
        return next(self._gen)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._gen.close()
        self.source.stop()

    def _new_ring(self) -> RingBuffer:
        return RingBuffer(int(self.source.rate * max(self.scfg.ring_seconds, self.scfg.window + 2.0)))

    def _reconnect(self, engine: _Engine, t_start: float) -> RingBuffer:
        """Device lost: close it, retry with exponential backoff, resume in a new segment."""
        why = self.source.error or "no audio"
        self.source.stop()
        delay = self.scfg.backoff_seconds
        last = why
        for attempt in range(1, self.scfg.max_retries + 1):
            print(f"edge-ser: input device {self.source.name!r} lost ({last}); retry {attempt}/"
                  f"{self.scfg.max_retries} in {delay:.1f} s", file=sys.stderr, flush=True)
            time.sleep(delay)
            try:
                self.source.reopen_info()
                ring = self._new_ring()
                self.source.start(ring)
                self.stats["reconnects"] += 1
                engine.reset(self.source.rate, time.monotonic() - t_start)
                return ring
            except DeviceWedged as exc:      # retrying cannot help: PortAudio itself is stuck
                raise RuntimeError(f"input device {self.source.name!r} lost ({why}); {exc}") from None
            except Exception as exc:
                last = " ".join(str(exc).split())[:160]
                self.source.stop()
                delay = min(8.0, delay * 2)
        raise RuntimeError(f"input device {self.source.name!r} lost ({why}); gave up after "
                           f"{self.scfg.max_retries} retries ({last})")

    def _run(self) -> Iterator[Result]:
        engine = _Engine(self.runner, self.scfg, self.source.rate)
        sr = engine.cfg.sample_rate

        def past(end16: int) -> bool:      # --duration counts stream seconds across reconnects
            return self.duration is not None and engine.t_offset + end16 / sr > self.duration + 1e-9

        ring = self._new_ring()
        dropped_before = 0                   # samples dropped by the rings of earlier segments
        t_start = time.monotonic()
        try:
            self.source.start(ring)
        except Exception as exc:             # PortAudioError: busy, vanished, unsupported settings
            self.source.stop()
            raise RuntimeError(f"cannot open input device {self.source.name!r} "
                               f"({' '.join(str(exc).split())[:200]})") from None
        last_data = time.monotonic()
        try:
            while True:
                x, arrivals, _ = ring.read(timeout=0.1)
                if x is not None:
                    last_data = time.monotonic()
                    engine.feed(engine.resampler.process(x), arrivals)
                elif ring.closed:
                    if self.source.error:
                        raise RuntimeError(self.source.error)
                    engine.feed(engine.resampler.flush(), [])
                elif isinstance(self.source, MicSource) and (
                        not self.source.alive() or time.monotonic() - last_data > self.scfg.stall_seconds):
                    dropped_before += ring.dropped
                    ring = self._reconnect(engine, t_start)
                    last_data = time.monotonic()
                    continue
                self.stats["overflows"] = self.source.overflows
                self.stats["dropped_samples"] = dropped_before + ring.dropped
                while engine.ready():
                    if past(engine.next_start + engine.win_n):
                        return
                    t_proc = time.monotonic()
                    end16 = engine.next_start + engine.win_n
                    t_cap = engine.capture_time(end16)   # (also trims the arrival log)
                    t_cap = t_cap if self.source.paced else None
                    start, win = engine.take()
                    r = engine.infer(start, win, t_cap if t_cap is not None else t_proc)
                    self._count(r)
                    yield r
                if x is None and ring.closed:
                    # a file shorter than one window: one window, padded by the length policy (as offline)
                    if engine.emitted == 0 and engine.total16 > 0 and not past(engine.total16):
                        r = engine.infer(0, engine.buf[: engine.total16], time.monotonic())
                        self._count(r)
                        yield r
                    return
                if past(engine.total16) and not engine.ready():
                    return
        finally:
            self.source.stop()
            self.stats["overflows"] = self.source.overflows
            self.stats["dropped_samples"] = dropped_before + ring.dropped

    def _count(self, r: Result) -> None:
        self.stats["hops"] += 1
        if r.silent:
            self.stats["skipped_silent"] += 1


def _load_runner(model, runtime: Optional[str]):
    if hasattr(model, "predict_logits") and hasattr(model, "feature_config"):
        return model
    if model is None:
        raise ValueError("listen needs a MODEL (a model folder from train-local, or an .onnx/.tflite file)")
    from .runtime import load_runtime

    return load_runtime(model, runtime)


def listen(model, file=None, device=None, runtime=None, window=None, hop=0.5, smooth=3, vad_db=-55.0,
           duration=None, realtime=False, samplerate=None) -> Stream:
    """Stream results from a microphone (``device``: index or name; None: default) or a ``file``.

    ``model``: model folder / exported file (loaded with ``runtime.load_runtime``) or a loaded runner.
    ``window`` defaults to the model's clip length; ``duration`` stops after that many seconds of audio.

    >>> with listen("model/", file="speech.wav") as s:          # doctest: +SKIP
    ...     for r in s:
    ...         print(r.t_end, r.emotion, r.latency_ms)
    ...     print(s.stats["hops"], s.stats["overflows"])
    """
    runner = _load_runner(model, runtime)
    scfg = StreamConfig(window=float(window or runner.feature_config.clip_seconds), hop=float(hop),
                        smooth=int(smooth), vad_db=float(vad_db))
    if duration is not None and not duration > 0:
        raise ValueError(f"--duration must be > 0 seconds, got {duration}")
    if file is not None:
        source = FileSource(file, realtime=realtime, block_seconds=scfg.block_seconds)
    else:
        source = MicSource(device, samplerate=samplerate, block_seconds=scfg.block_seconds)
    return Stream(runner, source, scfg, duration=duration)


def offline_results(model, file, runtime=None, window=None, hop=0.5, smooth=3, vad_db=-55.0) -> List[Result]:
    """The reference: the whole file loaded at once (``audio.load_audio``), windowed with
    :func:`offline_windows`, run in one batch, gated and smoothed like the stream."""
    from .audio import load_audio

    runner = _load_runner(model, runtime)
    cfg = runner.feature_config
    wave = load_audio(file, sample_rate=cfg.sample_rate).samples
    return offline_results_array(runner, wave, window=window, hop=hop, smooth=smooth, vad_db=vad_db)


def offline_results_array(runner, wave: np.ndarray, window=None, hop=0.5, smooth=3, vad_db=-55.0) -> List[Result]:
    """:func:`offline_results` for a 16 kHz signal already in memory."""
    cfg = runner.feature_config
    scfg = StreamConfig(window=float(window or cfg.clip_seconds), hop=float(hop), smooth=int(smooth),
                        vad_db=float(vad_db))
    engine = _Engine(runner, scfg, cfg.sample_rate)
    out = []
    for t0, win in offline_windows(np.asarray(wave, dtype=np.float32), cfg, scfg.window, scfg.hop):
        out.append(engine.infer(int(round(t0 * cfg.sample_rate)), win, time.monotonic()))
    return out
