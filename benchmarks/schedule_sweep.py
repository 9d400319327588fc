"""Benchmark `schedule_sweep`: how a small set's UAR from θ0 depends on the device's step size and step count.

It trains θ0 the plain way (full-batch SGD, no augmentation: the recipe packs shipped before fixed-init's
augmented mini-batch one, see CHANGELOG.md) on a given IPC-sized set over a
grid of step sizes × step counts and records, at every grid point, the score fixed-init selects on (mean of the
validation speakers' and the training speakers' UAR) and the test speakers' UAR, so one can see where training
has settled and whether the selection score ranks what the test speakers see.

    PYTHONPATH=. python -m benchmarks.schedule_sweep --corpus ../shared/corpora/ravdess --test-speakers 19-24 \\
        --sets herding,random:0,random:1,random:2 --ipc 10 --lrs 0.05,0.2,0.4 --steps 40,80,120,200,300

Sets: ``herding`` = fixed-init's starting set (herding in the embedding of its experts, the same on-disk cache
distillation uses); ``random:S`` = a random real subset drawn with seed S. Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import sys

from ._common import print_machine_info, write_json
from .accuracy import HERE, default_corpus, fixed_init_split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="corpus path (default: RAVDESS if present, else 'demo')")
    ap.add_argument("--test-speakers", default=None, help="held-out speakers, e.g. 19-24")
    ap.add_argument("--sets", default="herding,random:0", help="comma list of herding, random:SEED")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--lrs", default="0.05,0.2,0.4", help="full-batch SGD step sizes")
    ap.add_argument("--steps", default="40,80,120,200,300", help="step counts scored along each run")
    ap.add_argument("--val-speakers", type=int, default=2, help="as fixed-init's val_speakers param")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "schedule_sweep.json"))
    a = ap.parse_args(argv)

    import torch

    from edge_ser.distill.common import init_synthetic
    from edge_ser.distill.experts import ExpertConfig, expert_buffer, load_trajectory
    from edge_ser.distill.fixed_init import EXPERT_LR, herding_init
    from edge_ser.distill.selection import score
    from edge_ser.models import build_model, load_state_arrays
    from edge_ser.schedule import Schedule, train_schedule

    torch.set_num_threads(a.threads)
    corpus = a.corpus or default_corpus()
    info = print_machine_info()
    _, test, held, model_cfg, theta0, fit, val = fixed_init_split(corpus, a.test_speakers, a.val_speakers)
    C = model_cfg.num_classes
    lrs = [float(v) for v in a.lrs.split(",")]
    steps = sorted(int(v) for v in a.steps.split(","))
    rows = []
    print(f"{'set':<10} {'lr':>6} {'steps':>6} {'select':>7} {'val':>6} {'test':>6}")
    for name in a.sets.split(","):
        if name == "herding":
            paths = expert_buffer(fit, model_cfg, ExpertConfig(epochs=15, optimizer="sgd", lr=EXPERT_LR["sgd"]),
                                  theta0=theta0, count=2, threads=a.threads)
            states = [t.state(t.epochs) for t in map(load_trajectory, paths)]
            idx = herding_init(fit, a.ipc, model_cfg, states)
            X, y = fit.X[idx], fit.y[idx]
        elif name.startswith("random:"):
            X, y = init_synthetic(fit, a.ipc, "real", int(name.split(":")[1]))
        else:
            raise SystemExit(f"unknown set {name!r}: herding or random:SEED")
        for lr in lrs:
            model, done = load_state_arrays(build_model(model_cfg, 0), theta0), 0
            for n in steps:   # full-batch SGD without momentum: n steps = done steps + (n - done) more
                train_schedule(model, X, y, Schedule(lr=lr, epochs=n - done, seed=0))
                done = n
                r = {"set": name, "lr": lr, "steps": n, "val_uar": score(model, val, C),
                     "train_uar": score(model, fit, C), "test_uar": score(model, test, C)}
                r["select_score"] = (r["val_uar"] + r["train_uar"]) / 2
                rows.append(r)
                print(f"{name:<10} {lr:>6.3g} {n:>6} {r['select_score']:>7.3f} {r['val_uar']:>6.3f} "
                      f"{r['test_uar']:>6.3f}", flush=True)
    summary = {}
    for name in dict.fromkeys(r["set"] for r in rows):
        best = max((r for r in rows if r["set"] == name), key=lambda r: r["select_score"])
        summary[name] = best
        print(f"{name}: selected lr {best['lr']:.3g} x {best['steps']} steps -> test {best['test_uar']:.3f}")
    write_json(a.out, {"machine": info, "corpus": corpus, "test_speakers": held, "ipc": a.ipc, "rows": rows,
                       "summary": summary, "argv": sys.argv})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
