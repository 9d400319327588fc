"""Benchmark `experts`: test UAR along the expert trajectories that fixed-init distillation matches.

The synthetic set is optimised so that the device's training from θ0 reproduces segments of these
trajectories (experts that all start at θ0, trained on the training speakers minus the validation ones), so
an expert's accuracy at the last epoch a segment can end on bounds what the distilled set can reach.

    PYTHONPATH=. python -m benchmarks.experts --corpus ../shared/corpora/ravdess --test-speakers 19-24 \\
        --expert-epochs 15 --every 3                       # fixed-init's default experts (SGD, lr 0.3)
    ... --optimizer adam                                   # the paper's recipe (Adam, lr 1e-3)

Experts come from (or go to) the same on-disk cache distillation uses, so this reads the experts a
``fixed-init`` run with the same settings trained. Writes JSON (--out).
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
    ap.add_argument("--expert-epochs", type=int, default=15, help="as fixed-init's expert_epochs param")
    ap.add_argument("--experts", type=int, default=2, help="as fixed-init's experts param")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="as fixed-init's expert_optimizer")
    ap.add_argument("--lr", type=float, default=None, help="as fixed-init's expert_lr (default: 0.3 sgd, 1e-3 adam)")
    ap.add_argument("--val-speakers", type=int, default=2, help="as fixed-init's val_speakers param")
    ap.add_argument("--every", type=int, default=3, help="score every N-th epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON (default results/experts_<epochs>_<optimizer>.json)")
    a = ap.parse_args(argv)

    import torch

    from edge_ser.distill.experts import ExpertConfig, expert_buffer, load_trajectory
    from edge_ser.distill.fixed_init import EXPERT_LR
    from edge_ser.models import build_model, load_state_arrays
    from edge_ser.train import evaluate_arrays

    torch.set_num_threads(a.threads)
    corpus = a.corpus or default_corpus()
    info = print_machine_info()
    _, test, held, model_cfg, theta0, experts_train, val = fixed_init_split(corpus, a.test_speakers, a.val_speakers)
    expert_cfg = ExpertConfig(epochs=a.expert_epochs, optimizer=a.optimizer,
                              lr=a.lr if a.lr is not None else EXPERT_LR[a.optimizer])
    paths = expert_buffer(experts_train, model_cfg, expert_cfg, theta0=theta0,
                          count=a.experts, threads=a.threads)
    rows = []
    for path in paths:
        traj = load_trajectory(path)
        scores = {}
        for epoch in sorted(set(range(0, traj.epochs + 1, a.every)) | {traj.epochs}):
            model = load_state_arrays(build_model(model_cfg, 0), traj.state(epoch)).eval()
            scores[epoch] = {split: float(evaluate_arrays(model, fs.X, fs.y, model_cfg.num_classes)["uar"])
                             for split, fs in (("test", test), ("val", val))}
        rows.append({"expert": path.name, "seed": traj.meta.get("seed"), "epochs": scores})
        print(f"{path.name}: " + "  ".join(f"ep {e}: test {100 * s['test']:.1f} val {100 * s['val']:.1f}"
                                          for e, s in scores.items()), flush=True)
    out = write_json(a.out or str(HERE / "results" / f"experts_{a.expert_epochs}_{a.optimizer}.json"),
                     {"machine": info, "corpus": corpus, "test_speakers": held, "val_speakers": val.speaker_ids(),
                      "expert": expert_cfg.to_dict(), "rows": rows, "argv": sys.argv})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
