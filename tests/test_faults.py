"""Fault-injection tests (issue 8) for the gaps the per-module suites leave: audio, corpora, device (disk
full, power loss, memory budget), MQTT (broker down, credentials, TLS, junk). Map of all: RELIABILITY.md."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_ser.audio import AudioError, check_samples, load_audio
from edge_ser.config import FeatureConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = FeatureConfig(clip_seconds=0.5)
pytestmark = [pytest.mark.faults]


# ---------------------------------------------------------------- helpers and fixtures

@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    """Every test here caches under its own folder (from conftest)."""


@pytest.fixture
def device_id():
    return "faultdev"


def requires_mosquitto(fn):
    from broker import requires_mosquitto as req

    return pytest.mark.mqtt(req(fn))


def tone(seconds=1.0, rate=16000, amp=0.3, freq=220.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def wav(path: Path, x=None, rate=16000, subtype="PCM_16", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(**kw) if x is None else x, rate, subtype=subtype, format="WAV")
    return path


def audio_error(path) -> str:
    with pytest.raises(AudioError) as info:
        load_audio(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def sparse_ten_hour_wav(path: Path) -> Path:
    """A real, complete RIFF/WAVE file of 10 hours of 16 kHz 16-bit mono (1.15 GB of silence, stored
    sparse so it costs no disk)."""
    n = 10 * 3600 * 16000
    header = (b"RIFF" + struct.pack("<I", 36 + 2 * n) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", 2 * n))
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + 2 * n)
    return path


def wav_with_codec(path: Path, tag: int) -> Path:
    """A WAV whose fmt chunk names codec ``tag`` (e.g. 0x0161 WMA), followed by PCM-looking bytes."""
    data = (tone() * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHHH", tag, 1, 16000, 32000, 2, 16, 0)
    path.write_bytes(b"RIFF" + struct.pack("<I", 20 + len(fmt) + len(data)) + b"WAVEfmt " + struct.pack("<I", len(fmt))
                     + fmt + b"data" + struct.pack("<I", len(data)) + data)
    return path


def bytes_read() -> int:
    """Bytes this process has read through read(2) so far (``rchar`` in /proc/self/io)."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def cli(*args, timeout=120, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run ``python -m edge_ser ARGS`` from the repo; returns the completed process (text)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "edge_ser", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``edge-ser: error:`` line of a failed CLI run (asserts there is exactly one, no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("edge-ser: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


class Deadline:
    """Fail (instead of hanging the suite) when a block takes longer than ``seconds``: a FIFO read blocks forever."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def _fire(self, *_):
        raise TimeoutError(f"blocked for more than {self.seconds}s (a read that never returns?)")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


# ================================================================ audio

def test_ten_hour_file_refused_without_reading_it(tmp_path):
    """A 10-hour WAV (1.15 GB) is refused from its header: one line, and well under 1 MB actually read."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("no /proc/self/io here to count the bytes read")
    p = sparse_ten_hour_wav(tmp_path / "ten_hours.wav")
    assert p.stat().st_size > 1_100_000_000
    before = bytes_read()
    msg = audio_error(p)
    read = bytes_read() - before
    assert "too long (36000 s" in msg and "split it first" in msg
    assert read < 1_000_000, f"read {read} bytes of a file refused by its header"


def test_wrong_extension_is_decoded_by_content_and_noted(tmp_path):
    x = tone(seconds=0.5)
    mp3_named = wav(tmp_path / "really_a_wav.mp3", x)
    flac_as_wav = tmp_path / "really_a_flac.wav"
    sf.write(flac_as_wav, x, 16000, format="FLAC")
    for path, content in ((mp3_named, "WAV"), (flac_as_wav, "FLAC")):
        a = load_audio(path)
        assert np.max(np.abs(a.samples - (x - x.mean()))) < 1e-3
        assert any(f"content is {content}" in n and path.suffix in n for n in a.notes), a.notes
    text_as_flac = tmp_path / "notes.flac"
    text_as_flac.write_text("meeting notes, not audio\n" * 40)
    assert "not a readable audio file" in audio_error(text_as_flac)
    assert load_audio(wav(tmp_path / "honest.wav", x)).notes == []


@pytest.mark.parametrize("kind", ["wma-in-wav", "mpeg-in-wav", "m4a-container"])
def test_unsupported_codec_is_one_clear_line(tmp_path, kind):
    if kind == "m4a-container":
        p = tmp_path / "speech.m4a"
        p.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A mp42isom" + bytes(range(256)) * 40)
    else:
        p = wav_with_codec(tmp_path / f"{kind}.wav", 0x0161 if kind == "wma-in-wav" else 0x0050)
    assert "not a readable audio file" in audio_error(p)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_samples_refused(tmp_path, bad):
    x = tone()
    x[4000] = bad
    p = wav(tmp_path / "nonfinite.wav", x, subtype="FLOAT")
    assert "NaN or infinite" in audio_error(p)
    with pytest.raises(AudioError, match="NaN or infinite"):
        check_samples(x.astype(np.float64), 16000, "array")


def test_fifo_and_folder_named_like_audio_do_not_block(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    (tmp_path / "folder.wav").mkdir()
    with Deadline(20):
        assert "not a regular file" in audio_error(fifo)
        assert "not a regular file" in audio_error(tmp_path / "folder.wav")


# ================================================================ corpora

def small_corpus(root: Path, speakers=("anna", "bob"), classes=("happy", "sad"), per=2) -> Path:
    k = 0
    for c in classes:
        for s in speakers:
            for i in range(per):
                wav(root / c / f"{s}_{i}.wav", seconds=0.4, freq=150 + 37 * k, seed=k)
                k += 1
    return root


@pytest.mark.slow
def test_corpus_with_every_bad_entry_cli_report(tmp_path):
    """``edge-ser corpus info`` on a corpus holding every kind of bad entry: exit 0, one problem line per
    bad file, notes for clipping / DC offset / wrong extension / duplicates, the rest usable."""
    root = small_corpus(tmp_path / "c")
    sparse_ten_hour_wav(root / "happy" / "anna_long.wav")
    (root / "happy" / "bob_text.wav").write_text("not audio\n" * 30)
    wav_with_codec(root / "sad" / "anna_wma.wav", 0x0161)
    x = tone()
    x[10] = np.inf
    wav(root / "sad" / "bob_inf.wav", x, subtype="FLOAT")
    os.symlink(tmp_path / "gone.wav", root / "sad" / "anna_dangling.wav")
    os.mkfifo(root / "sad" / "bob_fifo.wav")
    (root / "angry").mkdir()                                           # empty class folder
    wav(root / "happy" / "cleo_clip.wav", np.clip(tone(amp=3.0, seed=7), -1, 1))
    wav(root / "sad" / "cleo_dc.wav", tone(seed=8) + 0.25)
    wav(root / "happy" / "cleo_mp3name.mp3", tone(seed=9))
    shutil.copyfile(root / "happy" / "anna_0.wav", root / "sad" / "dave_copy.wav")  # same audio, other label
    proc = cli("corpus", "info", root, "--json", timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    problems, notes = r["problems"], r["notes"]
    expect = {"happy/anna_long.wav": "too long", "happy/bob_text.wav": "not a readable audio file",
              "sad/anna_wma.wav": "not a readable audio file", "sad/bob_inf.wav": "NaN or infinite",
              "sad/anna_dangling.wav": "broken symbolic link", "sad/bob_fifo.wav": "FIFO",
              "angry/": "holds no audio"}
    for rel, why in expect.items():
        mine = [p for p in problems if f": {rel}:" in p]
        assert len(mine) == 1 and why in mine[0], (rel, problems)
    assert len(problems) == len(expect), problems
    assert any("cleo_clip.wav" in n and "clipping" in n for n in notes), notes
    assert any("cleo_dc.wav" in n and "DC offset +0.25" in n for n in notes), notes
    assert any("cleo_mp3name.mp3" in n and "content is WAV" in n for n in notes), notes
    assert any("dave_copy.wav" in n and "anna_0.wav" in n for n in notes), notes
    assert r["files"] == 8 + 4 and r["classes"] == ["happy", "sad"]


def test_unreadable_entries_are_problems_and_the_rest_loads(tmp_path):
    """A dangling symlink and a FIFO named *.wav: one problem line each from load_features, no hang,
    no exception, the other files become features."""
    from edge_ser.corpora import load_features

    root = small_corpus(tmp_path / "c")
    os.symlink(tmp_path / "nowhere.wav", root / "happy" / "cleo_1.wav")
    os.mkfifo(root / "sad" / "cleo_2.wav")
    with Deadline(60):
        fs, problems = load_features(root, SMALL, workers=1)
    assert len(fs) == 8 and sorted(set(fs.speakers)) == ["anna", "bob"]
    errors = [p for p in problems if p.severity == "error"]
    assert sorted(p.path for p in errors) == ["happy/cleo_1.wav", "sad/cleo_2.wav"]
    assert all("\n" not in p.line() and "cannot read" in p.reason for p in errors)


def test_permission_denied_file_is_a_problem_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading; the dangling-symlink and "
                    "FIFO tests cover unreadable entries instead")
    from edge_ser.corpora import load_features

    root = small_corpus(tmp_path / "c")
    locked = wav(root / "sad" / "cleo_9.wav")
    locked.chmod(0)
    try:
        fs, problems = load_features(root, SMALL, workers=1)
    finally:
        locked.chmod(0o644)
    assert len(fs) == 8
    assert [p.path for p in problems if p.severity == "error"] == ["sad/cleo_9.wav"]


def test_empty_class_folder_is_left_out_with_a_problem_line(tmp_path):
    from edge_ser.corpora import load_features, open_corpus

    root = small_corpus(tmp_path / "c")
    (root / "angry").mkdir()
    (root / "angry" / "README.txt").write_text("no audio here")
    c = open_corpus(root)
    assert c.classes == ("happy", "sad")
    assert [p.line() for p in c.problems if p.severity == "error"] == \
           ["error: angry/: class folder holds no audio files: class left out"]
    fs, _ = load_features(root, SMALL, workers=1)
    assert fs.classes == ("happy", "sad") and len(fs) == 8


@pytest.mark.slow
def test_single_speaker_refused_at_split(tmp_path, home):
    """One speaker only: ``corpus info`` warns, and ``pack`` refuses (one line, exit 1, no file
    written) before any distillation, with the default split and with the speaker held out explicitly."""
    from edge_ser.corpora import load_features
    from edge_ser.data import default_test_speakers
    from edge_ser.packer import pack

    root = small_corpus(tmp_path / "c", speakers=("anna",), per=3)
    fs, problems = load_features(root, SMALL, workers=1)
    assert any("only one speaker" in p.reason for p in problems)
    with pytest.raises(ValueError, match="at least 2 speakers"):
        default_test_speakers(fs.speaker_ids())
    with pytest.raises(ValueError, match="unknown speaker 'bob'"):
        fs.split_speakers(["bob"])
    with pytest.raises(ValueError, match="no training utterances left"):
        pack(str(root), tmp_path / "x.pack", method="random", ipc=1, test_speakers="anna",
             key=home["private_key"], progress=False)
    out = tmp_path / "single.pack"
    proc = cli("pack", root, "-o", out, "--method", "random", "--ipc", "1", "--key", home["private_key"],
               env={"EDGE_SER_CACHE": str(tmp_path / "cache")}, timeout=180)
    line = one_error_line(proc)
    assert "speaker-independent split needs at least 2 speakers" in line
    assert not out.exists()


@pytest.mark.slow
def test_pack_param_reaches_the_method_and_is_recorded(tmp_path, home):
    """`pack --param KEY=VALUE`: the method gets it (random's ``steps`` sets the device's step count), the pack's
    provenance records it; a malformed or unknown one is one error line (naming the known keys) and no pack."""
    root = small_corpus(tmp_path / "c", speakers=("anna", "bob", "cleo"), per=2)
    env = {"EDGE_SER_CACHE": str(tmp_path / "cache")}
    base = ("pack", root, "--method", "random", "--ipc", "1", "--test-speakers", "cleo", "--key", home["private_key"])
    out = tmp_path / "p.pack"
    proc = cli(*base, "-o", out, "--param", "steps=20", "--param", "embed_epochs=3", "--json", env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(cli("pack", "inspect", out, "--json", env=env).stdout.strip().splitlines()[-1])
    assert shown["provenance"]["params"] == {"embed_epochs": 3, "steps": 20}
    assert shown["schedule"]["epochs"] == 20          # 2 clips, full batch: 20 steps = 20 epochs
    bad = tmp_path / "bad.pack"
    assert "--param wants KEY=VALUE, got 'steps'" in one_error_line(
        cli(*base, "-o", bad, "--param", "steps", env=env, timeout=180))
    assert not bad.exists()
    line = one_error_line(cli(*base, "-o", bad, "--param", "note=80,120", env=env, timeout=180))
    assert "unknown random setting 'note'; known: embed, embed_epochs" in line, line
    assert not bad.exists()

def test_unknown_labels_are_one_line_each(tmp_path):
    """File-name conventions with codes outside the corpus's vocabulary: one problem line each."""
    from edge_ser.corpora import load_features, open_corpus

    emodb = tmp_path / "emodb" / "wav"
    for i, name in enumerate(["03a01Fa", "03a01Wa", "08b02Tc", "08b02Nc", "03a02Fb", "08b03Wa", "03a04Tc",
                              "08b01Nb", "03a02Xa"]):
        wav(emodb / f"{name}.wav", seconds=0.4, seed=i, freq=120 + 40 * i)
    c = open_corpus(tmp_path / "emodb")
    assert c.format == "emodb" and len(c.utterances) == 8
    bad = [(p.path, p.reason) for p in c.problems if p.severity == "error"]
    assert len(bad) == 1 and bad[0][0] == "wav/03a02Xa.wav" and "unknown emotion letter 'X'" in bad[0][1], bad
    crema = tmp_path / "crema" / "AudioWAV"
    for i, name in enumerate(["1001_DFA_ANG_XX", "1001_DFA_SAD_XX", "1002_IEO_ANG_HI", "1002_IEO_SAD_LO",
                              "1002_IEO_BOR_XX"]):
        wav(crema / f"{name}.wav", seconds=0.4, seed=10 + i, freq=130 + 30 * i)
    fs, problems = load_features(tmp_path / "crema", SMALL, workers=1)
    assert len(fs) == 4
    bad = [p for p in problems if p.severity == "error"]
    assert len(bad) == 1 and bad[0].path == "AudioWAV/1002_IEO_BOR_XX.wav" and "unknown emotion code 'BOR'" in bad[0].reason


def test_duplicate_files_are_noted_and_kept(tmp_path):
    from edge_ser.corpora import load_features

    root = small_corpus(tmp_path / "c")
    shutil.copyfile(root / "happy" / "anna_0.wav", root / "happy" / "cleo_0.wav")
    os.symlink(root / "sad" / "bob_1.wav", root / "happy" / "dave_0.wav")   # same file, two labels
    fs, problems = load_features(root, SMALL, workers=1)
    assert len(fs) == 10 and not [p for p in problems if p.severity == "error"]
    dup = {p.path: p.reason for p in problems if "byte-identical" in p.reason}
    assert dup == {"happy/cleo_0.wav": "byte-identical to happy/anna_0.wav",
                   "sad/bob_1.wav": "byte-identical to happy/dave_0.wav"}


# ================================================================ device: disk full

def _packs(tmp_path, home, *seqs, ipc=2):
    from packutil import make_pack

    return [Path(make_pack(tmp_path / f"p{s}.pack", private_key=home["private_key"], sequence=s, seed=s,
                           ipc=ipc)["path"]) for s in seqs]


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_copying_a_pack_into_the_store(tmp_path, home, monkeypatch):
    """ENOSPC half-way through the copy: the commit fails with the OS's words, the previous pack stays
    current and verifiable, and no partial temp file is left eating the full disk."""
    import edge_ser.store as store_mod
    from edge_ser.packfile import load_pack, read_manifest

    old, new = _packs(tmp_path, home, 10, 20)
    store = store_mod.PackStore(tmp_path / "store")
    store.commit(old, read_manifest(old)[0], 10, move=False)

    def half_then_full(fin, fout, length=0):
        fout.write(fin.read(1000))
        _enospc()

    monkeypatch.setattr(store_mod.shutil, "copyfileobj", half_then_full)
    with pytest.raises(OSError, match="No space left on device"):
        store.commit(new, read_manifest(new)[0], 20, move=False)
    monkeypatch.undo()
    assert store.current()["sequence"] == 10 and store.max_sequence() == 10
    assert load_pack(store.current_path(), public_key=home["public_key"]).sequence == 10
    leftovers = sorted(f.name for f in store.packs.iterdir() if f.name != store.current()["file"])
    assert leftovers == [], f"partial files left in {store.packs} after ENOSPC: {leftovers}"


def test_disk_full_while_writing_the_store_state(tmp_path, home, monkeypatch):
    """ENOSPC on fsync of the new state.json: the old state stays in force; a restart's cleanup
    leaves exactly the referenced pack."""
    import edge_ser.store as store_mod
    from edge_ser.packfile import load_pack, read_manifest

    old, new = _packs(tmp_path, home, 10, 20)
    store = store_mod.PackStore(tmp_path / "store")
    store.commit(old, read_manifest(old)[0], 10, move=False)
    real_fsync = os.fsync

    def fsync(fd):
        if "state.json" in os.readlink(f"/proc/self/fd/{fd}"):
            _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        store.commit(new, read_manifest(new)[0], 20, move=False)
    monkeypatch.undo()
    assert json.loads(store.state_file.read_text())["current"]["sequence"] == 10
    restarted = store_mod.PackStore(tmp_path / "store")
    restarted.cleanup()
    assert sorted(f.name for f in restarted.packs.iterdir()) == [restarted.current()["file"]]
    assert not list(restarted.root.glob(".*.tmp"))
    assert load_pack(restarted.current_path(), public_key=home["public_key"]).sequence == 10


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG
    return apply


@requires_mosquitto
def test_disk_full_in_the_agent_keeps_the_previous_pack(tmp_path, home, broker):
    """The agent process may not write files over 256 KB (RLIMIT_FSIZE: the 'disk' fills up) while a
    1 MB pack arrives: it reports the cause in one line, and the previous pack stays current."""
    from edge_ser import transport
    from edge_ser.packfile import load_pack, read_manifest
    from edge_ser.store import PackStore

    old, = _packs(tmp_path, home, 10, ipc=2)
    new, = _packs(tmp_path, home, 20, ipc=24)
    assert old.stat().st_size < 200_000 < 1_000_000 < new.stat().st_size
    store_dir = tmp_path / "store"
    PackStore(store_dir).commit(old, read_manifest(old)[0], 10, move=False)
    transport.publish(new, broker.url, "ser/packs", **broker.creds())
    proc = cli("agent", "--broker", broker.url, "--topic", "ser/packs", "--username", "faultdev",
               "--password", broker.passwords["faultdev"], "--store", store_dir, "--public-key", home["public_key"],
               "--once", "--timeout", "20", preexec_fn=_limit_file_size(256 * 1024), timeout=90)
    line = one_error_line(proc)
    assert "File too large" in line or "No space" in line or "disk" in line.lower(), line
    store = PackStore(store_dir)
    assert store.current()["sequence"] == 10
    assert load_pack(store.current_path(), public_key=home["public_key"]).sequence == 10
    assert [f.name for f in store.packs.iterdir()] == [store.current()["file"]]
    store.cleanup()                       # what the restarted agent does first: the stale .part goes
    assert list(store.incoming.iterdir()) == []


# ================================================================ device: power loss during the model swap

_SWAPPER = r"""
import sys, json, os, shutil
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from edge_ser.local import _replace_folder
out, v = Path(sys.argv[2]), int(sys.argv[3])
while True:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "model.npz").write_bytes(bytes([v % 251]) * 200_000)
    (tmp / "model.json").write_text(json.dumps({"version": v}))
    _replace_folder(tmp, out)
    print(v, flush=True)
    v += 1
"""


def test_power_loss_during_model_swap_keeps_a_complete_model(tmp_path):
    """SIGKILL a process that swaps model folders in a loop (train-local's last step) at random instants:
    after ``recover_folder`` (what the next train-local does first) the model folder is always complete."""
    from edge_ser.local import recover_folder

    out = tmp_path / "model"
    out.mkdir()
    (out / "model.npz").write_bytes(bytes([0]) * 200_000)
    (out / "model.json").write_text(json.dumps({"version": 0}))
    rng = np.random.default_rng(3)
    v = 1
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(REPO), str(out), str(v)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.3 + float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        done, _ = proc.communicate()
        v += len(done.split()) + 2
        recover_folder(out)
        version = json.loads((out / "model.json").read_text())["version"]
        assert (out / "model.npz").read_bytes() == bytes([version % 251]) * 200_000, trial
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")], trial


# ================================================================ device: memory budget

@pytest.mark.slow
def test_memory_budget_too_small_cli_refuses_and_keeps_model(tmp_path, home):
    """``train-local --memory-budget-mb 50``: exit 1 with one line naming the budget (no OOM kill), and
    the previous model folder untouched."""
    pack, = _packs(tmp_path, home, 5)
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.json").write_text('{"previous": true}')
    proc = cli("train-local", pack, "-o", out, "--memory-budget-mb", "50", "--public-key", home["public_key"],
               "--json", timeout=180)
    line = one_error_line(proc)
    assert "memory budget 50 MB" in line
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is False
    assert sorted(p.name for p in out.iterdir()) == ["model.json"]
    assert (out / "model.json").read_text() == '{"previous": true}'
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")]


@pytest.mark.slow
def test_lean_cli_restarts_itself_with_huge_pages_and_trains_the_same(tmp_path, home):
    """``train-local --lean`` execs itself once with glibc's huge-page tunable (read only at process start),
    trains in channel groups on the lean heap, and passes the pack's golden check."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("the restart with GLIBC_TUNABLES is for Linux/glibc only")
    from _packlike import make_pack as trained_pack

    from edge_ser.packfile import write_pack

    p = trained_pack()
    pack = write_pack(tmp_path / "real.pack", X=p.X, y=p.y, classes=p.classes, feature_config=p.feature_config,
                      model_config=p.model_config, schedule=p.schedule, theta0=p.theta0,
                      golden_inputs=p.golden_inputs, golden_logits=p.golden_logits,
                      golden_tolerance=p.golden_tolerance, provenance=p.provenance,
                      private_key=home["private_key"])["path"]
    proc = cli("train-local", pack, "-o", tmp_path / "model", "--lean", "--no-export", "--threads", "1",
               "--public-key", home["public_key"], "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["lean"] and r["exact_schedule"] and r["heap"] == "lean+huge-pages"
    assert r["golden"]["passed"]


# ================================================================ MQTT

def _agent_args(b, store, public_key, url=None, **over):
    args = {"--broker": url or b.url, "--topic": "ser/packs", "--username": "faultdev", "--password": b.passwords["faultdev"],
            "--store": store, "--public-key": public_key, "--timeout": "15"}
    args.update(over)
    return [x for k, v in args.items() if v is not None for x in (k, v)]


def _stored(tmp_path, home, seq=10):
    from edge_ser.packfile import read_manifest
    from edge_ser.store import PackStore

    p, = _packs(tmp_path, home, seq)
    store = PackStore(tmp_path / "store")
    store.commit(p, read_manifest(p)[0], seq, move=False)
    return store, p


@pytest.mark.slow
@requires_mosquitto
def test_agent_cli_broker_down_wrong_password_wrong_ca(tmp_path, home, broker):
    """The agent CLI against a dead port, with a wrong password, and over TLS with a CA that did not
    sign the broker's certificate: one line naming the cause, exit 1, the stored pack untouched."""
    from broker import free_port, make_ca

    store, p = _stored(tmp_path, home)
    before = store.state_file.read_bytes()
    dead = cli("agent", *_agent_args(broker, store.root, home["public_key"], url=f"mqtt://127.0.0.1:{free_port()}",
                                     **{"--timeout": "3"}), "--once", timeout=60)
    assert "cannot reach MQTT broker" in one_error_line(dead)
    wrong = cli("agent", *_agent_args(broker, store.root, home["public_key"], **{"--password": "not-it"}), "--once",
                timeout=60)
    line = one_error_line(wrong)
    assert "refused the connection" in line and "--username/--password" in line
    other_ca = make_ca(tmp_path / "other-ca")
    tls = cli("agent", *_agent_args(broker, store.root, home["public_key"], url=broker.tls_url,
                                    **{"--cafile": other_ca}), "--once", timeout=60)
    assert "not trusted" in one_error_line(tls)
    pub = cli("publish", p, "--broker", broker.tls_url, "--topic", "ser/packs", "--username", broker.username,
              "--password", broker.password, "--cafile", other_ca, "--timeout", "10", timeout=60)
    assert "not trusted" in one_error_line(pub)                    # the server side says the same
    assert store.state_file.read_bytes() == before
    assert broker.proc.poll() is None


@requires_mosquitto
def test_agent_started_before_the_broker_retries_then_receives(tmp_path, home):
    """Broker down when the agent starts: it keeps retrying within its timeout and stores the pack
    once the broker is up."""
    from broker import Broker

    from edge_ser import transport
    from edge_ser.packfile import read_manifest
    from edge_ser.store import PackStore

    b = Broker(tmp_path / "late-broker", shipped=True)
    p, = _packs(tmp_path, home, 30)
    result = {}
    agent = transport.Agent(b.url, "ser/packs", store=tmp_path / "store", public_key=home["public_key"],
                            verbose=False, **b.device("faultdev"))
    t = threading.Thread(target=lambda: result.update(agent.run(once=True, timeout=40)), daemon=True)
    t.start()
    try:
        time.sleep(2.5)                      # the agent is retrying against a closed port
        assert t.is_alive() and not agent.conn.connected.is_set()
        b.start()
        transport.publish(p, b.url, "ser/packs", timeout=30, **b.creds())
        t.join(40)
    finally:
        b.stop()
    assert result.get("state") == "stored", result
    assert PackStore(tmp_path / "store").current()["pack_id"] == read_manifest(p)[0]


def _rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


@requires_mosquitto
def test_junk_flood_during_delivery_agent_stores_pack_with_bounded_memory(tmp_path, home, broker):
    """While a real pack is delivered, ~280 MB of junk floods the pack topics (garbage announcements,
    oversized payloads, forged chunks of the real pack, chunks of unknown packs): the agent process
    stores the good pack, stays up, and its peak RSS grows by far less than the junk it saw."""
    from edge_ser import transport
    from edge_ser.packfile import load_pack, read_manifest
    from edge_ser.store import PackStore

    store_dir = tmp_path / "store"
    _stored(tmp_path, home, 10)
    good, = _packs(tmp_path, home, 20, ipc=12)
    good_id = read_manifest(good)[0]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen([sys.executable, "-m", "edge_ser", "agent",
                              *_agent_args(broker, store_dir, home["public_key"], **{"--timeout": "60"})],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)   # a file: a full pipe would stall it
    try:
        _wait(lambda: "online" in _status(broker), 30, agent)
        baseline = _rss_kb(agent.pid, "VmRSS")
        rng = np.random.default_rng(0)
        sent = [0]

        def flood():
            conn = transport._Connection(broker.url, f"junk-{os.getpid()}", **broker.user("edge-ser-flooder"))
            conn.open(10)
            try:
                for i in range(4000):
                    kind = i % 5
                    if kind == 0:
                        topic, payload = "ser/packs/announce", rng.bytes(60_000)
                    elif kind == 1:
                        topic, payload = "ser/packs/announce", json.dumps(
                            {"type": "edge-ser-pack", "size": 10 ** 12, "pad": "x" * 50_000}).encode()
                    elif kind == 2:
                        topic, payload = f"ser/packs/chunks/{good_id}/{i % 7}", rng.bytes(60_000)
                    elif kind == 3:
                        topic, payload = f"ser/packs/chunks/{'cd' * 32}/{i}", rng.bytes(60_000)
                    else:
                        topic, payload = "ser/packs/announce", rng.bytes(120_000)
                    conn.client.publish(topic, payload, qos=0)
                    sent[0] += len(payload)
                    if i % 50 == 0:
                        time.sleep(0.01)
            finally:
                conn.close()

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(0.3)
        transport.publish(good, broker.url, "ser/packs", chunk_size=30_000, timeout=60, **broker.creds())
        flooder.join(120)
        _wait(lambda: (PackStore(store_dir).current() or {}).get("pack_id") == good_id, 60, agent)
        assert agent.poll() is None, "the agent died under the flood"
        peak = _rss_kb(agent.pid, "VmHWM")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
    err = (tmp_path / "agent.log").read_text()
    assert sent[0] > 250_000_000
    assert agent.returncode == 0, err[-2000:]
    ignored = err.count("ignored announcement")
    print(f"junk sent {sent[0] / 1e6:.0f} MB; agent ignored {ignored} announcements; RSS {baseline / 1024:.0f} -> "
          f"peak {peak / 1024:.0f} MB")
    assert ignored >= 1200, f"the flood barely reached the agent ({ignored} junk announcements seen)"
    growth_mb = (peak - baseline) / 1024
    assert growth_mb < 100, f"agent peak RSS grew by {growth_mb:.0f} MB under {sent[0] / 1e6:.0f} MB of junk"
    store = PackStore(store_dir)
    assert load_pack(store.current_path(), public_key=home["public_key"]).sequence == 20
    assert list(store.incoming.iterdir()) == []


def _status(b, device="faultdev") -> str:
    """The retained status message of ``device`` on the broker ('' when none)."""
    from edge_ser import transport

    got = {}
    conn = transport._Connection(b.url, f"peek-{time.monotonic_ns()}", **b.user("edge-ser-monitor"),
                                 on_message=lambda c, u, m: got.__setitem__(m.topic, bytes(m.payload)))
    conn.open(10)
    try:
        conn.client.subscribe(f"ser/packs/status/{device}", qos=1)
        time.sleep(0.3)
    finally:
        conn.close()
    return got.get(f"ser/packs/status/{device}", b"").decode()


def _wait(pred, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def test_agent_queue_is_bounded_in_bytes_while_the_main_thread_is_busy(tmp_path, home):
    """While the agent's main thread is busy (verifying, committing, or training with ``--train``), the
    network thread keeps queueing messages. Junk announcements of up to 1 MB each are accepted into a
    queue bounded only by *count* (512), so a flood can pin ~512 MB on a device. The bytes held must be
    bounded (here: 64 MB)."""
    from types import SimpleNamespace

    from edge_ser import transport

    agent = transport.Agent("mqtt://127.0.0.1:1", "ser/packs", store=tmp_path / "store",
                            public_key=home["public_key"], verbose=False)
    junk = b"{" * (transport.MAX_ANNOUNCE_BYTES - 1)      # shared object: the test itself stays small
    for _ in range(600):
        agent._on_message(None, None, SimpleNamespace(topic="ser/packs/announce", payload=junk))
    held = 0
    while not agent.queue.empty():
        item = agent.queue.get_nowait()
        held += len(item[2] or b"")
    assert held <= 64 << 20, f"agent queue held {held / 2 ** 20:.0f} MB of junk while busy"
