"""Test helper: a real PortAudio capture device, without kernel modules, that 'records' a known wav.

How: an ALSA ``file``-plugin PCM whose ``infile`` is raw int16 audio (what the device delivers, byte
for byte) over a slave that gives the timing: the monitor of a PulseAudio null sink, run by this helper
as a private user-space daemon (no snd-aloop, no /dev/snd). PortAudio -> ALSA file plugin -> ALSA pulse
plugin -> pulseaudio: real callbacks at real-time pace, exactly the known samples, then silence.

>>> with VirtualCapture(samples_int16, rate=44100) as dev:        # doctest: +SKIP
...     list(listen(model, device=dev.name, duration=5))
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

DEVICE = "edgeser_virtual"
ALSA_CONF = "/usr/share/alsa/alsa.conf"
#: Debian packages this helper needs (.ci/run installs them)
APT_PACKAGES = ("libportaudio2", "alsa-utils", "libasound2-plugins", "pulseaudio")


def missing() -> Optional[str]:
    """Why a virtual capture device cannot be made here (None when it can)."""
    try:
        import sounddevice  # noqa: F401  (raises OSError without libportaudio2)
    except (OSError, ImportError) as exc:
        return f"PortAudio not available ({exc}); apt-get install libportaudio2"
    if not os.path.exists(ALSA_CONF):
        return f"ALSA config {ALSA_CONF} missing; apt-get install libasound2"
    if not shutil.which("pulseaudio"):
        return "pulseaudio not installed (it paces the virtual capture device); apt-get install pulseaudio"
    if not any(Path(p).glob("alsa-lib/libasound_module_pcm_pulse.so")
               for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")):
        return "ALSA pulse plugin missing; apt-get install libasound2-plugins"
    return None


def reinit_portaudio() -> None:
    """Make PortAudio (and ALSA under it) re-read the device list after the config changed (with the
    product's deadline on PortAudio calls: a stuck PortAudio is an error here, not a hung test run)."""
    import sounddevice as sd

    from edge_ser.capture import _bounded

    def reinit():
        sd._terminate()
        sd._initialize()

    _bounded(reinit, "re-reading the device list")


class VirtualCapture:
    """Context manager: a capture device named ``name`` that delivers ``samples`` (int16, mono, at
    ``rate``) from the moment a stream opens it, paced in real time, followed by silence."""

    def __init__(self, samples: np.ndarray, rate: int = 44100, name: str = DEVICE):
        self.samples = np.asarray(samples)
        if self.samples.dtype != np.int16 or self.samples.ndim != 1:
            raise ValueError("VirtualCapture wants mono int16 samples")
        self.rate, self.name = int(rate), name
        self.dir: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self._old_env: Optional[str] = None

    def __enter__(self) -> "VirtualCapture":
        why = missing()
        if why:
            raise RuntimeError(why)
        self.dir = Path(tempfile.mkdtemp(prefix="edge-ser-alsa-"))
        raw = self.dir / "capture.raw"
        self.samples.astype("<i2").tofile(raw)
        runtime = self.dir / "xdg"
        runtime.mkdir(mode=0o700)
        socket = self.dir / "native"
        env = dict(os.environ, HOME=str(self.dir), XDG_RUNTIME_DIR=str(runtime),
                   PULSE_RUNTIME_PATH=str(runtime / "pulse"))
        self.log = open(self.dir / "pulseaudio.log", "ab")
        self._cmd = (["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                      "--disallow-module-loading", "--log-target=stderr",
                      "-L", f"module-native-protocol-unix socket={socket} auth-anonymous=1",
                      "-L", f"module-null-sink sink_name=edgeser_null rate={self.rate} channels=1 format=s16le"],
                     env, socket)
        try:
            self.start_clock()
        except RuntimeError:
            self.__exit__(None, None, None)
            raise
        conf = self.dir / "asound.conf"
        conf.write_text(f"""
pcm.edgeser_clock {{
    type pulse
    server "unix:{socket}"
    device "edgeser_null.monitor"
}}
pcm.{self.name} {{
    type file
    slave.pcm "edgeser_clock"
    file "/dev/null"
    infile "{raw}"
    format "raw"
    hint {{ show on description "edge-ser virtual capture (known wav)" }}
}}
""")
        self._old_env = os.environ.get("ALSA_CONFIG_PATH")
        os.environ["ALSA_CONFIG_PATH"] = f"{ALSA_CONF}:{conf}"
        reinit_portaudio()
        return self

    def start_clock(self) -> None:
        """Start (or restart, after :meth:`kill_clock`) the daemon that backs the device."""
        cmd, env, socket = self._cmd
        if socket.exists():
            socket.unlink()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pulseaudio did not start: {(self.dir / 'pulseaudio.log').read_text()[-300:]}")
            time.sleep(0.05)

    def kill_clock(self) -> None:
        """Pull the plug: stop the daemon that backs the device (PortAudio then errors or stalls)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __exit__(self, *exc) -> None:
        self.kill_clock()
        if self._old_env is None:
            os.environ.pop("ALSA_CONFIG_PATH", None)
        else:
            os.environ["ALSA_CONFIG_PATH"] = self._old_env
        try:
            reinit_portaudio()
        except Exception:
            pass
        if getattr(self, "log", None):
            self.log.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
