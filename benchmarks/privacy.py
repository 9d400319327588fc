"""What each distillation method's pack reveals: the privacy audit per method and IPC, with the utility of the
very model that was attacked (θ0 trained on the pack as a device does, UAR on the held-out speakers).

    python -m benchmarks.privacy --corpus ../shared/corpora/ravdess --test-speakers 19-24 \\
        --methods random,herding,fixed-init,dm --ipc 1,10 --shadows 4 --shadow-methods random,herding

Every row is one pack (distillation seed ``--seed``) and one audit; rows are appended to ``--out`` as they
finish, so an interrupted run keeps what it measured. ``--plot`` draws UAR against MIA TPR at 1 % FPR.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import machine_info, print_machine_info, write_json

DEFAULT_OUT = Path(__file__).parent / "results" / "privacy.json"
PLOT = Path(__file__).parent / "privacy.png"


def run_row(corpus, method, ipc, test_speakers, seed, shadows, reid_epochs, workdir, params=None, iterations=None,
            threads=None):
    import edge_ser
    from edge_ser.privacy import AuditConfig, audit

    path = Path(workdir) / f"{label(method, params).replace('[', '_').replace(']', '').replace(',', '_')}_ipc{ipc}_seed{seed}.pack"
    t0 = time.perf_counter()
    info = edge_ser.pack(corpus, path, method=method, ipc=ipc, test_speakers=test_speakers, seed=seed,
                         progress=False, params=params, iterations=iterations, threads=threads)
    pack_seconds = time.perf_counter() - t0
    report = audit(path, corpus, test_speakers=test_speakers, out_dir=Path(workdir) / f"{path.stem}.audit",
                   config=AuditConfig(shadows=shadows, reid_epochs=reid_epochs, audio_examples=1), threads=threads)
    keep = ("samples", "near_copies", "dcr_near_copies", "ratio_min", "ratio_median", "nndr_min", "nndr_median",
            "reid_rate", "reid_chance", "reid_confidence", "reid_attacker_accuracy", "mia_attack", "mia_auc",
            "mia_tpr_at_1pct_fpr", "mia_tpr_at_0.1pct_fpr", "mia_speaker_auc", "mia_speaker_tpr_at_1pct_fpr",
            "epsilon", "device_uar", "verdict", "mia", "shadows", "real_clips_declared", "seconds")
    row = {"method": method, "label": label(method, params), "ipc": ipc, "seed": seed, "pack_bytes": info["bytes"],
           "distill_seconds": info["distill_seconds"], "pack_seconds": round(pack_seconds, 1),
           **{k: report[k] for k in keep}}
    row["audit_seconds"] = row.pop("seconds")
    if report["audio"]:
        row["spectral_correlation"] = report["audio"][0]["spectral_correlation"]
    return row


def label(method, params=None) -> str:
    """A row's name: the method, and its ``--param`` overrides when there are any (``fixed-init[init_select=gaussian]``)."""
    return method + (f"[{','.join(f'{k}={v}' for k, v in sorted(params.items()))}]" if params else "")


def table(rows) -> str:
    head = (f"{'method':<11}{'ipc':>4}{'UAR':>8}{'copies':>9}{'re-id':>8}{'chance':>8}{'MIA':>10}{'AUC':>7}"
            f"{'TPR@1%':>8}{'spk AUC':>9}{'eps':>6}{'bytes':>11}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.get('label', r['method']):<11}{r['ipc']:>4}{r['device_uar']:>8.1%}{r['near_copies']:>4}/{r['samples']:<4}"
                     f"{r['reid_rate']:>8.1%}{r['reid_chance']:>8.1%}{r['mia_attack']:>10}{r['mia_auc']:>7.3f}"
                     f"{r['mia_tpr_at_1pct_fpr']:>8.1%}{r['mia_speaker_auc']:>9.3f}"
                     f"{'-' if r['epsilon'] is None else r['epsilon']:>6}{r['pack_bytes']:>11,}")
    return "\n".join(lines)


def plot(rows, path=PLOT):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        marker = "o" if r["ipc"] == 1 else "s"
        color = "tab:red" if r["near_copies"] else "tab:blue"
        ax.scatter(100 * r["mia_tpr_at_1pct_fpr"], 100 * r["device_uar"], marker=marker, color=color)
        ax.annotate(f"{r['method']} {r['ipc']}", (100 * r["mia_tpr_at_1pct_fpr"], 100 * r["device_uar"]),
                    textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.axvline(3, color="grey", ls=":", lw=1)
    ax.axvline(1, color="lightgrey", ls="-", lw=1)      # chance: TPR = FPR
    ax.text(3.1, 21, "goal: TPR <= 3 %", fontsize=7, color="grey")
    ax.text(1.1, 21, "chance", fontsize=7, color="grey")
    ax.set_xlim(0, max(6.0, 100 * max(r["mia_tpr_at_1pct_fpr"] for r in rows) + 1))
    ax.set_ylim(20, 60)
    ax.set_xlabel("membership inference TPR at 1 % FPR (utterance level, %)")
    ax.set_ylabel("UAR of the attacked device model (%)")
    ax.set_title("privacy / utility per pack (red: holds near-copies of real clips)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="corpus path (default: ../shared/corpora/ravdess, else demo)")
    ap.add_argument("--test-speakers", default=None)
    ap.add_argument("--methods", default="random,herding,fixed-init,dm")
    ap.add_argument("--ipc", default="1,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shadows", type=int, default=4, help="LiRA shadow packs for --shadow-methods rows")
    ap.add_argument("--shadow-methods", default="random,herding",
                    help="methods cheap enough to repeat per shadow; other rows use the threshold attack")
    ap.add_argument("--reid-epochs", type=int, default=30)
    ap.add_argument("--param", action="append", metavar="METHOD:KEY=VALUE", default=[],
                    help="a method setting for that method's rows, e.g. fixed-init:iterations=10")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per distillation (1: two runs side by side)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--workdir", default=None, help="where packs and audits go (default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="demo corpus, a random pack at IPC 2 trained 60 steps, 2 shadows")
    ap.add_argument("--plot", action="store_true", help="draw the trade-off plot from --out (no new rows)")
    a = ap.parse_args(argv)

    if a.plot:
        rows = json.loads(Path(a.out).read_text())["rows"]
        print(table(rows))
        print(f"plot: {plot(rows)}")
        return 0
    from benchmarks.accuracy import default_corpus

    corpus = "demo" if a.quick else (a.corpus or default_corpus())
    methods = ["random"] if a.quick else [m for m in a.methods.split(",") if m]
    ipcs = [2] if a.quick else [int(x) for x in a.ipc.split(",")]
    shadows = 2 if a.quick else a.shadows
    reid_epochs = 5 if a.quick else a.reid_epochs
    shadow_methods = set(a.shadow_methods.split(","))
    params, iterations = ({"random": {"steps": 60}} if a.quick else {}), {}
    for item in a.param:
        method, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if key == "iterations":
            iterations[method] = int(value)
        else:
            from edge_ser.cli import parse_params

            params.setdefault(method, {}).update(parse_params([f"{key}={value}"]))
    info = print_machine_info(machine_info())
    out = Path(a.out)
    existing = json.loads(out.read_text()) if out.exists() and not a.quick else {}
    rows = [r for r in existing.get("rows", [])]
    done = {(r.get("label", r["method"]), r["ipc"], r["seed"]) for r in rows}
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="edge-ser-privacy-"))
    work.mkdir(parents=True, exist_ok=True)
    for ipc in ipcs:
        for method in methods:
            if (label(method, params.get(method)), ipc, a.seed) in done:
                continue
            t0 = time.perf_counter()
            sys.stderr.write(f"== {method} ipc {ipc}\n")
            row = run_row(corpus, method, ipc, a.test_speakers, a.seed,
                          shadows if method in shadow_methods else 0, reid_epochs, work,
                          params=params.get(method), iterations=iterations.get(method), threads=a.threads)
            row["row_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            write_json(out, {"benchmark": "privacy", "quick": a.quick, "machine": info, "corpus": str(Path(corpus).name),
                             "test_speakers": a.test_speakers, "command": "python -m benchmarks.privacy "
                             + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows})
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    if not a.quick:
        print(f"plot: {plot(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
