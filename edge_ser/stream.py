"""Live emotion recognition: microphone (or a file) -> ring buffer -> 16 kHz -> log-Mel -> runtime, per hop.

The audio callback only copies blocks into a ring buffer; one consumer loop resamples, gates silence,
computes THE front-end (edge_ser.features) on exactly the windows an offline pass uses, runs the model
(ONNX Runtime / TFLite via edge_ser.runtime, no torch), smooths, and yields one Result per hop.

>>> for r in listen("model/", file="speech.wav", hop=0.5):     # doctest: +SKIP
...     print(f"{r.t_end:6.2f}s {r.emotion} {r.latency_ms:.1f} ms")
"""
from __future__ import annotations

import collections
import json
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Deque, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .features import extract

#: device rates tried, in order, when the device's default rate is refused
FALLBACK_RATES = (48000, 44100, 16000, 32000, 22050)


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


# ---------------------------------------------------------------- ring buffer

class RingBuffer:
    """Single-producer / single-consumer float32 ring buffer with per-block arrival times.

    ``write`` (the audio callback) never blocks unless ``block=True`` (file feeding: lossless
    back-pressure); when the consumer falls behind, the oldest unread samples are overwritten and
    counted in ``dropped``. ``read`` returns every unread sample plus the arrival times of the blocks.
    """

    def __init__(self, capacity: int):
        self.buf = np.zeros(int(capacity), dtype=np.float32)
        self.capacity = int(capacity)
        self.written = 0          # total samples ever written (absolute index of the next sample)
        self.read_pos = 0         # absolute index of the next unread sample
        self.dropped = 0
        self.closed = False
        self.cond = threading.Condition()
        self._arrivals: List[Tuple[int, float]] = []   # (absolute end index, monotonic time), unread

    def write(self, x: np.ndarray, t_arrival: Optional[float] = None, block: bool = False) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        t = time.monotonic() if t_arrival is None else t_arrival
        with self.cond:
            if block:
                while not self.closed and self.written + len(x) - self.read_pos > self.capacity:
                    self.cond.wait(0.05)
                if self.closed:
                    return
            if len(x) > self.capacity:          # a block larger than the ring: only its tail survives
                skip = len(x) - self.capacity
                self.written += skip
                x = x[skip:]
            over = self.written + len(x) - self.read_pos - self.capacity
            if over > 0:
                self.dropped += over
                self.read_pos += over
            i = self.written % self.capacity
            k = min(len(x), self.capacity - i)
            self.buf[i:i + k] = x[:k]
            self.buf[:len(x) - k] = x[k:]
            self.written += len(x)
            self._arrivals.append((self.written, t))
            self.cond.notify_all()

    def read(self, timeout: float) -> Tuple[Optional[np.ndarray], List[Tuple[int, float]], int]:
        """(samples or None on timeout/closed, [(end_index, t_arrival)], absolute start index)."""
        with self.cond:
            if self.written == self.read_pos and not self.closed:
                self.cond.wait(timeout)
            n = self.written - self.read_pos
            if n <= 0:
                return None, [], self.read_pos
            start = self.read_pos
            i = start % self.capacity
            k = min(n, self.capacity - i)
            out = np.concatenate([self.buf[i:i + k], self.buf[:n - k]]) if k < n else self.buf[i:i + n].copy()
            self.read_pos = self.written
            arrivals = [a for a in self._arrivals if a[0] > start]
            self._arrivals.clear()
            self.cond.notify_all()
            return out, arrivals, start

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drained(self) -> bool:
        with self.cond:
            return self.closed and self.written == self.read_pos


# ---------------------------------------------------------------- streaming resampler

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


# ---------------------------------------------------------------- sources

#: seconds a PortAudio control call (open/start, abort/close, re-enumerate) may take before the device is
#: declared wedged; ALSA error paths in PortAudio can block forever when a device vanishes mid-stream
#: (PortAudio issues #535 and #1037), and a listener must then fail with a clear line, not hang
PORTAUDIO_CALL_TIMEOUT = 10.0


class DeviceWedged(RuntimeError):
    """PortAudio did not return from a control call: this process cannot use audio input any more."""


def _bounded(fn, what: str, timeout: Optional[float] = None):
    """Run ``fn()`` in a helper thread and return its value; raise :class:`DeviceWedged` when it has not
    returned after ``timeout`` seconds (the thread is abandoned, it is a daemon)."""
    timeout = PORTAUDIO_CALL_TIMEOUT if timeout is None else timeout
    box: Dict[str, object] = {}
    done = threading.Event()

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"edge-ser-portaudio-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise DeviceWedged(f"PortAudio did not return from {what} within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as exc:   # the module raises OSError when libportaudio is missing
        raise RuntimeError(f"PortAudio is not available ({exc}); install it: apt-get install libportaudio2 "
                           "(Debian / Raspberry Pi OS), then pip install sounddevice") from None
    except ImportError:
        raise RuntimeError("sounddevice is not installed: pip install sounddevice") from None
    return sd


def list_input_devices() -> List[Dict]:
    """Audio input devices PortAudio sees: index, name, host API, channels, default rate.

    >>> [d["name"] for d in list_input_devices()]       # doctest: +SKIP
    ['USB Audio Device: - (hw:1,0)', 'pulse', 'default']
    """
    sd = _sounddevice()
    apis = sd.query_hostapis()
    out = []
    for d in sd.query_devices():
        if d["max_input_channels"] > 0:
            out.append({"index": d["index"], "name": d["name"], "hostapi": apis[d["hostapi"]]["name"],
                        "channels": d["max_input_channels"], "default_samplerate": d["default_samplerate"]})
    return out


def _device_list_text(devices: List[Dict]) -> str:
    if not devices:
        return "none"
    return "; ".join(f"[{d['index']}] {d['name']}" for d in devices)


def resolve_device(device=None) -> Dict:
    """The input device for ``device`` (index, exact name, or unique part of a name; None: the default).
    Raises one-line errors listing the input devices when there are none or ``device`` matches none."""
    devices = list_input_devices()
    if not devices:
        sd = _sounddevice()
        every = [d["name"] for d in sd.query_devices()]
        raise RuntimeError("no audio input device found (PortAudio sees "
                           f"{', '.join(every) if every else 'no devices at all'}); plug in a microphone, "
                           "check 'arecord -l', or use --file FILE.wav")
    if device is None or str(device).strip() == "":
        sd = _sounddevice()
        default = sd.default.device[0] if isinstance(sd.default.device, (list, tuple)) else sd.default.device
        for d in devices:
            if d["index"] == default:
                return d
        return devices[0]
    text = str(device).strip()
    if text.lstrip("-").isdigit():
        for d in devices:
            if d["index"] == int(text):
                return d
        raise ValueError(f"no input device with index {text}; input devices: {_device_list_text(devices)}")
    exact = [d for d in devices if d["name"] == text]
    if exact:
        return exact[0]
    part = [d for d in devices if text.lower() in d["name"].lower()]
    if len(part) == 1:
        return part[0]
    if len(part) > 1:
        raise ValueError(f"input device {text!r} is ambiguous: {_device_list_text(part)}; give the index")
    raise ValueError(f"no input device matches {text!r}; input devices: {_device_list_text(devices)}")


class MicSource:
    """A PortAudio input stream whose callback only copies int16 blocks into the ring buffer."""

    paced = True

    def __init__(self, device=None, samplerate: Optional[int] = None, block_seconds: float = 0.064):
        self.sd = _sounddevice()
        self.wedged: Optional[str] = None    # why PortAudio is unusable in this process (a call hung)
        self.info = resolve_device(device)
        self.name = self.info["name"]
        self.requested_rate = samplerate
        self.block_seconds = block_seconds
        self.rate = self._pick_rate()
        self.ring: Optional[RingBuffer] = None
        self.stream = None
        self.overflows = 0
        self.error: Optional[str] = None

    def _pick_rate(self) -> int:
        rates = [self.requested_rate] if self.requested_rate else \
            [int(self.info["default_samplerate"])] + [r for r in FALLBACK_RATES]
        errors = []
        for r in rates:
            try:
                self._call(lambda: self.sd.check_input_settings(device=self.info["index"], channels=1,
                                                                dtype="int16", samplerate=r), "checking a sample rate")
                return int(r)
            except DeviceWedged:
                raise
            except Exception as exc:
                errors.append(f"{r} Hz: {exc}")
        raise RuntimeError(f"input device {self.name!r} accepts none of the sample rates tried ({'; '.join(errors)})")

    def _callback(self, indata, frames, time_info, status):
        try:
            if status and status.input_overflow:
                self.overflows += 1
            # int16 -> float32 exactly as soundfile reads an int16 wav (x / 32768)
            self.ring.write(indata[:, 0].astype(np.float32) * np.float32(1.0 / 32768.0))
        except Exception as exc:  # never raise inside the audio thread
            self.error = f"callback: {exc}"

    def _finished(self):
        if self.error is None:
            self.error = "stream stopped"

    def start(self, ring: RingBuffer) -> None:
        """(Re)open the device by name/index; raises the PortAudio error when it is gone."""
        self.ring, self.error = ring, None

        def open_and_start():
            stream = self.sd.InputStream(device=self.info["index"], channels=1, dtype="int16",
                                         samplerate=self.rate, callback=self._callback,
                                         blocksize=max(64, int(self.rate * self.block_seconds)),
                                         finished_callback=self._finished)
            self.stream = stream
            stream.start()

        self._call(open_and_start, "opening the input stream")

    def reopen_info(self) -> None:
        """Look the device up again (indices change when devices come and go)."""
        def reenumerate():
            self.sd._terminate()
            self.sd._initialize()
            return resolve_device(self.name)

        self.info = self._call(reenumerate, "re-reading the device list")
        self.rate = self._pick_rate()

    def _call(self, fn, what: str):
        """A PortAudio control call with a deadline; after one has hung, refuse all further ones."""
        if self.wedged:
            raise DeviceWedged(self.wedged)
        try:
            return _bounded(fn, what)
        except DeviceWedged as exc:
            self.wedged = (f"{exc} (input device {self.name!r}); audio input in this process is stuck: "
                           "restart edge-ser listen (the device service unit restarts it)")
            self.stream = None
            try:   # sounddevice's exit handler would call Pa_Terminate on the stuck stream and hang the exit
                import atexit
                atexit.unregister(self.sd._exit_handler)
            except Exception:
                pass
            raise DeviceWedged(self.wedged) from None

    def alive(self) -> bool:
        return self.stream is not None and self.stream.active and self.error is None

    def stop(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None and not self.wedged:
            def abort_and_close():
                stream.abort(ignore_errors=True)
                stream.close(ignore_errors=True)
            try:
                self._call(abort_and_close, "stopping the input stream")
            except Exception:
                pass


class FileSource:
    """Feeds a file's blocks into the ring buffer from a thread: as fast as the consumer takes them
    (lossless back-pressure) or, with ``realtime``, paced like a microphone."""

    def __init__(self, path, realtime: bool = False, block_seconds: float = 0.064):
        import soundfile as sf

        from .audio import AudioError

        try:
            info = sf.info(str(path))
        except Exception as exc:
            raise AudioError(path, f"not a readable audio file ({' '.join(str(exc).split())[:150]})") from None
        if info.frames <= 0:
            raise AudioError(path, "no audio samples (zero-length)")
        self.path, self.rate, self.realtime = str(path), int(info.samplerate), bool(realtime)
        self.paced = self.realtime
        self.name = f"file:{path}"
        self.block = max(64, int(self.rate * block_seconds))
        self.overflows = 0
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self, ring: RingBuffer) -> None:
        self.ring = ring
        self._thread = threading.Thread(target=self._run, name="edge-ser-file-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import soundfile as sf

        try:
            t0, sent = time.monotonic(), 0
            for block in sf.blocks(self.path, blocksize=self.block, dtype="float32", always_2d=True):
                if self._stop.is_set():
                    break
                mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1)
                if not np.all(np.isfinite(mono)):
                    raise ValueError("contains NaN or infinite samples")
                sent += len(mono)
                if self.realtime:
                    delay = t0 + sent / self.rate - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                self.ring.write(mono, block=not self.realtime)
        except Exception as exc:
            self.error = f"{self.path}: {' '.join(str(exc).split())[:200]}"
        finally:
            self.ring.close()

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        self._stop.set()
        if getattr(self, "ring", None) is not None:
            self.ring.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


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


# ---------------------------------------------------------------- CLI

def _format_result(r: Result, top: int = 3) -> str:
    span = f"{f'{r.t_start:.2f}-{r.t_end:.2f}s':>15}"
    if r.silent:
        return f"{span}  {'(silence)':<10} {r.level_db:.1f} dBFS"
    best = sorted(r.probabilities.items(), key=lambda kv: -kv[1])[:top]
    probs = "  ".join(f"{k} {v:.2f}" for k, v in best)
    return f"{span}  {r.emotion:<10} {probs:<40} {r.latency_ms:6.1f} ms"


class _Publisher:
    """Publishes each result as JSON to an MQTT topic (paho-mqtt 2.x, QoS 1, non-blocking)."""

    def __init__(self, broker: str, topic: str):
        from urllib.parse import urlparse

        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise RuntimeError("--mqtt-topic needs paho-mqtt: pip install paho-mqtt") from None
        u = urlparse(broker if "://" in broker else f"mqtt://{broker}")
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"--broker must look like mqtt://HOST:PORT, got {broker!r}")
        self.topic = topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-ser-listen-{time.time_ns()}")
        import os

        user = u.username or os.environ.get("EDGE_SER_MQTT_USERNAME")
        if user:   # credentials from the URL (mqtt://user:pass@host) or the environment, as other commands
            self.client.username_pw_set(user, u.password or os.environ.get("EDGE_SER_MQTT_PASSWORD"))
        self.client.max_queued_messages_set(1000)   # broker away: keep at most this many results queued
        if u.scheme == "mqtts":
            self.client.tls_set()
        try:
            self.client.connect(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883), keepalive=30)
        except OSError as exc:
            raise OSError(f"cannot connect to MQTT broker {broker} ({exc})") from None
        self.client.loop_start()
        self.published = 0
        self.infos: Deque = collections.deque(maxlen=200)   # bounded: a listener runs for days

    def publish(self, r: Result) -> None:
        self.infos.append(self.client.publish(self.topic, json.dumps(r.to_dict(), sort_keys=True), qos=1))
        self.published += 1

    def close(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for queued results to reach the broker, then disconnect."""
        deadline = time.monotonic() + timeout
        for info in list(self.infos):
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except Exception:
                break
        try:
            self.client.loop_stop()
            self.client.disconnect()
        except Exception:
            pass


def listen_cli(args) -> Dict:
    """``edge-ser listen``: print one line per hop (``--json``: one JSON object per line) and return the
    summary dict (hops, skipped_silent, overflows, latency p50/p95, emotion counts, runtime)."""
    as_json = bool(getattr(args, "json", False))
    if getattr(args, "list_devices", False):
        devices = list_input_devices()
        if not as_json:
            if not devices:
                print("no audio input devices (PortAudio sees none); use --file FILE.wav")
            for d in devices:
                print(f"[{d['index']:>2}] {d['name']}  ({d['hostapi']}, {d['channels']} ch, "
                      f"{d['default_samplerate']:.0f} Hz)")
        return {"devices": devices, "count": len(devices)}
    if args.mqtt_topic and not args.broker:
        raise ValueError("--mqtt-topic needs --broker mqtt://HOST:PORT")
    if args.realtime and not args.file:
        raise ValueError("--realtime only applies with --file (a microphone is real time already)")
    stream = listen(args.model, file=args.file, device=args.device, runtime=args.runtime, window=args.window,
                    hop=args.hop, smooth=args.smooth, vad_db=args.vad_db, duration=args.duration,
                    realtime=args.realtime, samplerate=getattr(args, "samplerate", None))
    publisher = _Publisher(args.broker, args.mqtt_topic) if args.mqtt_topic else None
    latencies: List[float] = []
    counts: Dict[str, int] = {}
    interrupted = False
    t0 = time.monotonic()
    if not as_json:
        print(f"listening: {stream.stats['device']} at {stream.source.rate} Hz -> 16 kHz, window "
              f"{stream.scfg.window:g} s, hop {stream.scfg.hop:g} s, runtime {stream.stats['runtime']} "
              "(Ctrl-C stops)", flush=True)
        print(f"{'window':>15}  {'emotion':<10} {'top probabilities':<40} {'latency':>9}", flush=True)
    try:
        for r in stream:
            if as_json:
                print(json.dumps(r.to_dict(), sort_keys=True), flush=True)
            else:
                print(_format_result(r), flush=True)
            if not r.silent:
                latencies.append(r.latency_ms)
                counts[r.emotion] = counts.get(r.emotion, 0) + 1
            if publisher:
                publisher.publish(r)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
        if publisher:
            publisher.close()
    st = stream.stats
    lat = np.asarray(latencies, dtype=np.float64)
    summary = {"hops": st["hops"], "skipped_silent": st["skipped_silent"], "overflows": st["overflows"],
               "dropped_samples": st["dropped_samples"], "reconnects": st["reconnects"],
               "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
               "latency_ms_p95": float(np.percentile(lat, 95)) if len(lat) else None,
               "emotions": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
               "runtime": st["runtime"], "device": st["device"], "device_rate": st["device_rate"],
               "wall_seconds": round(time.monotonic() - t0, 3), "interrupted": interrupted}
    if publisher:
        summary["published"] = publisher.published
    return summary
