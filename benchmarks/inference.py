"""Benchmark `inference`: per-window latency (one 3 s log-Mel window, one thread), file size, peak RSS and
accuracy on held-out speakers of each runtime (torch, ONNX fp32, ONNX int8, TFLite int8): the int8 cost.

    PYTHONPATH=. python -m benchmarks.inference --quick                # demo corpus, random IPC 2: < 90 s
    PYTHONPATH=. python -m benchmarks.inference                        # RAVDESS pack (random, IPC 10), 200 runs
    PYTHONPATH=. python -m benchmarks.inference --model model/ --corpus ../shared/corpora/ravdess

Without --model it makes a signed pack (``--method``, default random for speed, ``--ipc`` 10; test
speakers 19-24 on RAVDESS) and a model folder with ``train_local`` (export on) in a temp folder. Each
runtime is loaded with ``load_runtime(folder, runtime=name, threads=1)`` and timed on single windows
(``predict_logits(X[i:i+1])``, --warmup then --runs calls, windows from the test speakers): p50 / p95
ms. UAR / WA come from the whole test set; parity is the argmax agreement and max logit difference
against torch. Peak RSS per runtime is a spawned child's whole process (load + --rss-runs windows;
VmHWM, see ``benchmarks._common.child_peak_rss_mb``).
A runtime whose package or file is missing is skipped with a note.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Optional  # noqa: E402

import numpy as np  # noqa: E402

from ._common import print_machine_info, run_in_child, write_json  # noqa: E402
from .device import train_job  # noqa: E402
from .pack import HERE, default_corpus, make_keys, pack_job, test_speakers_for  # noqa: E402

RUNTIMES = ("torch", "onnx", "onnx-int8", "tflite")


def rss_job(folder: str, runtime: str, X: np.ndarray, runs: int) -> Dict:
    """Child-process body: load one runtime and run ``runs`` single windows; what got imported."""
    from edge_ser.runtime import load_runtime

    t0 = time.perf_counter()
    runner = load_runtime(folder, runtime=runtime, threads=1)
    load_seconds = time.perf_counter() - t0
    for i in range(runs):
        runner.predict_logits(X[i % len(X)][None])
    return {"load_seconds": round(load_seconds, 3), "torch_imported": "torch" in sys.modules,
            "tensorflow_imported": "tensorflow" in sys.modules}


def make_model(folder: Path, corpus: str, method: str, ipc: int, test_speakers: Optional[str]) -> Dict:
    """keys -> pack -> train_local (export on) into ``folder / "model"``; a summary of what was made."""
    keys = make_keys(folder / "keys")
    pack_path = str(folder / "bench.pack")
    made, _, pack_s = run_in_child(pack_job, corpus, pack_path, method, ipc, test_speakers, keys["private_key"], 1)
    res, _, train_s = run_in_child(train_job, pack_path, str(folder / "model"), None, 1, keys["public_key"], True)
    return {"corpus": corpus, "method": made["method"], "ipc": made["ipc"], "pack_bytes": made["bytes"],
            "samples": made["samples"], "pack_seconds": round(pack_s, 1), "train_local_seconds": round(train_s, 1),
            "golden_passed": res["golden"]["passed"], "warnings": res["warnings"]}


def held_out_windows(corpus: str, classes, held) -> tuple:
    """(X, y) of the held-out speakers, labels in the model's class order; the speakers used."""
    from edge_ser.corpora import load_features
    from edge_ser.data import default_test_speakers, parse_speakers

    fs, _ = load_features(corpus)
    held = parse_speakers(held) if isinstance(held, str) else list(held or default_test_speakers(fs.speaker_ids()))
    _, test = fs.split_speakers(held)
    missing = set(fs.classes) - set(classes)
    if missing:
        raise SystemExit(f"corpus classes {sorted(missing)} are not in the model's classes {list(classes)}")
    index = [list(classes).index(c) for c in fs.classes]
    return test.X, np.asarray(index)[test.y], test.speaker_ids()


def latency_ms(runner, X: np.ndarray, warmup: int, runs: int) -> np.ndarray:
    """Milliseconds of ``runs`` single-window ``predict_logits`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + runs):
        x = X[i % len(X): i % len(X) + 1]
        t0 = time.perf_counter()
        runner.predict_logits(x)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return np.asarray(times)


def bench_runtime(folder: Path, name: str, X, y, a, ref_logits: Optional[np.ndarray]) -> Dict:
    """One runtime: latency, accuracy, parity vs torch, file size and (in a child) peak RSS."""
    from edge_ser.metrics import scores
    from edge_ser.runtime import RUNTIME_FILES, RuntimeUnavailable, load_runtime

    path = folder / RUNTIME_FILES[name]
    row: Dict = {"runtime": name, "file": path.name}
    if not path.exists():
        return dict(row, skipped=f"{path.name} missing (export failed or was skipped)")
    try:
        runner = load_runtime(folder, runtime=name, threads=1)
    except RuntimeUnavailable as exc:
        return dict(row, skipped=str(exc))
    lat = latency_ms(runner, X, a.warmup, a.runs)
    logits = np.concatenate([runner.predict_logits(X[i: i + 16]) for i in range(0, len(X), 16)])
    s = scores(y, logits.argmax(1), len(runner.classes), runner.classes)
    row.update(bytes=path.stat().st_size, p50_ms=float(np.median(lat)), p95_ms=float(np.percentile(lat, 95)),
               mean_ms=float(lat.mean()), min_ms=float(lat.min()), runs=len(lat), uar=s["uar"], wa=s["wa"],
               f1=s["f1"], n=s["n"], logits=logits)
    if ref_logits is not None:
        row["argmax_agreement_vs_torch"] = float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))
        row["max_abs_logit_diff_vs_torch"] = float(np.abs(logits - ref_logits).max())
    del runner
    extra, rss, _ = run_in_child(rss_job, str(folder), name, np.ascontiguousarray(X[:8]), a.rss_runs)
    row.update(peak_rss_mb=round(rss, 1), **extra)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a train-local model folder (default: make one in a temp folder)")
    ap.add_argument("--corpus", default=None, help="source of test windows (default: RAVDESS if present, else demo)")
    ap.add_argument("--test-speakers", default=None,
                    help="default: the model's own test speakers (model.json), 19-24 on RAVDESS")
    ap.add_argument("--method", default="random", help="distillation method of the model made here")
    ap.add_argument("--ipc", type=int, default=None, help="samples per class of the model made here (default 10)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 20; 5 with --quick)")
    ap.add_argument("--runs", type=int, default=None, help="timed single-window calls (default 200; 30 with --quick)")
    ap.add_argument("--rss-runs", type=int, default=50, help="windows run in the peak-RSS child")
    ap.add_argument("--quick", action="store_true", help="demo corpus, random IPC 2, 30 runs (< 90 s)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/inference[.quick].json)")
    ap.add_argument("--plot", default=None, help="PNG of latency by runtime (default benchmarks/inference.png; "
                                                 "none with --quick unless given)")
    a = ap.parse_args(argv)
    runtimes = [r.strip() for r in a.runtimes.split(",") if r.strip()]
    if set(runtimes) - set(RUNTIMES):
        ap.error(f"unknown runtime(s) {', '.join(sorted(set(runtimes) - set(RUNTIMES)))}; choose from {RUNTIMES}")
    a.warmup = a.warmup if a.warmup is not None else (5 if a.quick else 20)
    a.runs = a.runs or (30 if a.quick else 200)
    corpus = a.corpus or ("demo" if a.quick else default_corpus())
    out = a.out or str(HERE / "results" / ("inference.quick.json" if a.quick else "inference.json"))

    import torch

    torch.set_num_threads(1)
    info = print_machine_info()
    report: Dict = {"benchmark": "inference", "machine": info, "corpus": corpus, "threads": 1, "quick": a.quick,
                    "warmup": a.warmup, "runs": a.runs, "argv": sys.argv}
    with tempfile.TemporaryDirectory(prefix="edge-ser-bench-inference-") as tmp:
        if a.model:
            folder = Path(a.model)
            report["model_source"] = {"given": str(folder)}
        else:
            folder = Path(tmp) / "model"
            report["model_source"] = make_model(Path(tmp), corpus, a.method, a.ipc or (2 if a.quick else 10),
                                                test_speakers_for(corpus, a.test_speakers))
            print(f"made a model: {report['model_source']}")
        model_info = json.loads((folder / "model.json").read_text())
        held = a.test_speakers or model_info.get("test_speakers") or test_speakers_for(corpus)
        X, y, held = held_out_windows(corpus, model_info["classes"], held)
        report.update(test_speakers=held, test_windows=int(len(X)), pack_id=model_info.get("pack_id"))
        print(f"test windows: {len(X)} from speakers {','.join(held)} of {corpus}")

        rows, ref = [], None
        for name in runtimes:
            row = bench_runtime(folder, name, X, y, a, ref)
            if name == "torch" and "logits" in row:
                ref = row["logits"]
            row.pop("logits", None)
            rows.append(row)
            print(f"{name:<10} " + (f"skipped: {row['skipped']}" if "skipped" in row else
                                   f"p50 {row['p50_ms']:.2f} ms, p95 {row['p95_ms']:.2f} ms, "
                                   f"UAR {100 * row['uar']:.1f} %, peak RSS {row['peak_rss_mb']:.0f} MB"), flush=True)

    by = {r["runtime"]: r for r in rows if "uar" in r}
    diffs = {}
    for int8, fp32 in (("onnx-int8", "onnx"), ("tflite", "onnx"), ("tflite", "torch")):
        if int8 in by and fp32 in by:
            diffs[f"{int8} - {fp32}"] = round(100 * (by[int8]["uar"] - by[fp32]["uar"]), 2)
    report.update(rows=rows, uar_diff_points=diffs)

    print(f"\n{'runtime':<11}{'file KB':>9}{'p50 ms':>9}{'p95 ms':>9}{'UAR %':>8}{'WA %':>8}{'agree':>8}"
          f"{'peak RSS MB':>13}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['runtime']:<11}skipped: {r['skipped']}")
            continue
        agree = r.get("argmax_agreement_vs_torch")
        print(f"{r['runtime']:<11}{r['bytes'] / 1024:>9.0f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{100 * r['uar']:>8.1f}"
              f"{100 * r['wa']:>8.1f}{'-' if agree is None else f'{100 * agree:.0f}%':>8}{r['peak_rss_mb']:>13.0f}")
    for k, v in diffs.items():
        print(f"UAR {k}: {v:+.2f} points")
    print(f"{len(X)} test windows; latency over {a.runs} single-window calls after {a.warmup} warm-up, 1 thread")
    print(f"wrote {write_json(out, report)}")
    plot_path = a.plot or (None if a.quick else str(HERE / "inference.png"))
    if plot_path and any("p50_ms" in r for r in rows):
        plot_latency(rows, Path(plot_path), f"{corpus if corpus == 'demo' else Path(corpus).name}: one 3 s window, "
                                            f"1 thread, {a.runs} calls")
        print(f"wrote {plot_path}")
    return 0


def plot_latency(rows, path: Path, title: str) -> None:
    """Bar chart: median latency per runtime with the p95 as a whisker, file size and UAR in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "p50_ms" in r]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(done))
    p50 = [r["p50_ms"] for r in done]
    ax.bar(x, p50, color="#4c72b0")
    ax.errorbar(x, p50, yerr=[[0] * len(done), [r["p95_ms"] - r["p50_ms"] for r in done]], fmt="none",
                ecolor="k", capsize=4)
    ax.set_xticks(list(x), [f"{r['runtime']}\n{r['bytes'] / 1024:.0f} KB, UAR {100 * r['uar']:.1f}%" for r in done],
                  fontsize=8)
    ax.set_ylabel("latency per window (ms): p50, whisker p95")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
