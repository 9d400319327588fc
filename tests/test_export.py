"""ONNX export: fp32 matches torch, int8 (QDQ, per-channel) agrees with fp32, metadata travels in every file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _packlike import class_data, make_pack

from edge_ser.local import train_from_pack


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "model"
    train_from_pack(make_pack(), out, threads=1, tflite=False)
    return out


def test_onnx_fp32_matches_torch(model_dir):
    from edge_ser.runtime import load_runtime

    X, _ = class_data(4, seed=7)
    ref = load_runtime(model_dir, "torch").predict_logits(X)
    got = load_runtime(model_dir, "onnx").predict_logits(X)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_onnx_graph_is_clean_and_batch_dynamic(model_dir):
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions (eval-mode export)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    q = onnx.load(str(model_dir / "model.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}


def test_int8_agrees_with_fp32_on_argmax(model_dir):
    from edge_ser.runtime import load_runtime

    X, y = class_data(10, seed=11)
    fp32 = load_runtime(model_dir, "onnx").predict_logits(X).argmax(1)
    int8 = load_runtime(model_dir, "onnx-int8").predict_logits(X).argmax(1)
    assert np.mean(fp32 == int8) >= 0.9
    info = json.loads((model_dir / "model.json").read_text())
    assert info["files"]["onnx-int8"]["agreement_vs_fp32"]["argmax_agreement"] >= 0.9


def test_streamed_calibration_gives_the_same_int8_model(model_dir, tmp_path, monkeypatch):
    """Percentile calibration collected a few windows at a time (bounded memory) yields exactly the model
    onnxruntime's all-at-once collection yields: the same bytes."""
    from edge_ser import export
    from edge_ser.export import quantize_int8

    calls = []
    streamed_collect = export._collect_histograms_streamed
    monkeypatch.setattr(export, "_collect_histograms_streamed",
                        lambda *a, **k: calls.append(k["stride"]) or streamed_collect(*a, **k))
    X, _ = class_data(7, seed=5)                                # 7 x classes windows: stride 3 does not divide it
    meta = {"edge_ser.pack_id": "t"}
    one_shot, streamed = tmp_path / "a.onnx", tmp_path / "b.onnx"
    quantize_int8(model_dir / "model.onnx", one_shot, X, meta, calib_stride=None)
    assert calls == []
    quantize_int8(model_dir / "model.onnx", streamed, X, meta, calib_stride=3)
    assert calls == [3]                                         # the streamed collection did run
    assert one_shot.read_bytes() == streamed.read_bytes()
    other = tmp_path / "c.onnx"                                 # and the test can fail: other data, other model
    quantize_int8(model_dir / "model.onnx", other, X[: len(X) // 2] * 3.0, meta, calib_stride=3)
    assert other.read_bytes() != streamed.read_bytes()


def test_metadata_in_every_file(model_dir):
    import onnx

    info = json.loads((model_dir / "model.json").read_text())
    for name in ("model.onnx", "model.int8.onnx"):
        props = {p.key: p.value for p in onnx.load(str(model_dir / name)).metadata_props}
        assert props["edge_ser.pack_id"] == info["pack_id"]
        assert json.loads(props["edge_ser.classes"]) == info["classes"]
        assert json.loads(props["edge_ser.feature_config"]) == info["feature_config"]
    with np.load(model_dir / "model.npz", allow_pickle=False) as z:
        meta = json.loads(str(z["__edge_ser_meta__"]))
    assert meta["edge_ser.pack_id"] == info["pack_id"]


def test_agreement_warning_when_int8_drops():
    from edge_ser.export import agreement

    a = np.eye(4, dtype=np.float32)
    assert agreement(a, a)["argmax_agreement"] == 1.0
    assert agreement(a, a[::-1].copy())["argmax_agreement"] == 0.0
