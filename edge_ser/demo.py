"""``edge-ser demo``: the whole pipeline end to end on the built-in demo corpus, offline, in about 3 minutes.

corpus info -> key pair -> distil + sign a pack -> (MQTT delivery when mosquitto is installed) ->
train-local from the fixed initialisation (a separate process, as on a device) -> ONNX/TFLite export ->
evaluate on held-out speakers -> stream a few held-out utterances through the live path.

It runs the product's default method (fixed-init) at a demo size: one short expert, two matching iterations
and one device schedule instead of a grid (:data:`DEMO_PRESET`), on one thread (two threads on a busy 2-core
machine made each step four times slower). The demo corpus is synthetic: its numbers show the plumbing works,
not how well SER works (see benchmarks/RESULTS.md for real corpora).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

#: the demo's distillation: the default method at demo size (:func:`edge_ser.distill.preset`: one short expert,
#: two matching iterations, one device schedule instead of a grid)
DEMO_PRESET = "demo"
#: what the demo takes (README "Two commands": 75 s of CPU time, 3.2 min wall on a shared, busy 2-core x86
#: machine), said at the start
DEMO_MINUTES = "2-3 minutes on a 2-core machine (3.2 min measured on a busy one)"
#: the held-out utterances the listen step strings together, in this order where the classes exist
LISTEN_CLASSES = ("angry", "sad", "happy", "neutral")


class _Say:
    """Step messages: stdout for a person, stderr under --json (stdout then holds only the result), none
    when quiet."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.stream = quiet, (sys.stderr if as_json else sys.stdout)
        self.t_step = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)

    def step(self, msg: str) -> None:
        self.t_step = time.perf_counter()
        self(msg)

    def took(self, msg: str) -> None:
        self(f"    {msg}  [{time.perf_counter() - self.t_step:.0f} s]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mqtt_roundtrip(pack_path: Path, workdir: Path, public_key: Path, say: _Say) -> Optional[Dict]:
    """Publish the pack through a throw-away local mosquitto and receive it with the agent."""
    broker_bin = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not broker_bin:
        say("    (mosquitto not installed: skipping the MQTT hop; apt-get install mosquitto)")
        return None
    from .transport import publish, run_agent

    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([broker_bin, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"mqtt://127.0.0.1:{port}"
        sent = publish(str(pack_path), url, "edge-ser/demo", timeout=30)
        got = run_agent(url, "edge-ser/demo", store=str(workdir / "device-store"), public_key=str(public_key),
                        once=True, timeout=30)
        return {"published": sent, "received": got}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _train_on_device(pack_path: Path, model_dir: Path, public_key: str, quiet: bool) -> Dict:
    """``edge-ser train-local`` in its own process, as a device runs it (it converts to TFLite in a process of
    its own, so TensorFlow's memory is added neither to torch's nor to the distillation's); its progress bar
    shows on this terminal."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "edge_ser", "train-local", str(pack_path), "-o", str(model_dir), "--threads", "1",
           "--public-key", str(public_key), "--json"] + (["--quiet"] if quiet else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"train-local exited {proc.returncode} without a result") from None
    if proc.returncode != 0 or not result.get("ok", False):
        raise RuntimeError(f"train-local failed: {result.get('error', f'exit {proc.returncode}')}")
    return result


def _speech_file(corpus, test_speakers, path: Path, pause: float = 0.5) -> List[Dict]:
    """Write a few held-out utterances of different emotions, ``pause`` s apart, as one 16 kHz wav (what a
    microphone would hear); returns what is where in it."""
    import numpy as np
    import soundfile as sf

    from .audio import load_audio

    pool = [u for u in corpus.utterances if u.speaker in test_speakers] or list(corpus.utterances)
    wanted = [c for c in LISTEN_CLASSES if any(u.label == c for u in pool)]
    wanted += [c for c in dict.fromkeys(u.label for u in pool) if c not in wanted]
    parts, segments, t = [], [], 0.0
    for label in wanted[:3]:
        u = next(u for u in pool if u.label == label)
        x = load_audio(u.path, 16000).samples
        if parts:
            parts.append(np.zeros(int(pause * 16000), np.float32))
            t += pause
        parts.append(x)
        segments.append({"label": label, "start": round(t, 2), "end": round(t + len(x) / 16000, 2),
                         "file": os.path.basename(u.path), "speaker": u.speaker})
        t += len(x) / 16000
    sf.write(str(path), np.concatenate(parts), 16000, subtype="PCM_16")
    return segments


def _truth_at(segments: List[Dict], t0: float, t1: float) -> str:
    """The emotion spoken longest inside the window [t0, t1) (what a listener would say it heard)."""
    best, label = 0.0, "-"
    for s in segments:
        overlap = min(t1, s["end"]) - max(t0, s["start"])
        if overlap > best:
            best, label = overlap, s["label"]
    return label


def run_demo(workdir=None, ipc: int = 10, quiet: bool = False, iterations: Optional[int] = None,
             as_json: bool = False, params: Optional[Dict] = None) -> Dict:
    """Run the demo pipeline in ``workdir`` (default: a fresh temp folder) and return its numbers.
    Step messages go to stdout (stderr with ``as_json``; none when ``quiet``)."""
    from .corpora.detect import open_corpus
    from .corpora.report import corpus_info
    from .evaluate import evaluate
    from .listen_cli import format_result
    from .packer import pack
    from .signing import keygen
    from .stream import listen

    t0 = time.perf_counter()
    say = _Say(quiet, as_json)
    work = Path(workdir).expanduser() if workdir else Path(tempfile.mkdtemp(prefix="edge-ser-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    out: Dict = {"ok": True, "workdir": str(work)}
    say(f"edge-ser demo: server -> pack -> device -> live emotion, {DEMO_MINUTES}; files go to {work}")

    say.step("1/6 corpus: the built-in demo corpus (synthetic speech: shows the plumbing, not accuracy)")
    info = corpus_info("demo")
    out["corpus"] = {k: info[k] for k in ("speakers", "classes", "files", "hours") if k in info}
    say.took(f"{info['files']} files, {info['speakers']} speakers, {info['hours'] * 60:.0f} min of audio, "
             f"classes {', '.join(info['classes'])}")

    say.step("2/6 server: make a key pair, distil the corpus into a signed pack (fixed-init at demo size)")
    keys = keygen(str(work / "keys"), force=True)
    pack_path = work / "demo.pack"
    from .distill import preset

    size = preset(DEMO_PRESET)
    packed = pack("demo", str(pack_path), ipc=ipc, key=keys["private_key"], method=size["method"],
                  iterations=size["iterations"] if iterations is None else iterations, progress=not quiet,
                  params=size["params"] if params is None else dict(params), threads=1)
    out["pack"] = {k: packed.get(k) for k in ("pack_id", "bytes", "corpus_bytes", "method", "ipc", "samples",
                                              "test_speakers", "distill_seconds")}
    say.took(f"{packed['bytes'] / 1024:.0f} KiB pack: {packed['samples']} log-Mel samples + θ0, "
             f"from {packed['corpus_bytes'] / 1e6:.1f} MB of audio")

    say.step("3/6 delivery: server -> MQTT broker -> device agent (verifies the signature, stores atomically)")
    delivered = _mqtt_roundtrip(pack_path, work, Path(keys["public_key"]), say)
    device_pack = pack_path
    if delivered:
        stored = delivered["received"].get("pack_path") or delivered["received"].get("path")
        if stored:
            device_pack = Path(stored)
        out["mqtt"] = {"chunks": delivered["published"].get("chunks"), "stored": str(device_pack)}
        say.took(f"{delivered['published'].get('chunks')} chunk(s) delivered and verified: {device_pack}")

    say.step("4/6 device: train-local from θ0 on the pack (one thread), export ONNX and TFLite int8")
    model_dir = work / "model"
    trained = _train_on_device(device_pack, model_dir, keys["public_key"], quiet)
    out["train_local"] = {k: trained.get(k) for k in ("wall_seconds", "train_seconds", "export_seconds",
                                                      "peak_rss_mb", "process_peak_rss_mb", "converter_peak_rss_mb",
                                                      "golden", "files", "sizes", "warnings")}
    golden = trained.get("golden") or {}
    say.took(f"trained in {trained['train_seconds']:.0f} s, peak RSS {trained['peak_rss_mb']:.0f} MB; golden "
             f"check {'passed' if golden.get('passed') else 'FAILED'}; files: {', '.join(sorted(trained['files']))}")

    say.step("5/6 evaluate the exported int8 model on the held-out demo speakers")
    ev = evaluate(str(model_dir), "demo")
    out["evaluate"] = {k: ev.get(k) for k in ("uar", "wa", "f1", "runtime", "n", "speakers", "classes")}
    say.took(f"UAR {ev['uar']:.2f} (chance {1 / len(ev['classes']):.2f}) on {ev['n']} utterances of speakers "
             f"{', '.join(map(str, ev['speakers']))}")

    say.step("6/6 listen: stream three held-out utterances (0.5 s pauses) through the live path")
    corpus = open_corpus("demo")
    speech = work / "speech.wav"
    segments = _speech_file(corpus, set(packed.get("test_speakers") or []), speech)
    say("    " + ", then ".join(f"{s['label']} ({s['start']:.1f}-{s['end']:.1f} s)" for s in segments))
    say(f"    {'window':>15}  {'emotion':<10} {'top probabilities':<40} {'latency':>9}   heard")
    results = []
    with listen(str(model_dir), file=str(speech), hop=0.5) as stream:
        for r in stream:
            results.append(r)
            say(f"    {format_result(r)}   {_truth_at(segments, r.t_start, r.t_end)}")
    spoken = [r for r in results if not r.silent]
    agree = sum(r.emotion == _truth_at(segments, r.t_start, r.t_end) for r in spoken)
    out["listen"] = {"file": str(speech), "segments": segments, "hops": len(results),
                     "agree": agree, "emotions": [r.emotion for r in spoken],
                     "latency_ms_median": round(sorted(r.latency_ms for r in spoken)[len(spoken) // 2], 2)
                     if spoken else None}
    say.took(f"{len(results)} hops; {agree} of {len(spoken)} match the emotion spoken longest in their window")
    for f in model_dir.iterdir():            # what a user copies to a device must be readable by its service
        out.setdefault("modes", {})[f.name] = oct(f.stat().st_mode & 0o777)
    from .memory import peak_rss_mb

    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def format_demo_summary(d: Dict) -> str:
    """The demo's result as a short table: each number with what it means."""
    p, t, e, li = d.get("pack", {}), d.get("train_local", {}), d.get("evaluate", {}), d.get("listen", {})
    g = t.get("golden") or {}
    sizes = t.get("sizes") or {}
    n_cls = len(e.get("classes") or []) or 1
    corpus_mb = (p.get("corpus_bytes") or 0) / 1e6
    rows = [
        ("pack", f"{(p.get('bytes') or 0) / 1024:.0f} KiB",
         f"what devices receive: {p.get('samples')} log-Mel samples + θ0, from {corpus_mb:.0f} MB of audio"),
        ("distillation", f"{p.get('distill_seconds', 0):.0f} s", "server time to make the samples (demo size)"),
        ("device training", f"{t.get('train_seconds', 0):.0f} s", "θ0 trained on the pack, one thread"),
        ("device peak RSS", f"{t.get('peak_rss_mb', 0):.0f} MB", "train-local's largest process, export included"
         + (f" (training {t['process_peak_rss_mb']:.0f} MB, TFLite converter {t['converter_peak_rss_mb']:.0f} MB)"
            if t.get("converter_peak_rss_mb") and t.get("process_peak_rss_mb") else "")),
        ("golden check", "passed" if g.get("passed") else "FAILED",
         f"device model matches the server's reference (max logit diff {g.get('max_abs_deviation', 0.0):.2g})"),
        ("held-out UAR", f"{e.get('uar', 0):.2f}",
         f"mean per-class recall on speakers never distilled (chance {1 / n_cls:.2f})"),
        ("model files", f"{len([k for k in sizes if k != 'torch'])} files",
         "what a device runs, no torch needed: " + ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in sorted(sizes.items())
                                                             if k != "torch")),
        ("listen", f"{li.get('agree', 0)}/{len([x for x in li.get('emotions', [])])} hops",
         f"windows whose emotion matches the one spoken; {li.get('latency_ms_median') or 0:.0f} ms per hop"),
        ("demo peak RSS", f"{d.get('peak_rss_mb', 0):.0f} MB", "this process (corpus, distillation, evaluate, listen)"),
        ("total", f"{d.get('seconds', 0) / 60:.1f} min", f"everything is in {d.get('workdir')}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = ["", "demo summary (synthetic corpus: the numbers show the pipeline works, not SER accuracy)"]
    lines += [f"  {a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.append("next: edge-ser listen " + os.path.join(d.get("workdir", "."), "model") + "   (your microphone)")
    return "\n".join(lines)
