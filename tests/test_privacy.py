"""The privacy audit: its attack statistics on controlled inputs, and the whole audit on a real corpus slice
(the demo corpus for the fast tier): a pack of real clips must be flagged, a pack of noise must not."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from edge_ser.privacy import (
    AuditConfig,
    AuditError,
    attack_summary,
    auc,
    audit,
    confidence_scores,
    copies,
    lira_scores,
    tpr_at_fpr,
)

SMALL_FEATURES = dict(clip_seconds=1.0)      # (64, 98) log-Mels keep every training here to seconds
QUICK = AuditConfig(reid_epochs=12, audio_examples=1, griffin_lim_iters=8)


# ---------------------------------------------------------------- statistics

def test_auc_and_tpr_on_known_scores():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0, "perfectly separated scores must give AUC 1"
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0, "reversed scores must give AUC 0"
    assert auc([1, 1], [1, 1]) == 0.5, "ties must count half"
    rng = np.random.default_rng(0)
    same = auc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same - 0.5) < 0.03, f"same distributions gave AUC {same}"
    neg = np.arange(1000, dtype=float)
    assert tpr_at_fpr([999.5, 10.0], neg, 0.01) == 0.5, "only scores above the 99th percentile of non-members count"
    assert tpr_at_fpr([2000.0], neg, 0.001) == 1.0


def test_confidence_score_is_logit_of_true_class():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.log(p[[0, 1], [0, 1]] / (1 - p[[0, 1], [0, 1]]))
    assert np.allclose(confidence_scores(logits, np.array([0, 1])), want), "logit-scaled confidence is wrong"


def test_lira_separates_members_only_when_shadows_show_an_effect():
    rng = np.random.default_rng(1)
    K, N = 16, 600
    base = rng.normal(0, 2, N)                       # per-example difficulty, shared by all models
    inside = rng.random((K, N)) < 0.5
    member = rng.random(N) < 0.5
    for effect, lo, hi in ((2.0, 0.8, 1.01), (0.0, 0.4, 0.6)):
        shadow = base + effect * inside + rng.normal(0, 0.5, (K, N))
        target = base + effect * member + rng.normal(0, 0.5, N)
        s = lira_scores(target, shadow, inside)
        a = auc(s[member], s[~member])
        assert lo < a < hi, f"LiRA AUC {a:.3f} with membership effect {effect}, expected in ({lo}, {hi})"


def test_copies_flags_real_clips_and_not_noise():
    rng = np.random.default_rng(2)
    R = rng.normal(size=(60, 8, 20)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)
    shifted = np.roll(R[[0, 25, 50]], 2, axis=2)     # real clips as a device would roll them
    c = copies(shifted, labels[[0, 25, 50]], R, labels, shift=3)
    assert c["near_copies"] == 3, f"time-shifted real clips must be near-copies, got {c['near_copies']}"
    assert c["ratio_min"] < 1e-3
    noise = rng.normal(size=(6, 8, 20)).astype(np.float32) * 0.3
    c = copies(noise, np.arange(6) % 3, R, labels, shift=3)
    assert c["near_copies"] == 0, f"noise must not be a near-copy, got {c['near_copies']} (ratios {c['_ratio']})"


# ---------------------------------------------------------------- membership inference controls

def _fit(X, y, epochs, seed=0):
    import torch

    from edge_ser.config import ModelConfig
    from edge_ser.models import build_model, input_stats, set_input_stats
    from edge_ser.schedule import Schedule, train_schedule

    torch.manual_seed(seed)
    mc = ModelConfig(num_classes=int(y.max()) + 1, n_mels=X.shape[1], num_frames=X.shape[2], channels=(16, 32))
    net = build_model(mc, seed=seed)
    set_input_stats(net, *input_stats(X))
    train_schedule(net, X, y, Schedule(optimizer="adam", lr=3e-3, epochs=epochs, batch_size=16, seed=seed))
    return net


def test_mia_is_chance_on_a_model_that_never_saw_members_and_high_on_an_overfit_one(demo_small):
    """Members and non-members are disjoint random draws of the same clips, each with a random label (canaries:
    only memorisation can make a model confident in them). A model trained on a third draw must give AUC near
    0.5; one over-fit on the members far above it."""
    from edge_ser.train import predict_logits

    fs = demo_small
    rng = np.random.default_rng(3)
    order = rng.permutation(len(fs))
    mem, non, other = order[:32], order[32:64], order[64:96]
    X = fs.X
    y = rng.integers(0, len(fs.classes), len(fs))

    def attack(net):
        s = confidence_scores(predict_logits(net, X), y)
        return attack_summary(s[mem], s[non])

    overfit = attack(_fit(X[mem], y[mem], epochs=80))
    control = attack(_fit(X[other], y[other], epochs=80))
    assert abs(control["auc"] - 0.5) < 0.15, f"control model (never saw members) gave AUC {control['auc']}"
    assert overfit["auc"] > 0.85, f"over-fit model gave only AUC {overfit['auc']}"
    assert overfit["tpr_at_1pct_fpr"] > control["tpr_at_1pct_fpr"], f"over-fit {overfit} vs control {control}"


# ---------------------------------------------------------------- the whole audit

@pytest.fixture(scope="module")
def demo_small():
    from edge_ser.config import FeatureConfig
    from edge_ser.corpora import load_features

    fs, _ = load_features("demo", FeatureConfig(**SMALL_FEATURES))
    return fs


def _write(path, X, y, fs, test_speakers, method):
    """A pack of the given samples, for θ0 of a small ConvNet, trained the way real-subset packs are."""
    from edge_ser.config import FeatureConfig, ModelConfig
    from edge_ser.models import build_model, input_stats, set_input_stats, state_arrays
    from edge_ser.packfile import write_pack
    from edge_ser.schedule import Schedule

    fc = FeatureConfig(**SMALL_FEATURES)
    mc = ModelConfig(num_classes=len(fs.classes), n_mels=fc.n_mels, num_frames=fc.num_frames, channels=(16, 32))
    net = build_model(mc, seed=0)
    set_input_stats(net, *input_stats(fs.X))
    theta0 = state_arrays(net)
    sched = Schedule(optimizer="adam", lr=1e-3, epochs=40, batch_size=16, augment=True, shift=8)
    return write_pack(path, X=X.astype(np.float32), y=y.astype(np.int64), classes=fs.classes, feature_config=fc,
                      model_config=mc, schedule=sched, theta0=theta0, golden_inputs=X[:2].astype(np.float32),
                      golden_logits=np.zeros((2, len(fs.classes)), np.float32), golden_tolerance=1.0,
                      provenance={"method": method, "ipc": 5, "test_speakers": test_speakers})


@pytest.fixture(scope="module")
def split(demo_small):
    from edge_ser.data import default_test_speakers

    held = default_test_speakers(demo_small.speaker_ids())
    train, test = demo_small.split_speakers(held)
    return train, test, held


def test_audit_flags_a_pack_of_real_clips(tmp_path, demo_small, split):
    train, _, held = split
    rng = np.random.default_rng(4)
    idx = np.concatenate([rng.choice(np.flatnonzero(train.y == c), 5, replace=False) for c in range(len(train.classes))])
    path = tmp_path / "real.pack"
    _write(path, train.X[idx], train.y[idx], demo_small, held, "random")
    r = audit(path, demo_small, out_dir=tmp_path / "audit", config=QUICK)
    assert r["near_copies"] == r["samples"] == len(idx), f"every real clip must be a near-copy: {r['near_copies']}"
    assert r["reid_rate"] > 2 * r["reid_chance"], (
        f"speaker of real clips re-identified {r['reid_rate']} vs chance {r['reid_chance']} "
        f"(attacker accuracy on unseen real clips {r['reid_attacker_accuracy']})")
    assert r["verdict"].startswith("LEAKS"), r["verdict"]
    assert r["audio"][0]["spectral_correlation"] > 0.99, "a real clip's pack sample is its nearest real clip"
    assert (tmp_path / "audit" / r["audio"][0]["pack_wav"]).stat().st_size > 1000, "no Griffin-Lim audio written"
    assert json.loads((tmp_path / "audit" / "report.json").read_text())["near_copies"] == r["near_copies"]


@pytest.mark.slow
def test_audit_does_not_flag_a_pack_of_noise(tmp_path, demo_small, split):
    train, _, held = split
    rng = np.random.default_rng(5)
    mean, std = train.X.mean(axis=(0, 2)), train.X.std(axis=(0, 2))
    X = (mean[None, :, None] + std[None, :, None] * rng.standard_normal((20, *train.X.shape[1:])))
    y = np.repeat(np.arange(len(train.classes)), 5)
    path = tmp_path / "noise.pack"
    _write(path, X, y, demo_small, held, "noise")
    r = audit(path, demo_small, out_dir=tmp_path / "audit", config=QUICK)
    assert r["near_copies"] == 0, f"noise samples flagged as near-copies: ratio min {r['ratio_min']}"
    assert r["reid_rate"] <= 2 * r["reid_chance"], f"noise 're-identified' {r['reid_rate']} vs {r['reid_chance']}"


@pytest.mark.slow
def test_cli_audit_json_keys_and_mismatch_refused(tmp_path, demo_small, split):
    train, _, held = split
    path = tmp_path / "real.pack"
    _write(path, train.X[:8], np.arange(8) % len(train.classes), demo_small, held, "random")
    env_out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "edge_ser", "pack", "audit", str(path), "demo", "--json",
                           "--reid-epochs", "3", "--audio-examples", "0", "--out", str(env_out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("samples", "near_copies", "reid_rate", "reid_chance", "mia_auc", "mia_tpr_at_1pct_fpr", "epsilon"):
        assert key in out, f"`pack audit --json` lacks {key!r}"
    assert out["epsilon"] is None, "a non-DP pack must report epsilon null"

    # a corpus the pack was not made from (other classes) is refused in one line
    from edge_ser.data import FeatureSet

    other = FeatureSet(train.X[:20], np.arange(20) % 2, train.speakers[:20], ("a", "b"))
    with pytest.raises(AuditError, match="classes"):
        audit(path, other, config=QUICK)
    with pytest.raises(ValueError, match="unknown audit setting"):
        AuditConfig.from_params(shadowz=3)


def test_pack_records_its_privacy_and_no_clip_indices_or_server_paths(tmp_path, monkeypatch):
    """A pack says whether it holds real clips, and its provenance points at no corpus file, clip or server path."""
    import edge_ser
    from edge_ser.inspection import inspect_pack
    from edge_ser.packfile import load_pack

    monkeypatch.setenv("EDGE_SER_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.pack"
    info = edge_ser.pack("demo", out, method="random", ipc=1, progress=False, params={"steps": 20})
    assert info["real_clips"] is True, "a random real subset must be declared as real clips"
    p = load_pack(out, public_key=tmp_path / "home" / "signing.pub")
    assert p.provenance["privacy"]["real_clips"] is True and p.provenance["privacy"]["epsilon"] is None
    text = json.dumps(p.provenance)
    for leak in ("indices", "workdir", "experts", "val_speakers", str(tmp_path)):
        assert leak not in text, f"the pack's provenance carries {leak!r}"
    assert isinstance(p.provenance["train_speakers"], int), "training speakers' ids must not be listed"
    line = inspect_pack(out, public_key=tmp_path / "home" / "signing.pub")["privacy"]
    assert line.startswith("HOLDS REAL CLIPS"), line
