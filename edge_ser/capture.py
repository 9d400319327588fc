"""Audio capture for ``listen``: a PortAudio microphone (or a file fed like one) into a ring buffer.

The audio callback only copies blocks into :class:`RingBuffer`; :mod:`edge_ser.stream` is the one consumer.
Every PortAudio control call runs with a deadline (:func:`_bounded`), so a wedged audio stack is a clear
error instead of a hung listener.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

#: device rates tried, in order, when the device's default rate is refused
FALLBACK_RATES = (48000, 44100, 16000, 32000, 22050)


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
                self._call(lambda r=r: self.sd.check_input_settings(device=self.info["index"], channels=1,
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
        import os

        import soundfile as sf

        from .audio import AudioError

        if not os.path.exists(path):        # libsndfile would only say "System error."
            raise AudioError(path, "no such file; check the path (--file wants a wav/flac/ogg file)")
        if not os.path.isfile(path):
            raise AudioError(path, "not a regular file (a folder?); --file wants one wav/flac/ogg file")
        try:
            info = sf.info(str(path))
        except Exception as exc:
            raise AudioError(path, f"not a readable audio file ({' '.join(str(exc).split())[:150]}); "
                                   "convert it to wav or flac, e.g. ffmpeg -i IN -ar 16000 OUT.wav") from None
        if info.frames <= 0:
            raise AudioError(path, "no audio samples (zero-length)")
        self.path, self.rate, self.realtime = str(path), int(info.samplerate), bool(realtime)
        self.frames = int(info.frames)
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

        t0, sent = time.monotonic(), 0
        try:
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
            why = ' '.join(str(exc).split())[:200]
            if not isinstance(exc, ValueError) and sent < self.frames:   # "psf_fseek failed" says little
                why = (f"cannot decode beyond {sent / self.rate:.1f} s of {self.frames / self.rate:.1f} s: the file "
                       f"is truncated or damaged ({why}); copy it again or re-encode it")
            self.error = f"{self.path}: {why}"
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
