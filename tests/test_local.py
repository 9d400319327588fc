"""train-local: θ0 hash check, honest golden check, memory budget planning/refusal, atomic model folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from _packlike import make_pack
from edge_ser import memory
from edge_ser.local import train_from_pack


@pytest.fixture(scope="module")
def pack():
    return make_pack()


def test_train_from_pack_writes_model_and_passes_golden(pack, tmp_path):
    out = tmp_path / "model"
    r = train_from_pack(pack, out, threads=1, tflite=False)
    assert r["ok"] and r["golden"]["passed"] and r["golden"]["max_abs_deviation"] <= pack.golden_tolerance
    info = json.loads((out / "model.json").read_text())
    assert info["format"] == "edge-ser-model/1" and info["pack_id"] == pack.pack_id
    assert info["classes"] == list(pack.classes) and info["test_speakers"] == ["Actor_03"]
    assert info["feature_config"]["n_mels"] == 32 and info["peak_rss_mb"] > 100
    for f in ("model.npz", "model.onnx", "model.int8.onnx"):
        assert (out / f).is_file()
    with np.load(out / "model.npz", allow_pickle=False) as z:  # no pickle needed to read the weights
        assert "classifier.weight" in z.files
    assert not list(tmp_path.glob(".model.*"))  # no temp/old folders left behind


def test_theta0_hash_mismatch_refused(pack, tmp_path):
    bad = make_pack()
    bad.theta0 = {k: v.copy() for k, v in bad.theta0.items()}
    bad.theta0["classifier.weight"][0, 0] += 1e-3
    with pytest.raises(ValueError, match="SHA-256"):
        train_from_pack(bad, tmp_path / "m", threads=1, export=False)
    assert not (tmp_path / "m").exists()


def test_golden_check_fails_for_tampered_logits(tmp_path):
    bad = make_pack()
    bad.golden_logits = bad.golden_logits.copy()
    bad.golden_logits[0] += 0.5
    with pytest.raises(RuntimeError, match="golden-vector check failed"):
        train_from_pack(bad, tmp_path / "m", threads=1, export=False)
    assert not (tmp_path / "m").exists()


def test_golden_check_fails_for_tampered_weights(tmp_path):
    """θ0 consistently re-hashed (an attacker without the signing key could not do this to a signed pack,
    but the golden vectors still catch a different initialisation)."""
    from edge_ser.models import state_sha256

    bad = make_pack()
    bad.theta0 = {k: (v * 1.1 if k.endswith("weight") and v.dtype == np.float32 else v) for k, v in bad.theta0.items()}
    bad.theta0_sha256 = state_sha256(bad.theta0)
    with pytest.raises(RuntimeError, match="golden"):
        train_from_pack(bad, tmp_path / "m", threads=1, export=False)


def test_budget_too_small_is_a_clear_refusal(pack, tmp_path):
    with pytest.raises(memory.MemoryBudgetError, match="memory budget 50 MB"):
        train_from_pack(pack, tmp_path / "m", memory_budget_mb=50, threads=1)
    assert not (tmp_path / "m").exists()


def test_budget_planner_picks_micro_batches_and_threads():
    from edge_ser.config import ModelConfig

    cfg = ModelConfig(num_classes=8)
    free = memory.plan_training(cfg, 80, 0, 2, None, baseline_mb=300)
    assert free.micro_batch == 80 and free.exact and free.threads == 2
    budget = memory.estimate_mb(300, free.per_sample_mb, 40, 2) + 1   # room for about half the batch
    tight = memory.plan_training(cfg, 80, 0, 2, budget, baseline_mb=300, export=False)
    assert 1 <= tight.micro_batch < 80 and not tight.exact and tight.estimate_mb <= budget
    with pytest.raises(memory.MemoryBudgetError, match="export step"):
        memory.plan_training(cfg, 80, 0, 2, memory.MARGIN * (300 + memory.EXPORT_MB) - 1, baseline_mb=300)
    with pytest.raises(memory.MemoryBudgetError, match="too small to train|baseline"):
        memory.plan_training(cfg, 80, 0, 1, 330, baseline_mb=300, export=False)


def test_tight_budget_trains_with_micro_batches(pack, tmp_path):
    base = memory.current_rss_mb()
    per = memory.plan_training(pack.model_config, len(pack.X), 0, 1, None).per_sample_mb
    budget = memory.MARGIN * (base + memory.FIXED_TRAIN_MB + 4.5 * per) + 1
    budget = max(budget, memory.MARGIN * (base + memory.EXPORT_MB) + 1)
    r = train_from_pack(pack, tmp_path / "m", memory_budget_mb=budget, threads=1, export=False)
    assert r["micro_batch"] < len(pack.X) or r["exact_schedule"]
    assert r["golden"]["max_abs_deviation"] < 10  # trained, informative golden check


def test_failure_mid_export_keeps_previous_model(pack, tmp_path, monkeypatch):
    out = tmp_path / "model"
    train_from_pack(pack, out, threads=1, tflite=False)
    before = (out / "model.json").read_bytes()
    import edge_ser.export as export

    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export, "quantize_int8", boom)
    with pytest.raises(OSError, match="disk full"):
        train_from_pack(pack, out, threads=1, tflite=False)
    assert (out / "model.json").read_bytes() == before and (out / "model.int8.onnx").is_file()
    assert not list(tmp_path.glob(".model.*"))


def test_peak_rss_is_measured():
    assert memory.peak_rss_mb() >= memory.current_rss_mb() * 0.5 > 10
