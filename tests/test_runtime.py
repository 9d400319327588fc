"""Runtime facade (folder and single files), evaluate on a tiny real-audio corpus, doctor."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _packlike import CLASSES, FEATURES, class_data, make_pack

from edge_ser.local import train_from_pack


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "model"
    train_from_pack(make_pack(), out, threads=1, tflite=False)
    return out


def test_load_folder_defaults_to_int8(model_dir):
    from edge_ser.runtime import load_runtime

    r = load_runtime(model_dir)
    assert r.name == "onnx-int8" and r.classes == CLASSES and r.feature_config == FEATURES
    X, _ = class_data(2, seed=3)
    p = r.predict_proba(X)
    assert p.shape == (8, 4) and p.dtype == np.float32 and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("fname,name", [("model.onnx", "onnx"), ("model.int8.onnx", "onnx-int8"), ("model.npz", "torch")])
def test_load_single_file(model_dir, fname, name):
    from edge_ser.runtime import load_runtime

    r = load_runtime(model_dir / fname)
    assert r.name == name and r.classes == CLASSES and r.feature_config == FEATURES
    assert r.predict_logits(class_data(1, 5)[0]).shape == (4, 4)


def test_bad_inputs_give_clear_errors(model_dir, tmp_path):
    from edge_ser.runtime import load_runtime

    with pytest.raises(ValueError, match="unknown runtime"):
        load_runtime(model_dir, "caffe")
    with pytest.raises(ValueError, match="model.int8.tflite"):
        load_runtime(model_dir, "tflite")
    with pytest.raises(ValueError, match="expects log-Mels"):
        load_runtime(model_dir, "onnx").predict_logits(np.zeros((1, 64, 298), np.float32))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load ONNX"):
        load_runtime(junk)
    with pytest.raises(ValueError, match="no model.json"):
        load_runtime(tmp_path)


def _tiny_ravdess(root, rng):
    """A few real wav files in the RAVDESS layout: class = a band of tones (learnable by the test model)."""
    import soundfile as sf

    codes = {"neutral": "01", "happy": "03", "sad": "04", "angry": "05"}
    sr = 16000
    t = np.arange(int(0.5 * sr)) / sr
    for actor in (1, 2, 3):
        d = root / f"Actor_{actor:02d}"
        d.mkdir(parents=True)
        for ci, code in enumerate(codes.values()):
            for rep in (1, 2):
                f0 = 300 * (ci + 1) * (1.5 ** ci)
                wave = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(len(t))
                sf.write(d / f"03-01-{code}-01-01-{rep:02d}-{actor:02d}.wav", wave.astype(np.float32), sr,
                         subtype="PCM_16")


def test_evaluate_on_tiny_corpus(model_dir, tmp_path):
    from edge_ser.evaluate import evaluate, format_evaluation

    _tiny_ravdess(tmp_path / "corpus", np.random.default_rng(0))
    r = evaluate(model_dir, tmp_path / "corpus", runtime="onnx")
    for key in ("uar", "wa", "f1", "confusion", "recall", "n", "runtime", "classes"):
        assert key in r
    assert r["speakers"] == ["Actor_03"] and r["n"] == 8  # the model's test speakers from model.json
    assert r["classes"] == list(CLASSES) and 0.0 <= r["uar"] <= 1.0
    assert "UAR" in format_evaluation(r)
    r_all = evaluate(model_dir, tmp_path / "corpus", speakers="1-3", runtime="onnx-int8")
    assert r_all["n"] == 24 and r_all["runtime"] == "onnx-int8"


def test_evaluate_refuses_disjoint_classes(model_dir, tmp_path):

    from edge_ser.evaluate import evaluate
    from edge_ser.export import set_onnx_metadata

    _tiny_ravdess(tmp_path / "corpus", np.random.default_rng(1))
    f = tmp_path / "other.onnx"
    f.write_bytes((model_dir / "model.onnx").read_bytes())
    set_onnx_metadata(f, {"edge_ser.classes": json.dumps(["w", "x", "y", "z"])})
    with pytest.raises(ValueError, match="none in common"):
        evaluate(f, tmp_path / "corpus")


@pytest.mark.slow
def test_doctor_reports():
    from edge_ser.doctor import doctor, format_doctor

    d = doctor()
    assert set(d["checks"]) >= {"numpy", "onnxruntime", "torch", "onnx-inference", "training-step"}
    assert d["checks"]["onnx-inference"]["ok"] and d["checks"]["training-step"]["ok"]
    assert "ready:" in format_doctor(d)
