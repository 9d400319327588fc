"""ONNX export: fp32 matches torch, int8 (QDQ, per-channel) agrees with fp32, metadata travels in every file."""
from __future__ import annotations

import json
from pathlib import Path

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


# ------------------------------------------------------------------ the TFLite converter process (no TensorFlow needed)

def _fake_converter(monkeypatch, tmp_path, script: str):
    """Make export_tflite's converter process run ``script`` (cwd = its work folder) with temp folders in tmp_path."""
    import sys
    import tempfile

    from edge_ser import export_tflite

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(export_tflite, "_child_command", lambda work: [sys.executable, "-c", script])
    return export_tflite


def test_tflite_converter_process_imports_no_torch(tmp_path):
    """The converter entry (``python -m edge_ser.export_tflite WORKDIR``) never imports torch: TensorFlow and torch
    are then never resident in one process. -X importtime lists every module the child imports."""
    import os
    import re
    import subprocess
    import sys

    from edge_ser import export_tflite

    env = export_tflite._child_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(export_tflite.__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-X", "importtime", *export_tflite._child_command(str(tmp_path))[1:]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1                                    # no inputs in the folder: a clean failure
    assert "inputs.json" in json.loads((tmp_path / "error.json").read_text())["error"]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported and "edge_ser.files" in imported
    assert not [m for m in imported if re.match(r"(torch|tensorflow)(\.|$)", m)]


@pytest.mark.parametrize("script, expected", [
    ("import sys; print('Keras prints its signature'); sys.stderr.write('I0000 absl noise\\nTraceback (most recent "
     "call last):\\nValueError: boom\\n'); sys.exit(3)",
     "TFLite int8 conversion failed: the converter process exited with status 3: ValueError: boom"),
    ("import json, sys; print('noise'); open('error.json', 'w').write(json.dumps({'error': 'TFLite export needs "
     "TensorFlow (no module)\\n named tensorflow'})); sys.exit(1)",
     "TFLite export needs TensorFlow (no module) named tensorflow"),
    ("import os, signal, sys; sys.stderr.write('noise\\n'); sys.stderr.flush(); os.kill(os.getpid(), signal.SIGKILL)",
     "TFLite int8 conversion failed: the converter process was killed by signal 9 (out of memory?): noise"),
    ("import sys; sys.exit(0)",          # exits 0 without a result: still an error, not a KeyError
     "TFLite int8 conversion failed: the converter process exited with status 0"),
])
def test_tflite_converter_failure_is_one_line(monkeypatch, tmp_path, capfd, script, expected):
    export_tflite = _fake_converter(monkeypatch, tmp_path, script)
    with pytest.raises(RuntimeError) as info:
        export_tflite._convert_in_child({"metadata": {}}, {"calib": np.zeros((2, 4, 5), np.float32)}, timeout=120)
    assert str(info.value) == expected
    assert list(tmp_path.iterdir()) == []                          # its temporary folder is gone
    out, err = capfd.readouterr()
    assert "noise" not in out + err and "Keras" not in out + err   # the child's output never reaches the terminal


def test_tflite_converter_timeout_stops_it(monkeypatch, tmp_path):
    import time

    export_tflite = _fake_converter(monkeypatch, tmp_path, "import time; time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not finish in 1 s; its process was stopped"):
        export_tflite._convert_in_child({"metadata": {}}, {"calib": np.zeros((2, 4, 5), np.float32)}, timeout=1)
    assert time.monotonic() - t0 < 30
    assert list(tmp_path.iterdir()) == []


def test_tflite_converter_inputs_round_trip(monkeypatch, tmp_path):
    """What the parent writes is what the child reads (dtypes, values, metadata), and its bytes come back."""
    script = ("import json, numpy as np; c = json.load(open('inputs.json')); z = np.load('inputs.npz');"
              "ok = z['calib'].dtype == np.float32 and z['mean'].dtype == np.float64 and c['metadata']['k'] == 'é';"
              "open('model.tflite', 'wb').write(b'TFL3' + z['calib'].tobytes());"
              "open('result.json', 'w').write(json.dumps({'tensorflow': 'x', 'ok': bool(ok)}))")
    export_tflite = _fake_converter(monkeypatch, tmp_path, script)
    calib = np.arange(40, dtype=np.float32).reshape(2, 4, 5)
    flat, report = export_tflite._convert_in_child({"metadata": {"k": "é"}},
                                                   {"calib": calib, "mean": np.zeros(4)}, timeout=120)
    assert report == {"tensorflow": "x", "ok": True}
    assert flat == b"TFL3" + calib.tobytes()
    assert list(tmp_path.iterdir()) == []


def test_export_failure_carries_the_converter_process(monkeypatch, tmp_path):
    from edge_ser.config import default_model_config
    from edge_ser.models import build_model

    (tmp_path / "tmp").mkdir()
    export_tflite = _fake_converter(monkeypatch, tmp_path / "tmp", "import sys; sys.exit(5)")
    model = build_model(default_model_config(8), seed=0)
    X = np.zeros((3, model.cfg.n_mels, model.cfg.num_frames), np.float32)
    with pytest.raises(RuntimeError, match="exited with status 5") as info:
        export_tflite.export_tflite_int8(model, X, tmp_path / "m.tflite", {"pack_id": "p"})
    assert info.value.converter_process == {"peak_rss_mb": None, "torch_imported": None, "seconds": None}
    assert not (tmp_path / "m.tflite").exists() and list((tmp_path / "tmp").iterdir()) == []


def test_train_local_peak_counts_the_converter_process(tmp_path):
    """peak_rss_mb is the larger of train-local's process and its converter process, also when the converter's
    model was refused or the export failed after it ran (then ru_maxrss of the children stands in)."""
    from edge_ser import local, memory

    assert local.converter_peak_rss_mb({"onnx": {"file": "model.onnx"}}) is None
    assert local.peak_rss_with_converter_mb({}) >= memory.peak_rss_mb() * 0.99
    big = {"tflite": {"file": "model.int8.tflite", "converter_process": {"peak_rss_mb": 123456.0}}}
    assert local.converter_peak_rss_mb(big) == local.peak_rss_with_converter_mb(big) == 123456.0
    failed = {"tflite": {"file": None, "error": "x", "converter_process": {"peak_rss_mb": None}}}
    assert local.converter_peak_rss_mb(failed) == round(memory.peak_rss_mb(children=True), 1)
    (tmp_path / "model.int8.tflite").write_bytes(b"x")
    files = {"tflite": {"agreement_vs_fp32": {"argmax_agreement": 0.1}, "converter_process": {"peak_rss_mb": 700.0}}}
    local.refuse_collapsed_int8(tmp_path, files, 0.8, lambda msg: None)
    assert files["tflite"]["refused"] and local.converter_peak_rss_mb(files) == 700.0
    assert not (tmp_path / "model.int8.tflite").exists()
