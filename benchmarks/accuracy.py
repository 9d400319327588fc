"""Benchmark `accuracy`: UAR on held-out speakers of every distillation method × IPC × init (θ0 / random),
plus the full-data baseline and random real subsets; distillation time and whole-process peak RSS.

    PYTHONPATH=. python -m benchmarks.accuracy --quick                       # < 3 min on an idle 2-core machine, for CI
    PYTHONPATH=. python -m benchmarks.accuracy --corpus ../shared/corpora/ravdess --test-speakers 19-24 \\
        --methods random,herding,kcenter,dm,dc --ipc 1,10 --seeds 3

Each distillation runs in a spawned child process (``benchmarks._common.run_in_child``), so its peak RSS
is the whole process (torch included). Each set is then trained with its own schedule from θ0
(``build_model(model_cfg, seed=0)`` + training input stats; the schedule's seed varied) and from random
inits (``seed=1000+s``), and scored on the test speakers (``edge_ser.distill.evaluate``). A method may
carry params: ``dm:theta0_prob=0.5`` (several joined with ``+``; a tuple with ``/``). Writes JSON (--out);
``--merge`` gathers runs into results/accuracy.json and redraws accuracy.png (accuracy vs IPC per method,
full-data line; ``--plot`` names another file, and makes a single run draw one too).
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ._common import print_machine_info, run_in_child, write_json

HERE = Path(__file__).resolve().parent
RAVDESS = HERE.parent.parent / "shared" / "corpora" / "ravdess"


def parse_method(spec: str) -> Tuple[str, Tuple[Tuple[str, object], ...]]:
    """``"dm:theta0_prob=0.5+batch_real=16"`` -> ("dm", (("theta0_prob", 0.5), ("batch_real", 16))).

    A value with ``/`` is a tuple (``--methods`` splits on ``,``): ``"fixed-init:epoch_grid=40/80"`` ->
    ("fixed-init", (("epoch_grid", (40, 80)),)).
    """
    def literal(text: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    name, _, rest = spec.partition(":")
    params = []
    for kv in filter(None, rest.split("+")):
        key, _, value = kv.partition("=")
        params.append((key.strip(), tuple(literal(v) for v in value.split("/")) if "/" in value else literal(value)))
    return name.strip(), tuple(params)


def load_split(corpus: str, test_speakers: Optional[str], quick: bool):
    """(train, test) FeatureSets, speaker-independent; ``quick`` keeps a small deterministic slice."""
    from edge_ser.corpora import load_features
    from edge_ser.data import default_test_speakers, parse_speakers

    fs, _ = load_features(corpus)
    held = parse_speakers(test_speakers) if test_speakers else default_test_speakers(fs.speaker_ids())
    train, test = fs.split_speakers(held)
    if quick:
        rng = np.random.default_rng(0)
        pick = lambda s, k: s.subset(np.sort(np.concatenate(  # noqa: E731
            [rng.choice(np.flatnonzero(s.y == c), size=min(k, int((s.y == c).sum())), replace=False)
             for c in range(s.num_classes) if (s.y == c).any()])))
        train, test = pick(train, 12), pick(test, 8)
    return train, test, held


def default_corpus() -> str:
    """RAVDESS when it is there, else the built-in synthetic demo corpus."""
    return str(RAVDESS) if (RAVDESS / "Actor_01").is_dir() else "demo"


def fixed_init_split(corpus: str, test_speakers: Optional[str], val_speakers: int):
    """What fixed-init sees of ``corpus``: (train, test, held, model_cfg, theta0, fit, val); ``val`` is the last
    ``val_speakers`` training speakers, ``fit`` the rest (what its experts train on)."""
    from edge_ser.distill.common import split_validation

    train, test, held = load_split(corpus, test_speakers, False)
    model_cfg, theta0 = make_theta0(train)
    fit, val = split_validation(train, None, val_speakers)
    return train, test, held, model_cfg, theta0, fit, val


def make_theta0(train, seed: int = 0, arch: str = "convnet"):
    from edge_ser.config import default_model_config
    from edge_ser.models import build_model, input_stats, set_input_stats, state_arrays

    model_cfg = default_model_config(train.num_classes, arch=arch)
    model = build_model(model_cfg, seed=seed)
    set_input_stats(model, *input_stats(train.X))
    return model_cfg, state_arrays(model)


def distill_job(corpus, test_speakers, quick, method, params, ipc, iterations, seed, threads, arch="convnet"):
    """Child-process body: load features, build θ0, distil; returns the SyntheticSet."""
    import torch

    from edge_ser.distill import DistillConfig, distill

    torch.set_num_threads(threads)
    train, _, _ = load_split(corpus, test_speakers, quick)
    model_cfg, theta0 = make_theta0(train, arch=arch)
    cfg = DistillConfig(method=method, ipc=ipc, iterations=iterations, seed=seed, params=params, threads=threads)
    return distill(train, cfg, model_cfg, theta0)


def fmt(res: Dict) -> str:
    return f"{100 * res['uar_mean']:5.1f} ± {100 * res['uar_std']:4.1f}"


def plot_points(rows: List[Dict], label: str, init: str) -> List[Tuple[int, float, float]]:
    """(IPC, UAR, ±) per IPC of ``label``: one set's mean ± std over evaluation seeds, or, where the set was
    distilled several times, the mean ± std over those distillations (the real uncertainty)."""
    pts = []
    for ipc in sorted({r["ipc"] for r in rows if r["label"] == label}):
        runs = [r[init] for r in rows if r["label"] == label and r["ipc"] == ipc]
        means = [run["uar_mean"] for run in runs]
        pts.append((ipc, float(np.mean(means)), float(np.std(means)) if len(runs) > 1 else runs[0]["uar_std"]))
    return pts


def plot(rows: List[Dict], full: Dict, path: Path, title: str) -> None:
    import matplotlib

    from edge_ser.distill.base import METHODS

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the methods, and any variant measured at two IPCs or more (single-IPC variants stay in the table)
    ipcs: Dict[str, set] = {}
    for r in rows:
        ipcs.setdefault(r["label"], set()).add(r["ipc"])
    labels = sorted(lab for lab, seen in ipcs.items() if lab.partition(":")[0] in METHODS or len(seen) > 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, init in zip(axes, ("theta0", "random")):
        for label in labels:
            pts = plot_points(rows, label, init)
            if pts:
                x, m, s = map(np.asarray, zip(*pts))
                ax.errorbar(x, 100 * m, yerr=100 * s, marker="o", capsize=3, label=label)
        if init in full:
            f = full[init]
            ax.axhline(100 * f["uar_mean"], color="k", ls="--", label=f"full data ({100 * f['uar_mean']:.1f})")
        ax.set_xscale("log")
        ax.set_xlabel("synthetic or real utterances per class (IPC)")
        ax.set_title(f"train from {'θ0' if init == 'theta0' else 'random init'}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test UAR (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: List[str], out: str, plot_path: Optional[str]) -> Dict:
    """Merge the JSON of several runs (or an earlier merge) into one: rows keyed by (label, IPC, distillation
    seed), later files replacing earlier rows; where a set was distilled several times the plot shows the mean ± std
    over those distillations."""
    import json

    merged: Dict = {"rows": [], "runs": [], "full": {}}
    for path in paths:
        d = json.loads(Path(path).read_text())
        argv = d.get("argv") or []
        seed = int(argv[argv.index("--distill-seed") + 1]) if "--distill-seed" in argv else 0
        if "argv" in d:
            merged["runs"].append({"argv": argv, "machine": d.get("machine"), "run": Path(path).stem})
        else:
            merged["runs"] += d.get("runs", [])
        for key in ("corpus", "seeds", "test_speakers"):
            merged.setdefault(key, d.get(key))
        merged["full"] = d.get("full") or merged["full"]
        for row in d.get("rows", []):
            row.setdefault("distill_seed", seed)
            key = (row["label"], row["ipc"], row["distill_seed"])
            merged["rows"] = [r for r in merged["rows"] if (r["label"], r["ipc"], r["distill_seed"]) != key] + [row]
    write_json(out, merged)
    if plot_path:
        plot(merged["rows"], merged["full"], Path(plot_path), f"{Path(str(merged.get('corpus'))).name}: test "
             f"speakers {','.join(merged.get('test_speakers') or [])}; mean ± std over {len(merged.get('seeds') or [])}"
             " seeds, or over distillations where a set was distilled several times")
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="corpus path (default: RAVDESS if present, else 'demo')")
    ap.add_argument("--test-speakers", default=None, help="held-out speakers, e.g. 19-24 (default: last quarter)")
    ap.add_argument("--methods", default="random,herding,kcenter,dm,dc",
                    help="comma list; a method may carry params: dm:theta0_prob=0.5+batch_real=16")
    ap.add_argument("--ipc", default="1,5,10,20,50")
    ap.add_argument("--seeds", type=int, default=3, help="evaluation seeds per set and init")
    ap.add_argument("--distill-seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=None, help="override every method's iterations")
    ap.add_argument("--full-epochs", type=int, default=30, help="full-data baseline epochs (0: skip it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="convnet", choices=("convnet", "cnn6"),
                    help="model: the compact edge ConvNet, or the paper's CNN-6 (4.4M parameters; for the "
                         "like-for-like MTT row: --arch cnn6 --methods mtt; hours of CPU per expert)")
    ap.add_argument("--quick", action="store_true", help="CI smoke run on a small slice (< 3 min)")
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    ap.add_argument("--plot", default=None,
                    help="accuracy-vs-IPC plot to write (default: benchmarks/accuracy.png with --merge; a single "
                         "run draws none, so a run written elsewhere never replaces the committed plot)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only merge these runs' JSON (and earlier merges) into --out and re-plot; runs nothing")
    a = ap.parse_args(argv)
    if a.merge:
        merged = merge(a.merge, a.out, a.plot or str(HERE / "accuracy.png"))
        print(f"merged {len(merged['rows'])} rows from {len(a.merge)} files into {a.out}")
        return 0

    import torch

    from edge_ser.config import TrainConfig
    from edge_ser.distill import known_params
    from edge_ser.distill.evaluate import evaluate_full, evaluate_synthetic

    torch.set_num_threads(a.threads)
    if a.quick:
        a.methods = a.methods if "--methods" in (argv or sys.argv) else "random,dm,dc"
        a.ipc = a.ipc if "--ipc" in (argv or sys.argv) else "1,2"
        a.seeds, a.iterations = 1, a.iterations or 3
        a.full_epochs = min(a.full_epochs, 2)
    corpus = a.corpus or default_corpus()
    info = print_machine_info()
    train, test, held = load_split(corpus, a.test_speakers, a.quick)
    model_cfg, theta0 = make_theta0(train, arch=a.arch)
    print(f"corpus {corpus}: train {len(train)} utterances, test {len(test)} (speakers {','.join(held)}), "
          f"{train.num_classes} classes")
    seeds = tuple(range(a.seeds))
    extra = (("epochs", 20), ("steps", 20), ("outer_loop", 1), ("inner_loop", 2), ("batch_real", 8)) \
        if a.quick else ()
    rows: List[Dict] = []
    for spec in filter(None, a.methods.split(",")):
        method, params = parse_method(spec)
        known = known_params(method)     # --quick's shortcuts, for the methods that take them
        params = tuple(dict(tuple(kv for kv in extra if kv[0] in known) + params).items())
        for ipc in [int(v) for v in a.ipc.split(",")]:
            syn, rss, secs = run_in_child(distill_job, corpus, a.test_speakers, a.quick, method, params, ipc,
                                          a.iterations, a.distill_seed, a.threads, a.arch)
            label = spec if a.arch == "convnet" else f"{spec} ({a.arch})"
            row = {"label": label, "arch": a.arch, "method": method, "params": dict(params), "ipc": ipc,
                   "n": int(len(syn.X)), "distill_seed": a.distill_seed,
                   "distill_seconds": secs, "peak_rss_mb": rss, "iterations": syn.stats.get("iterations"),
                   "schedule": syn.schedule.to_dict(), "synthetic_bytes": int(syn.X.nbytes + syn.y.nbytes)}
            for init in ("theta0", "random"):
                row[init] = evaluate_synthetic(syn, model_cfg, theta0, test, seeds=seeds, init=init)
            rows.append(row)
            print(f"{spec:<24} ipc {ipc:>3}  θ0 {fmt(row['theta0'])}  random {fmt(row['random'])}  "
                  f"distill {secs:7.1f} s  peak RSS {rss:6.0f} MB", flush=True)
            write_json(a.out, {"machine": info, "corpus": corpus, "rows": rows, "argv": sys.argv})
    full: Dict = {}
    if a.full_epochs > 0:
        t0 = time.perf_counter()
        full = evaluate_full(train, test, model_cfg, seeds=seeds, theta0=theta0,
                             train_cfg=TrainConfig(epochs=a.full_epochs, threads=a.threads))
        print(f"{'full data':<24} n {len(train)}  θ0 {fmt(full['theta0'])}  random {fmt(full['random'])}  "
              f"({time.perf_counter() - t0:.0f} s)")

    print(f"\n{'method':<24}{'IPC':>5}{'UAR θ0 (%)':>16}{'UAR random (%)':>18}{'distill s':>11}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['label']:<24}{r['ipc']:>5}{fmt(r['theta0']):>16}{fmt(r['random']):>18}"
              f"{r['distill_seconds']:>11.1f}{r['peak_rss_mb']:>13.0f}")
    if full:
        print(f"{'full data':<24}{'all':>5}{fmt(full['theta0']):>16}{fmt(full['random']):>18}{'-':>11}{'-':>13}")
    out = write_json(a.out, {"machine": info, "corpus": corpus, "test_speakers": held, "seeds": list(seeds),
                             "rows": rows, "full": full, "argv": sys.argv, "quick": a.quick})
    print(f"wrote {out}")
    if a.plot and rows:
        plot(rows, full, Path(a.plot), f"{Path(corpus).name}: test speakers {','.join(held)}; "
                                       f"mean ± std over {len(seeds)} seeds")
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
