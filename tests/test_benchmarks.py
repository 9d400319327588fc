"""Smoke tests of the benchmark entry points: each ``python -m benchmarks.NAME --quick`` runs for real on
the demo corpus (one thread) and writes a JSON report with sane values only where --out says.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_quick(name: str, tmp_path: Path, timeout: float) -> dict:
    """Run ``benchmarks.NAME --quick --out tmp/x.json``; its report (and nothing new in benchmarks/results)."""
    out = tmp_path / "x.json"
    defaults = [RESULTS / f"{name}.json", RESULTS / f"{name}.quick.json"]  # (other benchmarks may be writing)
    before = {p: p.stat().st_mtime_ns for p in defaults if p.exists()}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"benchmarks.{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    after = {p: p.stat().st_mtime_ns for p in defaults if p.exists()}
    assert after == before, "a --quick run with --out wrote into benchmarks/results/"
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["machine"]["cpu_count"] >= 1
    return report


@pytest.mark.slow
def test_device_quick(tmp_path):
    r = run_quick("device", tmp_path, timeout=300)
    assert r["pack"]["bytes"] > 0 and r["pack"]["samples"] > 0
    (s,) = r["summary"]
    assert s["threads_used"] == 1 and s["golden_passed"] is True
    assert s["wall_seconds"] > 0 and s["cpu_seconds"] > 0 and s["train_seconds"] > 0
    assert 100 < s["peak_rss_mb"] < 4000
    assert r["refusal"]["refused"] is True and r["refusal"]["error"] == "MemoryBudgetError"
    assert "150 MB" in r["refusal"]["message"] and r["refusal"]["model_written"] is False


@pytest.mark.slow
def test_inference_quick(tmp_path):
    r = run_quick("inference", tmp_path, timeout=300)
    assert r["model_source"]["golden_passed"] is True and r["test_windows"] > 0
    rows = {row["runtime"]: row for row in r["rows"]}
    assert set(rows) == {"torch", "onnx", "onnx-int8", "tflite"}
    for name, row in rows.items():
        if name == "tflite" and "skipped" in row:
            continue  # the TFLite runtime / converter is optional
        assert "skipped" not in row, row
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["bytes"] > 0 and row["peak_rss_mb"] > 0
        assert 0.0 <= row["uar"] <= 1.0 and row["n"] == r["test_windows"]
    assert rows["onnx"]["argmax_agreement_vs_torch"] > 0.95
    assert rows["onnx-int8"]["bytes"] < rows["onnx"]["bytes"]
    assert rows["onnx"]["torch_imported"] is False
    assert "onnx-int8 - onnx" in r["uar_diff_points"]


@pytest.mark.slow
def test_pack_quick(tmp_path):
    r = run_quick("pack", tmp_path, timeout=300)
    assert r["corpus"] == "demo" and r["cache"] == "cold"
    (row,) = r["rows"]
    assert row["method"] == "random" and row["ipc"] == 2 and row["samples"] == 2 * 4
    assert 0 < row["bytes"] < row["corpus_bytes"] and 0 < row["ratio"] < 1
    assert row["distill_seconds"] >= 0 and row["pack_seconds"] > 0 and row["peak_rss_mb"] > 0
    members = row["members"]
    assert {"synthetic X", "labels", "golden", "theta0", "manifest", "signature"} <= set(members)
    assert sum(m["stored_bytes"] for m in members.values()) <= row["bytes"]


def test_accuracy_merge_keeps_distillation_seeds_and_plots_their_spread(tmp_path):
    """`benchmarks.accuracy --merge`: rows keyed by (label, IPC, distillation seed), a later file replacing a row; the
    plot shows the mean ± std over distillations where there are several."""
    sys.path.insert(0, str(REPO))
    from benchmarks.accuracy import merge, plot_points

    def run(path, seed, uar, label="fixed-init"):
        res = {"uar_mean": uar, "uar_std": 0.01}
        path.write_text(json.dumps({"argv": ["accuracy.py", "--distill-seed", str(seed)], "corpus": "c", "seeds": [0],
                                    "test_speakers": ["9"], "full": {},
                                    "rows": [{"label": label, "ipc": 10, "theta0": res, "random": res}]}))
        return str(path)

    files = [run(tmp_path / "a.json", 0, 0.40), run(tmp_path / "b.json", 1, 0.44), run(tmp_path / "c.json", 1, 0.46),
             run(tmp_path / "d.json", 0, 0.30, label="random")]
    merged = merge(files, str(tmp_path / "m.json"), str(tmp_path / "m.png"))
    rows = {(r["label"], r["distill_seed"]): r["theta0"]["uar_mean"] for r in merged["rows"]}
    assert rows == {("fixed-init", 0): 0.40, ("fixed-init", 1): 0.46, ("random", 0): 0.30}
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert plot_points(merged["rows"], "fixed-init", "theta0") == [(10, pytest.approx(0.43), pytest.approx(0.03))]
    assert plot_points(merged["rows"], "random", "theta0") == [(10, 0.30, 0.01)]   # one set: its seeds' spread
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == merged["rows"]


def test_accuracy_method_specs_parse_numbers_flags_and_tuples():
    from benchmarks.accuracy import parse_method

    assert parse_method("random") == ("random", ())
    name, params = parse_method("fixed-init:epoch_grid=40/80+lr_factors=0.5/1+select_on=val_train+teacher_labels=True")
    assert name == "fixed-init"
    assert dict(params) == {"epoch_grid": (40, 80), "lr_factors": (0.5, 1), "select_on": "val_train",
                            "teacher_labels": True}


@pytest.mark.slow
def test_schedule_sweep_scores_every_grid_point(tmp_path):
    """`benchmarks.schedule_sweep` on the built-in corpus, a random subset, a 1 x 2 grid: one row per (lr, steps)
    with the selection score = mean of the validation and training speakers' UAR."""
    out = tmp_path / "sweep.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.schedule_sweep", "--corpus", "demo", "--ipc", "2",
                           "--sets", "random:0", "--lrs", "0.1", "--steps", "1,3", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert [(r["set"], r["lr"], r["steps"]) for r in rows] == [("random:0", 0.1, 1), ("random:0", 0.1, 3)]
    for r in rows:
        assert r["select_score"] == (r["val_uar"] + r["train_uar"]) / 2
        assert 0.0 <= r["test_uar"] <= 1.0


@pytest.mark.slow
def test_privacy_quick(tmp_path):
    r = run_quick("privacy", tmp_path, timeout=900)
    rows = {(row["method"], row["ipc"]): row for row in r["rows"]}
    assert set(rows) == {("random", 2)}, f"rows {sorted(rows)}"
    for row in rows.values():
        assert row["near_copies"] == row["samples"], f"{row['method']}: a real-clip pack must be all near-copies"
        assert row["real_clips_declared"] is True, f"{row['method']}: the pack must declare its real clips"
        assert 0.0 <= row["mia_auc"] <= 1.0 and row["mia_attack"] == "lira" and row["shadows"] == 2
        assert row["epsilon"] is None
