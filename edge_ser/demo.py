"""``edge-ser demo``: the whole pipeline end to end on the built-in demo corpus, offline, in minutes.

corpus info -> key pair -> distil + sign a pack -> (MQTT delivery when mosquitto is installed) ->
train-local from the fixed initialisation -> ONNX/TFLite export -> evaluate on held-out speakers ->
stream a file through the live path. The demo corpus is synthetic: its numbers show the plumbing works,
not how well SER works (see benchmarks/RESULTS.md for real corpora).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mqtt_roundtrip(pack_path: Path, workdir: Path, public_key: Path, quiet: bool) -> Optional[Dict]:
    """Publish the pack through a throw-away local mosquitto and receive it with the agent."""
    broker_bin = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not broker_bin:
        _say("   (mosquitto not installed: skipping the MQTT hop; apt-get install mosquitto)", quiet)
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


#: distillation iterations for the demo: enough to show the default method at work in a few minutes (each of its
#: evaluations trains θ0 for 150 epochs, and the schedule choice 12 runs, so these, not the iterations, set its pace)
DEMO_ITERATIONS = 10


def run_demo(workdir=None, ipc: int = 10, quiet: bool = False, iterations: int = DEMO_ITERATIONS) -> Dict:
    """Run the demo pipeline in ``workdir`` (default: a fresh temp folder) and return its numbers."""
    from .packer import pack
    from .corpora.report import corpus_info
    from .evaluate import evaluate
    from .local import train_local
    from .signing import keygen
    from .stream import listen

    t0 = time.perf_counter()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edge-ser-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    out: Dict = {"workdir": str(work)}

    _say("1/6 demo corpus (synthetic speech; a demo, not an accuracy claim)", quiet)
    info = corpus_info("demo")
    out["corpus"] = {k: info[k] for k in ("speakers", "classes", "files", "hours") if k in info}
    _say(f"    {info['files']} files, {info['speakers']} speakers, classes {', '.join(info['classes'])}", quiet)

    _say("2/6 server: key pair + distil the corpus into a signed pack", quiet)
    keys = keygen(str(work / "keys"), force=True)
    pack_path = work / "demo.pack"
    packed = pack("demo", str(pack_path), ipc=ipc, key=keys["private_key"], iterations=iterations,
                  progress=not quiet)
    out["pack"] = {k: packed.get(k) for k in ("pack_id", "bytes", "corpus_bytes", "method", "ipc", "test_speakers")}
    _say(f"    {packed.get('bytes', 0) / 1024:.0f} KiB pack ({packed.get('method')}, ipc={ipc}) from "
         f"{packed.get('corpus_bytes', 0) / 1e6:.1f} MB of audio", quiet)

    _say("3/6 delivery: server -> MQTT broker -> device agent", quiet)
    delivered = _mqtt_roundtrip(pack_path, work, Path(keys["public_key"]), quiet)
    device_pack = pack_path
    if delivered:
        stored = delivered["received"].get("pack_path") or delivered["received"].get("path")
        if stored:
            device_pack = Path(stored)
        out["mqtt"] = {"chunks": delivered["published"].get("chunks"), "stored": str(device_pack)}
        _say(f"    delivered and verified: {device_pack}", quiet)

    _say("4/6 device: train-local from the fixed initialisation, export ONNX/TFLite", quiet)
    model_dir = work / "model"
    trained = train_local(str(device_pack), str(model_dir), public_key=keys["public_key"], progress=not quiet)
    out["train_local"] = {k: trained.get(k) for k in ("wall_seconds", "train_seconds", "peak_rss_mb", "golden", "files")}
    _say(f"    trained in {trained['train_seconds']:.1f} s ({trained['wall_seconds']:.1f} s with checks and export), "
         f"peak RSS {trained['peak_rss_mb']:.0f} MB", quiet)

    _say("5/6 evaluate on the held-out demo speakers", quiet)
    ev = evaluate(str(model_dir), "demo")
    out["evaluate"] = {k: ev.get(k) for k in ("uar", "wa", "f1", "runtime", "n")}
    _say(f"    UAR {ev['uar']:.3f}  WA {ev['wa']:.3f}  ({ev.get('runtime')}, {ev.get('n')} utterances)", quiet)

    _say("6/6 stream a demo file through the live path", quiet)
    from .corpora.detect import open_corpus

    corpus = open_corpus("demo")
    test_speakers = set(packed.get("test_speakers") or [])
    sample = next((u for u in corpus.utterances if u.speaker in test_speakers), corpus.utterances[0])
    results = list(listen(str(model_dir), file=sample.path, hop=0.5))
    spoken = [r for r in results if not r.silent]
    if spoken:
        _say(f"    {Path(sample.path).name} (true: {sample.label}) -> {spoken[-1].emotion}", quiet)
    out["listen"] = {"file": sample.path, "label": sample.label, "hops": len(results),
                     "emotions": [r.emotion for r in spoken]}
    out["seconds"] = time.perf_counter() - t0
    _say(f"done in {out['seconds']:.0f} s; everything is in {work}", quiet)
    return out
