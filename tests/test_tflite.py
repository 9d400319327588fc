"""Full-integer int8 TFLite export: convert a small trained ConvNet, run it on the real LiteRT interpreter.

Checks agreement with torch, logit tolerance, metadata round trip, file size and that the graph is int8 only.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edge_ser.config import FeatureConfig, TrainConfig, default_model_config
from edge_ser.export_tflite import FORMAT, is_fully_integer, load_tflite, read_tflite_metadata, tflite_graph

HAVE_RUNTIME = any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime"))
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
#: every test here converts with TensorFlow (seconds to import, ~1 GB): the full tier only
pytestmark = pytest.mark.slow

needs_all = pytest.mark.skipif(
    not (HAVE_RUNTIME and HAVE_TF),
    reason="TFLite export/runtime not installed: pip install 'tensorflow-cpu==2.21.0' 'ai-edge-litert==2.3.0' "
           "(the [tflite] extra)")

CLASSES = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


def _toy_data(n, seed):
    """Log-Mel-like arrays whose class shows as a raised band block: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 8
    X = rng.normal(-6.0, 1.5, size=(n, 64, 298)).astype(np.float32)
    X += np.linspace(0, 4, 64, dtype=np.float32)[None, :, None]
    for i, c in enumerate(y):
        X[i, 8 * c:8 * c + 8, :] += 2.5
    return X, y


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not (HAVE_RUNTIME and HAVE_TF):
        pytest.skip("TFLite export/runtime not installed (pip install 'edge-ser[tflite]')")
    import torch

    from edge_ser.export_tflite import export_tflite_int8
    from edge_ser.models import build_model, input_stats, set_input_stats
    from edge_ser.train import fit

    torch.set_num_threads(1)
    X, y = _toy_data(64, 0)
    model = build_model(default_model_config(8), seed=0)
    set_input_stats(model, *input_stats(X))
    fit(model, X, y, TrainConfig(epochs=2, batch_size=16, lr=3e-3, specaugment=False, seed=0), num_classes=8)
    model.eval()
    path = tmp_path_factory.mktemp("tfl") / "model.int8.tflite"
    meta = {"pack_id": "pack-123", "classes": CLASSES, "feature_config": FeatureConfig().to_dict()}
    info = export_tflite_int8(model, X, path, meta)
    return model, info, path


@needs_all
def test_int8_matches_torch_on_unseen_inputs(exported):
    import torch

    model, info, path = exported
    Xt, _ = _toy_data(48, 1)
    runner = load_tflite(path, threads=1)
    lite = runner.predict_logits(Xt)
    with torch.no_grad():
        ref = model(torch.from_numpy(Xt)).numpy()
    assert lite.shape == ref.shape == (48, 8) and lite.dtype == np.float32
    agreement = np.mean(lite.argmax(1) == ref.argmax(1))
    assert agreement >= 0.85, f"int8 argmax agrees with torch on only {agreement:.2f}"
    span = float(ref.max() - ref.min())
    assert np.abs(lite - ref).max() <= 0.05 * span + 1e-3, (np.abs(lite - ref).max(), span)
    assert info["agreement"] >= 0.85 and info["bytes"] == path.stat().st_size
    proba = runner.predict_proba(Xt[:3])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    # a single (n_mels, frames) window works too and gives the same answer
    np.testing.assert_allclose(runner.predict_logits(Xt[0]), lite[:1], atol=1e-6)


@needs_all
def test_metadata_round_trip(exported):
    _, _, path = exported
    runner = load_tflite(path)
    assert runner.name == "tflite"
    assert runner.classes == tuple(CLASSES) and runner.pack_id == "pack-123"
    assert runner.feature_config == FeatureConfig()
    meta = read_tflite_metadata(path)
    assert meta["format"] == FORMAT and meta["model_config"]["num_classes"] == 8
    assert read_tflite_metadata(path.read_bytes(), name="no-such-entry") == {}


@needs_all
def test_small_and_fully_integer(exported):
    _, info, path = exported
    assert path.stat().st_size <= 100 * 1024, f"int8 default model is {path.stat().st_size} bytes"
    graph = tflite_graph(path)
    assert graph["ops"][0] == "QUANTIZE" and graph["ops"][-1] == "DEQUANTIZE"
    assert {"CONV_2D", "AVERAGE_POOL_2D", "MEAN", "FULLY_CONNECTED"} <= set(graph["ops"])
    consts = [t for t in graph["tensors"] if t["constant"]]
    assert consts and all(t["dtype"] in ("int8", "int32") for t in consts)
    floats = [t for t in graph["tensors"] if t["dtype"] == "float32"]
    assert len(floats) == 2  # the model input and output only
    assert is_fully_integer(graph) and info["fully_integer"]
    # TensorFlow ran in a process of its own, without torch (what keeps train-local under 1 GB)
    assert info["converter_process"]["torch_imported"] is False
    assert 100 < info["converter_process"]["peak_rss_mb"] < 1024
    # the real interpreter sees the same: int8 weights, float32 only at the edges
    runner = load_tflite(path)
    details = runner._it.get_tensor_details()
    assert sum(d["dtype"] == np.float32 for d in details) == 2
    assert any(d["dtype"] == np.int8 for d in details)


def test_fully_integer_check_can_fail():
    graph = {"inputs": [0], "outputs": [3], "tensors": [
        {"dtype": "float32", "constant": False}, {"dtype": "int8", "constant": False},
        {"dtype": "float32", "constant": True}, {"dtype": "float32", "constant": False}],
        "op_details": [{"op": "QUANTIZE", "inputs": [0], "outputs": [1]},
                       {"op": "CONV_2D", "inputs": [1, 2], "outputs": [3]}]}
    assert not is_fully_integer(graph)
    graph["tensors"][2]["dtype"] = "int8"
    assert not is_fully_integer(graph)  # CONV_2D writing a float tensor is still not integer


@needs_all
def test_bad_inputs_give_clear_errors(exported, tmp_path):
    from edge_ser.config import ModelConfig
    from edge_ser.export_tflite import export_tflite_int8
    from edge_ser.models import build_model

    model, _, path = exported
    runner = load_tflite(path)
    with pytest.raises(ValueError, match="expected log-Mels"):
        runner.predict_logits(np.zeros((2, 40, 298), np.float32))
    bad = tmp_path / "junk.tflite"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        load_tflite(bad)
    with pytest.raises(OSError, match="cannot read"):
        load_tflite(tmp_path / "missing.tflite")
    X = np.full((2, 64, 298), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        export_tflite_int8(model, X, tmp_path / "m.tflite", {})
    with pytest.raises(ValueError, match="ConvNet only"):
        export_tflite_int8(build_model(ModelConfig(arch="cnn6"), 0), X, tmp_path / "m.tflite", {})
    assert not (tmp_path / "m.tflite").exists()


@needs_all
def test_conversion_is_quiet_and_repeatable(exported, tmp_path, capfd):
    """TensorFlow's native and absl log lines (and Keras's printed signature) never reach the terminal, and the
    same model and calibration data give the same bytes again."""
    from edge_ser.export_tflite import export_tflite_int8

    model, _, path = exported
    X, _ = _toy_data(64, 0)
    capfd.readouterr()
    again = tmp_path / "again.tflite"
    export_tflite_int8(model, X, again, {"pack_id": "pack-123", "classes": CLASSES,
                                          "feature_config": FeatureConfig().to_dict()})
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out[-500:], err[-500:])
    assert again.read_bytes() == path.read_bytes()


@needs_all
def test_string_metadata_form_from_runtime_module(exported, tmp_path):
    """The export facade passes edge_ser.runtime.model_metadata() strings; the runner reads those too."""
    import json

    from edge_ser.export_tflite import METADATA_NAME, add_tflite_metadata
    from edge_ser.runtime import model_metadata

    _, _, path = exported
    fc = FeatureConfig(n_mels=64, clip_seconds=3.0, f_max=7600.0)
    meta = model_metadata("pack-strings", CLASSES[::-1], fc)
    rewritten = tmp_path / "strings.tflite"
    rewritten.write_bytes(add_tflite_metadata(path.read_bytes(), METADATA_NAME, json.dumps(meta).encode()))
    runner = load_tflite(rewritten)
    assert runner.pack_id == "pack-strings" and runner.classes == tuple(CLASSES[::-1])
    assert runner.feature_config == fc
    assert read_tflite_metadata(rewritten) == meta  # replaced, not appended beside the old entry
    x = _toy_data(2, 3)[0]
    np.testing.assert_allclose(runner.predict_logits(x), load_tflite(path).predict_logits(x), atol=1e-6)
