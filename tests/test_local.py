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
    assert r["ok"]
    assert r["golden"]["passed"]
    assert r["golden"]["max_abs_deviation"] <= pack.golden_tolerance
    info = json.loads((out / "model.json").read_text())
    assert info["format"] == "edge-ser-model/1"
    assert info["pack_id"] == pack.pack_id
    assert info["classes"] == list(pack.classes)
    assert info["test_speakers"] == ["Actor_03"]
    assert info["feature_config"]["n_mels"] == 32
    assert info["peak_rss_mb"] > 100
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


def test_budget_planner_picks_plain_then_lean_then_micro_batches():
    from edge_ser.config import ModelConfig

    cfg = ModelConfig(num_classes=8)
    free = memory.plan_training(cfg, 80, 0, 2, None, baseline_mb=300)
    assert free.micro_batch == 80
    assert free.exact
    assert free.threads == 2
    assert not free.lean
    assert not free.lean_heap
    heap_need = memory.estimate_mb(300, memory.per_sample_mb(cfg, lean_heap=True), 80, 2, memory.HEAP_FIXED_MB)
    lean_need = memory.lean_estimate_mb(300, cfg, 80, 2)
    assert lean_need < heap_need < free.train_estimate_mb              # what the lean heap and chunks are for
    as_is = memory.plan_training(cfg, 80, 0, 2, heap_need + 1, baseline_mb=300, export=False, lean_heap=True)
    assert as_is.exact
    assert as_is.lean_heap
    assert not as_is.lean
    assert as_is.threads == 2
    lean = memory.plan_training(cfg, 80, 0, 2, lean_need + 1, baseline_mb=300, export=False, lean_heap=True)
    assert lean.lean
    assert lean.lean_heap
    assert lean.exact
    assert lean.micro_batch == 80
    assert lean.estimate_mb <= lean_need + 1
    forced = memory.plan_training(cfg, 80, 0, 2, None, baseline_mb=300, lean=True)     # asked for
    assert forced.lean
    assert forced.lean_heap == memory.lean_heap_available()
    inorm = ModelConfig(num_classes=8, norm="instance")                # no chunked path: micro-batches
    per = memory.per_sample_mb(inorm, lean_heap=True)
    budget = memory.estimate_mb(300, per, 40, 2, memory.HEAP_FIXED_MB) + 1   # room for about half the batch
    tight = memory.plan_training(inorm, 80, 0, 2, budget, baseline_mb=300, export=False, lean_heap=True)
    assert 1 <= tight.micro_batch < 80
    assert not tight.exact
    assert not tight.lean
    assert tight.estimate_mb <= budget
    with pytest.raises(memory.MemoryBudgetError, match="export step"):
        memory.plan_training(cfg, 80, 0, 2, 300 + memory.MARGIN * memory.EXPORT_MB - 1, baseline_mb=300)
    with pytest.raises(memory.MemoryBudgetError, match="too small to train|baseline"):
        memory.plan_training(cfg, 80, 0, 1, 330, baseline_mb=300, export=False)


def test_tight_budget_trains_with_micro_batches(pack, tmp_path):
    base = memory.current_rss_mb()
    heap = memory.lean_heap_available()
    per = memory.per_sample_mb(pack.model_config, lean_heap=heap)
    fixed = memory.HEAP_FIXED_MB if heap else memory.FIXED_TRAIN_MB
    budget = memory.estimate_mb(base, per, 4.5, 1, fixed) + 1
    budget = max(budget, base + memory.MARGIN * memory.EXPORT_MB + 1)
    r = train_from_pack(pack, tmp_path / "m", memory_budget_mb=budget, threads=1, export=False)
    assert r["micro_batch"] < len(pack.X) or r["exact_schedule"]
    assert r["golden"]["max_abs_deviation"] < 10  # trained, informative golden check


def test_micro_batches_accumulate_the_full_batch_gradient():
    """Without batch-dependent normalisation, gradients accumulated over micro-batches are the full batch's
    gradient: the micro-batched schedule ends at the exact schedule's weights (to float rounding)."""
    import dataclasses

    import torch
    from _packlike import MODEL, class_data

    from edge_ser.models import build_model, input_stats, set_input_stats
    from edge_ser.schedule import Schedule, train_schedule

    X, y = class_data(3, seed=1)
    cfg = dataclasses.replace(MODEL, norm="instance")
    a = build_model(cfg, seed=2)
    set_input_stats(a, *input_stats(X))
    b = build_model(cfg, seed=2)
    b.load_state_dict(a.state_dict())
    sched = Schedule(optimizer="adam", lr=1e-2, epochs=3, batch_size=6, seed=4, augment=True)
    train_schedule(a, X, y, sched)
    train_schedule(b, X, y, sched, micro_batch=4)      # 6-sample steps as 4 + 2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    fresh = dict(build_model(cfg, seed=2).named_parameters())
    assert not torch.equal(dict(a.named_parameters())["classifier.weight"], fresh["classifier.weight"])  # it trained


def test_forward_chunked_is_forward_with_less_memory():
    """Every block split into channel groups (recomputed in backward): same logits, same gradients, same
    BatchNorm running statistics after the forward, to float precision."""
    import copy

    import torch
    from _packlike import MODEL, class_data

    from edge_ser.models import build_model, input_stats, set_input_stats

    X, _ = class_data(3, seed=1)
    a = build_model(MODEL, seed=2)
    set_input_stats(a, *input_stats(X))
    b = copy.deepcopy(a)
    a.train(), b.train()
    x = torch.as_tensor(X)
    w = torch.randn(len(X), MODEL.num_classes, generator=torch.Generator().manual_seed(0))
    out_a = a(x)
    smallest = len(X) * (MODEL.n_mels // 2 // 2) * (MODEL.num_frames // 2 // 2)   # a few channels per group
    out_b = b.forward_chunked(x, max_chunk_floats=smallest)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for (name, ra), rb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(rb, ra, rtol=1e-6, atol=1e-6, msg=name)
    after_forward = [t.clone() for t in b.buffers()]
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()          # recomputes the groups: running statistics updated again ...
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        for t, saved in zip(b.buffers(), after_forward):
            t.copy_(saved)                    # ... which is why train_schedule restores them

        torch.testing.assert_close(b.eval().forward_chunked(x, smallest), a.eval()(x), rtol=1e-5, atol=1e-5)


def test_lean_training_matches_plain_training_for_the_default_model():
    """The default model with the group size 80 samples would get (the first two blocks split): a few
    schedule steps give the same weights and running statistics up to float summation order. (On the CPU of
    earlier sessions oneDNN made them bit for bit identical; on an AVX2 AMD EPYC the classifier bias differed
    by one ulp after three steps, so bit-identity is not something to promise.)"""
    import torch

    from edge_ser.config import FeatureConfig, default_model_config
    from edge_ser.models import build_model, state_arrays
    from edge_ser.schedule import Schedule, train_schedule

    torch.set_num_threads(1)
    cfg = default_model_config(8, FeatureConfig())
    rng = np.random.default_rng(0)
    X = rng.standard_normal((24, cfg.n_mels, cfg.num_frames)).astype(np.float32)
    y = np.arange(24) % 8
    sched = Schedule(lr=0.05, epochs=3)
    chunk = int(memory.LEAN_CHUNK_MB * (1 << 20) / 4) * 24 // 80    # the group size 80 samples would get
    plain, lean = build_model(cfg, seed=1), build_model(cfg, seed=1)
    train_schedule(plain, X, y, sched)
    train_schedule(lean, X, y, sched, chunk_floats=chunk)
    first, second = state_arrays(plain), state_arrays(lean)
    assert first.keys() == second.keys()
    start, moved = build_model(cfg, seed=1).state_dict(), 0
    for k in first:
        np.testing.assert_allclose(second[k], first[k], rtol=1e-5, atol=1e-6, err_msg=k)
        moved += int(not np.array_equal(first[k], start[k].numpy()))
    assert moved > len(first) // 2       # the steps really changed the weights being compared


@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum-wd", "adam", "adam-wd"])
def test_device_optimizer_is_torch_optim_bit_for_bit(kind):
    """The schedule's own optimiser (no torch.optim: that import costs ~55 MB on a device) takes exactly
    torch.optim's steps: same weights after several steps, compared bit for bit."""
    import torch

    from edge_ser.config import default_model_config
    from edge_ser.models import build_model
    from edge_ser.schedule import DeviceOptimizer, Schedule, loss_fn

    torch.set_num_threads(1)
    opt_name, _, extra = kind.partition("-")
    sched = Schedule(optimizer=opt_name, lr=0.05 if opt_name == "sgd" else 2e-3,
                     momentum=0.9 if extra and opt_name == "sgd" else 0.0,
                     weight_decay=1e-3 if extra else 0.0)
    cfg = default_model_config(4)
    ours, ref = build_model(cfg, seed=3), build_model(cfg, seed=3)
    mine = DeviceOptimizer(ours.parameters(), sched)
    if opt_name == "sgd":
        theirs = torch.optim.SGD(ref.parameters(), lr=sched.lr, momentum=sched.momentum,
                                 weight_decay=sched.weight_decay)
    else:
        theirs = torch.optim.Adam(ref.parameters(), lr=sched.lr, weight_decay=sched.weight_decay)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(6, cfg.n_mels, cfg.num_frames, generator=gen)
        y = torch.arange(6) % 4
        for model, opt in ((ours, mine), (ref, theirs)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), build_model(cfg, seed=3).parameters()))


def test_lean_train_local_passes_the_golden_check(pack, tmp_path):
    r = train_from_pack(pack, tmp_path / "m", threads=1, export=False, lean=True)
    assert r["lean"]
    assert r["exact_schedule"]
    assert r["heap"].startswith("lean")
    assert r["golden"]["passed"]
    assert r["golden"]["max_abs_deviation"] <= pack.golden_tolerance


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
    assert (out / "model.json").read_bytes() == before
    assert (out / "model.int8.onnx").is_file()
    assert not list(tmp_path.glob(".model.*"))


def test_peak_rss_is_measured():
    assert memory.peak_rss_mb() >= memory.current_rss_mb() * 0.5 > 10
