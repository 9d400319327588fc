"""Benchmark `stream`: live-inference latency (capture end -> result, excluding the window wait) and CPU
use at real-time pace on one thread, with an ONNX int8 model, over the virtual PortAudio device and a
--realtime file.

    PYTHONPATH=. python benchmarks/stream.py --quick          # < 1 min, for CI
    PYTHONPATH=. python benchmarks/stream.py --seconds 60 --model model/   # a train-local model folder

Without --model it exports the default ConvNet (trained a few epochs on RAVDESS actors 01-18 when the
corpus is there; latency does not depend on the weights) to ONNX fp32 + int8 in a temp folder. Audio:
RAVDESS test-actor (19-24) utterances joined with 0.5 s pauses at 48 kHz int16, else a synthetic signal.
Prints a table and machine info; writes JSON (--out).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
RAVDESS = REPO.parent / "shared" / "corpora" / "ravdess"
RATE = 48000


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def make_audio(seconds: float, folder: Path) -> tuple:
    """A 48 kHz int16 mono wav of ~``seconds``: RAVDESS test actors' speech with pauses, or synthetic."""
    from edge_ser.audio import load_audio, resample

    files = sorted(RAVDESS.glob("Actor_2[0-4]/*.flac")) + sorted(RAVDESS.glob("Actor_19/*.flac"))
    parts, total, source = [], 0.0, "synthetic (tones + noise bursts)"
    if files:
        source = "RAVDESS actors 19-24 (utterances joined with 0.5 s pauses)"
        rng = np.random.default_rng(0)
        for f in rng.permutation(files):
            x = load_audio(f).samples
            parts += [x, np.zeros(8000, np.float32)]
            total += len(x) / 16000 + 0.5
            if total >= seconds:
                break
        wave = resample(np.concatenate(parts), 16000, RATE)
    else:
        t = np.arange(int(seconds * RATE)) / RATE
        env = (np.sin(2 * np.pi * 0.3 * t) > -0.3).astype(np.float32)
        wave = (0.2 * np.sin(2 * np.pi * (200 + 100 * np.sin(2 * np.pi * 0.5 * t)) * t)
                + 0.05 * np.random.default_rng(0).standard_normal(len(t))) * env
    wave = wave[: int(seconds * RATE)]
    pcm = np.clip(np.round(wave / max(1e-9, np.abs(wave).max()) * 0.7 * 32767), -32768, 32767).astype(np.int16)
    import soundfile as sf

    path = folder / "stream_bench.wav"
    sf.write(path, pcm, RATE, subtype="PCM_16")
    return path, pcm, source


def make_model(folder: Path, train_epochs: int) -> tuple:
    """Default ConvNet -> model.onnx + model.int8.onnx (+ model.json) in ``folder``."""
    import torch

    from edge_ser.config import FeatureConfig, TrainConfig, default_model_config
    from edge_ser.export import export_onnx, quantize_int8
    from edge_ser.models import build_model, input_stats, set_input_stats
    from edge_ser.runtime import model_metadata

    torch.set_num_threads(1)
    cfg = FeatureConfig()
    note = "random init (no corpus)"
    classes = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    X = y = None
    if (RAVDESS / "Actor_01").is_dir():
        from edge_ser.corpora import load_features

        fs, _ = load_features(RAVDESS)
        train, _test = fs.split_speakers([str(i) for i in range(19, 25)])
        X, y, classes = train.X, train.y, tuple(fs.classes)
        note = "random init, input stats from RAVDESS 01-18"
    mcfg = default_model_config(len(classes), cfg)
    model = build_model(mcfg, seed=0)
    if X is not None:
        set_input_stats(model, *input_stats(X))
        if train_epochs > 0:
            from edge_ser.train import fit

            fit(model, X, y, TrainConfig(epochs=train_epochs, threads=1), num_classes=len(classes))
            note = f"trained {train_epochs} epochs on RAVDESS actors 01-18 (not a tuned model)"
        calib = X[np.random.default_rng(0).choice(len(X), 64, replace=False)]
    else:
        calib = np.random.default_rng(0).standard_normal((16, cfg.n_mels, cfg.num_frames)).astype(np.float32) - 8
    model.eval()
    meta = model_metadata("bench-stream", classes, cfg, mcfg)
    export_onnx(model, folder / "model.onnx", meta, cfg.n_mels, cfg.num_frames)
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", calib, meta)
    (folder / "model.json").write_text(json.dumps({"classes": list(classes), "feature_config": cfg.to_dict(),
                                                   "model_config": mcfg.to_dict(), "note": note}))
    return folder, note


def run_once(model, mode: str, wav: Path, pcm: np.ndarray, seconds: float, hop: float) -> dict:
    """Stream for ``seconds`` at real-time pace; latency and process CPU / wall over the stream."""
    from edge_ser.runtime import load_runtime
    from edge_ser.stream import listen

    runner = load_runtime(model, "onnx-int8", threads=1)
    ctx = None
    if mode == "virtual-device":
        import alsa_virtual

        ctx = alsa_virtual.VirtualCapture(pcm, rate=RATE).__enter__()
        stream = listen(runner, device=ctx.name, hop=hop, duration=seconds, samplerate=RATE)
    else:
        stream = listen(runner, file=wav, hop=hop, realtime=True, duration=seconds)
    lat, silent, emotions = [], 0, {}
    try:
        c0, w0 = time.process_time(), time.monotonic()
        for r in stream:
            if r.silent:
                silent += 1
                continue
            lat.append(r.latency_ms)
            emotions[r.emotion] = emotions.get(r.emotion, 0) + 1
        cpu, wall = time.process_time() - c0, time.monotonic() - w0
        stats = dict(stream.stats)
    finally:
        stream.close()
        if ctx is not None:
            ctx.__exit__(None, None, None)
    lat = np.asarray(lat)
    return {"mode": mode, "runtime": runner.name, "audio_seconds": seconds, "wall_seconds": round(wall, 3),
            "hops": stats["hops"], "silent_hops": silent, "overflows": stats["overflows"],
            "dropped_samples": stats["dropped_samples"], "device_rate": stats["device_rate"],
            "latency_ms_p50": float(np.median(lat)) if len(lat) else None,
            "latency_ms_p95": float(np.percentile(lat, 95)) if len(lat) else None,
            "latency_ms_max": float(lat.max()) if len(lat) else None,
            "cpu_percent_of_one_core": round(100.0 * cpu / wall, 2), "emotions": emotions}


def compute_only(model, wav: Path, repeats: int = 50) -> dict:
    """Per-window compute (resampled window -> log-Mel -> int8 ONNX), median over ``repeats`` after warm-up."""
    from edge_ser.audio import load_audio
    from edge_ser.features import extract
    from edge_ser.runtime import load_runtime

    runner = load_runtime(model, "onnx-int8", threads=1)
    cfg = runner.feature_config
    x = load_audio(wav).samples[: cfg.num_samples]
    fe, inf = [], []
    for i in range(repeats + 5):
        t0 = time.perf_counter()
        X = extract(x, cfg)[None]
        t1 = time.perf_counter()
        runner.predict_logits(X)
        t2 = time.perf_counter()
        if i >= 5:
            fe.append(t1 - t0)
            inf.append(t2 - t1)
    return {"logmel_ms_p50": 1e3 * float(np.median(fe)), "onnx_int8_ms_p50": 1e3 * float(np.median(inf)),
            "model_int8_bytes": Path(runner.path).stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 1 min): 12 s of audio per mode")
    ap.add_argument("--seconds", type=float, default=60.0, help="audio seconds streamed per mode")
    ap.add_argument("--hop", type=float, default=0.5)
    ap.add_argument("--model", help="model folder (default: export the default ConvNet into a temp folder)")
    ap.add_argument("--train-epochs", type=int, default=6, help="epochs for the default model (0: untrained)")
    ap.add_argument("--modes", default="virtual-device,realtime-file")
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode (the summary gives mean +- std)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stream.json"))
    a = ap.parse_args(argv)
    seconds = 12.0 if a.quick else a.seconds
    tmp = Path(tempfile.mkdtemp(prefix="edge-ser-bench-stream-"))
    t_setup = time.monotonic()
    if a.model:
        model, note = Path(a.model), "given"
        if (model / "model.json").exists():
            note = json.loads((model / "model.json").read_text()).get("note", note)
    else:
        model, note = make_model(tmp, 0 if a.quick else a.train_epochs)
    wav, pcm, source = make_audio(seconds + 1.0, tmp)
    setup_s = time.monotonic() - t_setup
    rows, skipped = [], {}
    for mode in [m.strip() for m in a.modes.split(",") if m.strip()]:
        if mode == "virtual-device":
            import alsa_virtual

            why = alsa_virtual.missing()
            if why:
                skipped[mode] = why
                continue
        for rep in range(a.repeats):
            rows.append(dict(run_once(model, mode, wav, pcm, seconds, a.hop), repeat=rep))
    comp = compute_only(model, wav)
    report = {"benchmark": "stream", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/stream.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "model": str(model), "model_note": note, "audio": source,
              "hop_seconds": a.hop, "window_seconds": 3.0, "threads": 1, "setup_seconds": round(setup_s, 1),
              "compute_per_window": comp, "runs": rows, "skipped": skipped}
    print(f"stream benchmark  {report['date']}  {report['machine']['cpu']} ({report['machine']['cpus']} cores), "
          f"1 thread, ONNX int8 ({comp['model_int8_bytes'] / 1024:.0f} KB), window 3 s, hop {a.hop:g} s")
    print(f"audio: {source}; model: {note}")
    head = f"{'mode':<16}{'audio s':>8}{'hops':>6}{'silent':>7}{'ovfl':>6}{'lat p50 ms':>12}{'lat p95 ms':>12}" \
           f"{'CPU % core':>12}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['mode']:<16}{r['audio_seconds']:>8.0f}{r['hops']:>6}{r['silent_hops']:>7}{r['overflows']:>6}"
              f"{r['latency_ms_p50']:>12.1f}{r['latency_ms_p95']:>12.1f}{r['cpu_percent_of_one_core']:>12.1f}")
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        summary[mode] = {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs])),
                             "n": len(rs)}
                         for k in ("latency_ms_p50", "latency_ms_p95", "cpu_percent_of_one_core")}
        if len(rs) > 1:
            s = summary[mode]
            print(f"{mode:<16} mean +- std over {len(rs)} runs: p50 {s['latency_ms_p50']['mean']:.1f} +- "
                  f"{s['latency_ms_p50']['std']:.1f} ms, p95 {s['latency_ms_p95']['mean']:.1f} +- "
                  f"{s['latency_ms_p95']['std']:.1f} ms, CPU {s['cpu_percent_of_one_core']['mean']:.1f} +- "
                  f"{s['cpu_percent_of_one_core']['std']:.1f} %")
    report["summary"] = summary
    for m, why in skipped.items():
        print(f"{m:<16} skipped: {why}")
    print(f"compute per window (median of 50): log-Mel {comp['logmel_ms_p50']:.2f} ms, "
          f"ONNX int8 {comp['onnx_int8_ms_p50']:.2f} ms")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {a.out}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
