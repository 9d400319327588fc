"""Benchmark `pack`: pack size vs corpus size and the server's cost to make one (distillation seconds,
total seconds, whole-process peak RSS), for each distillation method × IPC.

    PYTHONPATH=. python -m benchmarks.pack --quick                     # demo corpus, random, IPC 2: < 1 min
    PYTHONPATH=. python -m benchmarks.pack --corpus ../shared/corpora/ravdess --test-speakers 19-24 \\
        --methods random,herding,fixed-init --ipc 1,10,50

Each ``edge_ser.packer.pack`` call runs in a spawned child (``benchmarks._common.run_in_child``); its peak
RSS is the whole child process (torch included), read as VmHWM in the child (``_common.child_peak_rss_mb``). By
default every child gets a *cold* distillation cache (a temp ``EDGE_SER_CACHE`` sharing only the
feature cache and the demo corpus), because fixed-init / MTT reuse cached expert trajectories and
resume finished checkpoints: a warm cache would time a lookup, not a distillation (``--warm-cache``
measures exactly that). The member breakdown comes from ``edge_ser.inspection.inspect_pack`` (raw bytes)
plus the ZIP's stored (deflated) sizes. Also home of the pack-making helpers ``device`` and
``inference`` use.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Optional

from ._common import print_machine_info, run_in_child, write_json

HERE = Path(__file__).resolve().parent
RAVDESS = HERE.parent.parent / "shared" / "corpora" / "ravdess"


def default_corpus() -> str:
    """RAVDESS when it is there, else the built-in synthetic demo corpus."""
    return str(RAVDESS) if (RAVDESS / "Actor_01").is_dir() else "demo"


def test_speakers_for(corpus: str, given: Optional[str] = None) -> Optional[str]:
    """``given``, else "19-24" for RAVDESS, else None (edge_ser's default: the last quarter of speakers)."""
    if given:
        return given
    return "19-24" if corpus != "demo" and Path(corpus).resolve() == RAVDESS.resolve() else None


def make_keys(folder) -> Dict[str, str]:
    """A fresh Ed25519 key pair in ``folder``: {"private_key", "public_key", "key_id", ...}."""
    from edge_ser.signing import keygen

    return keygen(str(folder), force=True)


def cold_cache(folder) -> Path:
    """A cache folder sharing the real cache's features and demo corpus but no distillation state."""
    from edge_ser.corpora.extract import cache_dir

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    real = cache_dir()
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name not in ("distill", "experts") and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return folder


def pack_job(corpus: str, output: str, method: Optional[str], ipc: int, test_speakers: Optional[str], key: str,
             threads: int = 1, seed: int = 0, iterations: Optional[int] = None, cache: Optional[str] = None) -> Dict:
    """Child-process body: ``edge_ser.packer.pack`` with ``threads`` torch threads (``cache``: EDGE_SER_CACHE)."""
    if cache:
        os.environ["EDGE_SER_CACHE"] = str(cache)
    import torch

    from edge_ser.packer import pack

    torch.set_num_threads(int(threads))
    return pack(corpus, output, method=method, ipc=ipc, test_speakers=test_speakers, seed=seed, key=key,
                iterations=iterations, progress=False)


def member_breakdown(path, public_key=None) -> Dict[str, Dict[str, int]]:
    """Pack members grouped (synthetic X, labels, golden, θ0, ...): raw bytes, stored bytes, member count."""
    from edge_ser.inspection import inspect_pack

    raw = {name: m["bytes"] for name, m in inspect_pack(path, public_key=public_key)["members"].items()}
    with zipfile.ZipFile(path) as zf:
        stored = {i.filename: (i.compress_size, i.file_size) for i in zf.infolist()}
    groups: Dict[str, Dict[str, int]] = {}
    for name, (comp, size) in sorted(stored.items()):
        group = {"data/X.npy": "synthetic X", "data/y.npy": "labels"}.get(name) or name.split("/")[0]
        g = groups.setdefault(group.replace(".json", ""), {"bytes": 0, "stored_bytes": 0, "members": 0})
        g["bytes"] += int(raw.get(name, size))
        g["stored_bytes"] += int(comp)
        g["members"] += 1
    return groups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="corpus path or 'demo' (default: RAVDESS if present, else demo)")
    ap.add_argument("--test-speakers", default=None, help="held out of distillation (default 19-24 on RAVDESS)")
    ap.add_argument("--methods", default=None, help="comma list (default random,herding,fixed-init)")
    ap.add_argument("--ipc", default=None, help="comma list of samples per class (default 10)")
    ap.add_argument("--iterations", type=int, default=None, help="override the methods' iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in the child (default 2; fixed-init/mtt pick their own, see RESULTS.md)")
    ap.add_argument("--warm-cache", action="store_true", help="use the real cache (experts, resumable checkpoints)")
    ap.add_argument("--quick", action="store_true", help="demo corpus, method random, IPC 2, 1 thread (< 1 min)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/pack[.quick].json)")
    a = ap.parse_args(argv)

    corpus = a.corpus or ("demo" if a.quick else default_corpus())
    methods = [m.strip() for m in (a.methods or ("random" if a.quick else "random,herding,fixed-init")).split(",")
               if m.strip()]
    ipcs = [int(v) for v in (a.ipc or ("2" if a.quick else "10")).split(",")]
    threads = a.threads or (1 if a.quick else 2)
    test_speakers = test_speakers_for(corpus, a.test_speakers)
    out = a.out or str(HERE / "results" / ("pack.quick.json" if a.quick else "pack.json"))
    info = print_machine_info()
    print(f"corpus {corpus}, test speakers {test_speakers or 'default (last quarter)'}, threads {threads}, "
          f"{'warm' if a.warm_cache else 'cold'} distillation cache")

    rows = []
    report = {"benchmark": "pack", "machine": info, "corpus": corpus, "test_speakers": test_speakers,
              "threads": threads, "cache": "warm" if a.warm_cache else "cold", "quick": a.quick, "argv": sys.argv,
              "rows": rows}
    with tempfile.TemporaryDirectory(prefix="edge-ser-bench-pack-") as tmp:
        keys = make_keys(Path(tmp) / "keys")
        for method in methods:
            for ipc in ipcs:
                path = Path(tmp) / f"{method}-{ipc}.pack"
                cache = None if a.warm_cache else str(cold_cache(Path(tmp) / f"cache-{method}-{ipc}"))
                res, rss, secs = run_in_child(pack_job, corpus, str(path), method, ipc, test_speakers,
                                              keys["private_key"], threads, a.seed, a.iterations, cache)
                row = {"method": res["method"], "ipc": ipc, "samples": res["samples"], "bytes": res["bytes"],
                       "corpus_bytes": res["corpus_bytes"], "ratio": res["ratio"],
                       "distill_seconds": res["distill_seconds"], "pack_seconds": res["seconds"],
                       "child_seconds": round(secs, 2), "peak_rss_mb": round(rss, 1),
                       "bytes_per_sample": round(res["bytes"] / max(1, res["samples"])),
                       "members": member_breakdown(path, keys["public_key"])}
                rows.append(row)
                print(f"{method:<12} ipc {ipc:>3}: {row['samples']:>4} samples, pack {row['bytes'] / 1024:8.0f} KB "
                      f"(ratio {row['ratio']}), distill {row['distill_seconds']:.1f} s, "
                      f"total {row['pack_seconds']:.1f} s, peak RSS {rss:.0f} MB", flush=True)
                write_json(out, report)

    print(f"\n{'method':<12}{'IPC':>5}{'samples':>9}{'pack KB':>10}{'corpus MB':>11}{'ratio':>9}{'distill s':>11}"
          f"{'total s':>9}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['method']:<12}{r['ipc']:>5}{r['samples']:>9}{r['bytes'] / 1024:>10.0f}"
              f"{r['corpus_bytes'] / 1024 ** 2:>11.1f}{r['ratio'] or 0:>9.4f}{r['distill_seconds']:>11.1f}"
              f"{r['pack_seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}")
    if rows:
        last = rows[-1]
        print(f"\nmembers of the {last['method']} IPC {last['ipc']} pack (raw / stored KB):")
        for group, m in last["members"].items():
            print(f"  {group:<14}{m['bytes'] / 1024:>10.1f}{m['stored_bytes'] / 1024:>10.1f}"
                  f"   ({m['members']} members)")
    print(f"wrote {write_json(out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
