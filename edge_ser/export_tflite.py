"""Full-integer int8 TFLite export of the compact ConvNet, and a runner on a real TFLite runtime.

Export rebuilds the network in Keras with BatchNorm folded into the convolutions and converts it with
TensorFlow's ``TFLiteConverter`` (representative dataset = calibration log-Mels, int8 builtins only,
per-channel conv weights). The graph is int8 end to end: QUANTIZE -> RESHAPE -> MUL/ADD (the per-band
input normalisation) -> AVERAGE_POOL_2D (stem) -> [CONV_2D(+ReLU) -> AVERAGE_POOL_2D] x blocks -> MEAN (time) -> RESHAPE ->
FULLY_CONNECTED -> DEQUANTIZE; input is float32 raw log-Mels ``(1, n_mels, frames)`` and output float32
logits, so callers never see scales or zero points.

The pack id, class names, feature and model config travel *inside* the file as JSON in a TFLite
``Model.metadata`` entry named ``"edge_ser"`` (:data:`METADATA_NAME`); :func:`read_tflite_metadata` reads
it back with a tiny dependency-free flatbuffer reader, so a device needs only a TFLite interpreter.

The conversion runs in a child process (``python -m edge_ser.export_tflite WORKDIR``) that never imports
torch: the caller (which has torch loaded) writes the folded weights, the calibration windows and the metadata as
plain numpy/JSON into a private temporary folder, the child builds the Keras model from them, converts, writes the
.tflite and exits. TensorFlow (~500 MB) is then never resident beside torch, and its memory is returned when the
child ends. The caller verifies the written file on the TFLite runtime as before.

Export needs ``tensorflow-cpu`` (the ``[tflite]`` extra); running needs ``ai-edge-litert`` or, where that is
what the device has, ``tflite-runtime``.

>>> info = export_tflite_int8(model, calib_X, "model.int8.tflite", {"pack_id": "abc", "classes": names})
>>> runner = load_tflite("model.int8.tflite")
>>> runner.predict_proba(X[:4]).shape
(4, 8)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .files import atomic_write

METADATA_NAME = "edge_ser"
FORMAT = "edge-ser-tflite/1"
EXPORT_INSTALL = "pip install 'tensorflow-cpu==2.21.0'  (or: pip install 'edge-ser[tflite]')"
RUNTIME_INSTALL = "pip install 'ai-edge-litert==2.3.0'  (or on older devices: pip install tflite-runtime)"
#: the converter process is stopped after this many seconds (a conversion takes 10-30 s on a 2-core machine)
CONVERT_TIMEOUT_S = 600.0

# TFLite schema enums we report by name (tensorflow/lite/schema/schema.fbs)
_TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool",
                 7: "int16", 9: "int8", 10: "float64", 17: "int4", 18: "bfloat16"}
_BUILTIN_OPS = {0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D",
                6: "DEQUANTIZE", 9: "FULLY_CONNECTED", 17: "MAX_POOL_2D", 18: "MUL", 19: "RELU", 22: "RESHAPE",
                25: "SOFTMAX", 34: "PAD", 39: "TRANSPOSE", 40: "MEAN", 41: "SUB", 42: "DIV", 43: "SQUEEZE",
                74: "SUM", 114: "QUANTIZE"}


# ------------------------------------------------------------------ export

def export_tflite_int8(model, calib_X: np.ndarray, path, metadata: Optional[dict] = None,
                       max_calib: int = 200, seed: int = 0, timeout: float = CONVERT_TIMEOUT_S) -> Dict:
    """Convert a trained :class:`~edge_ser.models.ConvNet` to a full-integer int8 ``.tflite`` file.

    ``calib_X`` (N, n_mels, frames) float32 raw log-Mels calibrates the activation ranges (at most
    ``max_calib`` of them, drawn with ``seed``); all of ``calib_X`` (up to 512) is then run through the
    written file on the real interpreter and compared with the torch model's argmax.
    ``metadata`` (JSON-able: e.g. ``pack_id``, ``classes``, ``feature_config``) is stored in the file.
    TensorFlow runs in a child process without torch (module docstring), stopped after ``timeout`` seconds;
    its failures come back as one ``RuntimeError`` line.

    Returns ``{"path", "bytes", "seconds", "converter", "runtime", "agreement", "max_abs_logit_diff",
    "calib_examples", "ops", "fully_integer", "converter_process"}``; ``converter_process`` has the child's
    own ``peak_rss_mb``, ``seconds`` and ``torch_imported`` (False). An exception raised once the child has been
    started carries that dict (values None where unknown) as its ``converter_process`` attribute.

    >>> info = export_tflite_int8(model, synthetic_X, "out/model.int8.tflite",
    ...                           {"pack_id": pack_id, "classes": classes, "feature_config": fc.to_dict()})
    >>> info["agreement"] >= 0.9
    True
    """
    import torch

    t0 = time.perf_counter()
    X = _check_calib(model, calib_X)
    meta = _metadata_json(model, metadata)
    config, arrays = _keras_inputs(model)
    arrays["calib"] = _calibration_subset(X, max_calib, seed)
    config["metadata"] = meta
    process = {"peak_rss_mb": None, "torch_imported": None, "seconds": None}   # (not known when it failed)
    try:
        flat, child = _convert_in_child(config, arrays, timeout)
        process = {k: child.get(k) for k in process}
        del arrays

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, flat)   # 0644 like the other model files (mkstemp would make it 0600)
        seconds = time.perf_counter() - t0

        runner = load_tflite(path, threads=1)
        check = X[:512]
        lite = runner.predict_logits(check)
        was_training = model.training
        model.eval()
        with torch.no_grad():  # small batches: a device exporting under a memory budget
            ref = np.concatenate([model(torch.from_numpy(check[i:i + 16])).numpy()
                                  for i in range(0, len(check), 16)])
        model.train(was_training)
        graph = tflite_graph(flat)
    except Exception as exc:    # the converter process ran: its memory still counts (edge_ser.local)
        exc.converter_process = process
        raise
    return {
        "path": str(path),
        "bytes": len(flat),
        "seconds": round(seconds, 3),
        "converter": f"tensorflow-cpu {child['tensorflow']} TFLiteConverter (full-integer int8, per-channel weights)",
        "runtime": runner.runtime,
        "agreement": float(np.mean(lite.argmax(1) == ref.argmax(1))),
        "max_abs_logit_diff": float(np.abs(lite - ref).max()),
        "calib_examples": int(min(len(X), max_calib)),
        "checked_examples": int(len(check)),
        "ops": graph["ops"],
        "fully_integer": is_fully_integer(graph),
        "converter_process": process,
    }


# ------------------------------------------------------------------ the converter process

def _child_command(work: str) -> List[str]:
    """The converter process: this module run as a script on ``work`` (tests substitute others)."""
    return [sys.executable, "-m", "edge_ser.export_tflite", work]


def _child_env() -> Dict[str, str]:
    """This environment, with the folder holding this ``edge_ser`` first on the path (the child imports the same
    code even where edge_ser is not installed, or another copy is) unless that folder is site-packages, and
    TensorFlow's C++ logging at warnings and up."""
    import site

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    installed = {str(Path(d).resolve()) for d in site.getsitepackages() + [site.getusersitepackages()]}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _convert_in_child(config: dict, arrays: Dict[str, np.ndarray], timeout: float = CONVERT_TIMEOUT_S):
    """Run the conversion in a fresh ``python`` (not a fork of this torch process) on inputs written to a
    private temporary folder, removed afterwards whatever happens. The child's stdout and stderr (TensorFlow's
    native and absl logging included) go to a file there, never to the terminal. Returns (flatbuffer bytes with
    the metadata entry, the child's report); raises ``RuntimeError`` with one line on failure or timeout."""
    work = tempfile.mkdtemp(prefix="edge-ser-tflite-")
    try:
        np.savez(os.path.join(work, "inputs.npz"), **arrays)
        with open(os.path.join(work, "inputs.json"), "w") as fh:
            json.dump(config, fh, sort_keys=True)
        log_path = os.path.join(work, "converter.log")
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.run(_child_command(work), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      cwd=work, env=_child_env(), timeout=timeout)
            except subprocess.TimeoutExpired:    # (run() has killed and reaped it)
                raise RuntimeError(f"TFLite int8 conversion did not finish in {timeout:.0f} s; its process "
                                   "was stopped") from None
            except OSError as exc:
                raise RuntimeError(f"TFLite int8 conversion could not start {sys.executable}: "
                                   f"{exc.strerror or exc}") from None
        result = os.path.join(work, "result.json")
        if proc.returncode != 0 or not os.path.exists(result):
            raise RuntimeError(_child_error(work, log_path, proc.returncode))
        with open(result) as fh:
            report = json.load(fh)
        with open(os.path.join(work, "model.tflite"), "rb") as fh:
            return fh.read(), report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child_error(work: str, log_path: str, returncode: int) -> str:
    """One line for a failed converter process: its own error message, else the last line it printed."""
    try:
        with open(os.path.join(work, "error.json")) as fh:
            message = str(json.load(fh)["error"])
        if message.strip():
            return " ".join(message.split())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        with open(log_path, "rb") as fh:
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    if returncode == -9:
        how += " (out of memory?)"
    return f"TFLite int8 conversion failed: the converter process {how}" + (f": {lines[-1][:300]}" if lines else "")


def _child_main(argv: List[str]) -> int:
    """Entry of the converter process: ``WORKDIR`` holds inputs.npz and inputs.json (:func:`_keras_inputs`,
    ``calib`` and ``metadata``); writes model.tflite and result.json, or error.json, there. Exit status 0 / 1."""
    t0 = time.perf_counter()
    if len(argv) != 1:
        print("usage: python -m edge_ser.export_tflite WORKDIR  (the TFLite converter process of train-local)",
              file=sys.stderr)
        return 2
    work = Path(argv[0])
    try:
        with open(work / "inputs.json") as fh:
            config = json.load(fh)
        with np.load(work / "inputs.npz", allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        with _native_stderr_quiet() as native_log:
            tf = _import_tensorflow()
            keras_model = _keras_convnet(tf, config, arrays)
            flat = _convert(tf, keras_model, arrays["calib"], native_log)
        flat = add_tflite_metadata(flat, METADATA_NAME, json.dumps(config["metadata"], sort_keys=True).encode())
        (work / "model.tflite").write_bytes(flat)
        report = {"tensorflow": tf.__version__, "torch_imported": "torch" in sys.modules,
                  "peak_rss_mb": _own_peak_rss_mb(), "seconds": round(time.perf_counter() - t0, 3)}
        (work / "result.json").write_text(json.dumps(report))
        return 0
    except Exception as exc:   # one line for the parent's RuntimeError; the traceback stays in the log
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = first if isinstance(exc, RuntimeError) else \
            f"TFLite int8 conversion failed: {type(exc).__name__}: {first}"
        try:
            (work / "error.json").write_text(json.dumps({"error": message}))
        except OSError:
            pass
        import traceback

        traceback.print_exc()
        return 1


def _own_peak_rss_mb() -> Optional[float]:
    """This process's high-water RSS (``VmHWM``), MB; None where /proc is absent. (Not ``ru_maxrss``: it
    survives exec and so would count the parent that started this process.)"""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def _native_stderr_quiet():
    """Send file descriptor 2 to a temporary file while TensorFlow loads and converts: its C++ and absl
    logging (oneDNN notes, "All log messages before absl::InitializeLog()", MLIR pass notes) ignores
    TF_CPP_MIN_LOG_LEVEL in parts and is noise on every train-local. Yields a callable returning what
    was written, for an error message. Python's sys.stderr (a progress bar) is left alone."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no real fd 2 or no sys.stderr: nothing to silence
        yield lambda: ""
        return
    log = tempfile.TemporaryFile()
    try:
        os.dup2(log.fileno(), 2)
        py_err = sys.stderr
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, closefd=True)   # Python's own writes still show

        def text() -> str:
            log.seek(0)
            return log.read().decode("utf-8", "replace")
        try:
            yield text
        finally:
            try:
                sys.stderr.flush()
                sys.stderr.close()
            finally:
                sys.stderr = py_err
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log.close()


def _calibration_subset(X: np.ndarray, max_calib: int, seed: int) -> np.ndarray:
    """The (at most ``max_calib``) windows the converter calibrates on, drawn with ``seed``, in order."""
    idx = np.random.default_rng(seed).permutation(len(X))[:max_calib]
    return np.ascontiguousarray(X[np.sort(idx)])


def _convert(tf, keras_model, calib: np.ndarray, native_log) -> bytes:
    def representative():
        for x in calib:
            yield [x[None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # Keras prints the traced signature; the converter warns about float input statistics we
            # deliberately leave to its QUANTIZE op. Neither is news to the caller.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            flat = converter.convert()
    except Exception as exc:  # the converter's own errors are long; keep the first line (and its native log's last)
        native = [line for line in native_log().strip().splitlines() if line.strip()]
        tail = f" (TensorFlow: {native[-1].strip()[:200]})" if native else ""
        raise RuntimeError(f"TFLite int8 conversion failed: {str(exc).strip().splitlines()[0]}{tail}") from exc
    return flat


def _check_calib(model, calib_X) -> np.ndarray:
    from .models import ConvNet

    if not isinstance(model, ConvNet):
        raise ValueError(f"TFLite int8 export supports the ConvNet only, not {type(model).__name__}")
    cfg = model.cfg
    if cfg.norm not in ("batch", "none"):
        raise ValueError(f"TFLite int8 export needs norm='batch' or 'none' (foldable), got {cfg.norm!r}")
    X = np.asarray(calib_X, dtype=np.float32)
    if X.ndim != 3 or X.shape[1:] != (cfg.n_mels, cfg.num_frames) or len(X) == 0:
        raise ValueError(f"calibration features must be (N, {cfg.n_mels}, {cfg.num_frames}), got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("calibration features contain NaN or inf")
    return np.ascontiguousarray(X)


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise RuntimeError(f"TFLite export needs TensorFlow ({exc}); install it: {EXPORT_INSTALL}") from None
    return tf


def _metadata_json(model, metadata: Optional[dict]) -> dict:
    meta = dict(metadata or {})
    meta.setdefault("format", FORMAT)
    meta.setdefault("model_config", model.cfg.to_dict())
    meta.setdefault("input", {"name": "log_mels", "dtype": "float32", "shape": [1, model.cfg.n_mels,
                                                                            model.cfg.num_frames],
                              "meaning": "raw log-Mels from edge_ser.features (normalised inside)"})
    meta.setdefault("output", {"dtype": "float32", "meaning": "logits (dequantised); softmax for probabilities"})
    if "feature_config" in meta and hasattr(meta["feature_config"], "to_dict"):
        meta["feature_config"] = meta["feature_config"].to_dict()
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ValueError(f"TFLite metadata must be JSON-able: {exc}") from None
    return meta


def _folded_convs(model):
    """[(kernel HWIO, bias, pool)] with BatchNorm folded into each conv (eval statistics)."""
    import torch
    from torch import nn

    mods, blocks, i = list(model.features), [], 0
    while i < len(mods):
        conv, norm, _relu, pool = mods[i:i + 4]
        W = conv.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
        if isinstance(norm, nn.BatchNorm2d):
            s = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
            W = W * s[:, None, None, None]
            b = (b - norm.running_mean.double()) * s + norm.bias.detach().double()
        blocks.append((W.numpy().transpose(2, 3, 1, 0).astype(np.float32), b.numpy().astype(np.float32),
                       "avg" if isinstance(pool, nn.AvgPool2d) else "max"))
        i += 4
    return blocks


def _keras_inputs(model):
    """Everything :func:`_keras_convnet` needs from the torch model, as (JSON-able config, numpy arrays):
    the per-band input statistics, the BatchNorm-folded conv kernels and biases, the classifier."""
    cfg = model.cfg
    arrays = {"mean": model.input_norm.mean.detach().numpy().astype(np.float64),
              "std": model.input_norm.std.detach().numpy().astype(np.float64),
              "classifier_weight": np.array(model.classifier.weight.detach().numpy()),
              "classifier_bias": np.array(model.classifier.bias.detach().numpy())}
    pools = []
    for i, (kernel, bias, pool) in enumerate(_folded_convs(model)):
        arrays[f"conv{i}_kernel"], arrays[f"conv{i}_bias"] = kernel, bias
        pools.append(pool)
    config = {"n_mels": int(cfg.n_mels), "num_frames": int(cfg.num_frames),
              "stem_pool": [int(v) for v in cfg.stem_pool], "pools": pools}
    return config, arrays


def _keras_convnet(tf, config: dict, arrays: Dict[str, np.ndarray]):
    """The same network in Keras, NHWC = (batch, mel, frame, channel), from :func:`_keras_inputs`."""
    k = tf.keras
    n_mels, num_frames = config["n_mels"], config["num_frames"]
    mean, std = arrays["mean"].astype(np.float64), arrays["std"].astype(np.float64)
    scale = (1.0 / std).reshape(1, -1, 1, 1).astype(np.float32)
    shift = (-mean / std).reshape(1, -1, 1, 1).astype(np.float32)

    class BandAffine(k.layers.Layer):  # (x - mean) / std per Mel band -> int8 MUL + ADD
        def call(self, x):
            return x * tf.constant(scale) + tf.constant(shift)

    class TimeMean(k.layers.Layer):  # mean over frames -> MEAN
        def call(self, x):
            return tf.reduce_mean(x, axis=2)

    inp = k.Input((n_mels, num_frames), batch_size=1, name="log_mels")
    h = BandAffine()(k.layers.Reshape((n_mels, num_frames, 1))(inp))
    if tuple(config["stem_pool"]) != (1, 1):
        h = k.layers.AveragePooling2D(tuple(config["stem_pool"]))(h)
    for i, pool in enumerate(config["pools"]):
        kernel, bias = arrays[f"conv{i}_kernel"], arrays[f"conv{i}_bias"]
        conv = k.layers.Conv2D(kernel.shape[3], kernel.shape[:2], padding="same", activation="relu")
        h = conv(h)
        conv.set_weights([kernel, bias])
        h = (k.layers.AveragePooling2D(2) if pool == "avg" else k.layers.MaxPooling2D(2))(h)
    h = TimeMean()(h)                      # (B, F, C)
    freq, chans = int(h.shape[1]), int(h.shape[2])
    h = k.layers.Flatten()(h)              # index f * C + c   (torch flattens (C, F): c * F + f)
    W = arrays["classifier_weight"]
    dense = k.layers.Dense(W.shape[0], name="logits")
    out = dense(h)
    dense.set_weights([W.reshape(-1, chans, freq).transpose(0, 2, 1).reshape(W.shape[0], -1).T,
                       arrays["classifier_bias"]])
    return k.Model(inp, out)


def add_tflite_metadata(flat: bytes, name: str, payload: bytes) -> bytes:
    """Return ``flat`` (a .tflite flatbuffer) with a ``Model.metadata`` entry ``name`` -> new buffer ``payload``
    (replacing an entry of that name). Uses TensorFlow's generated schema (export side only)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(flat), 0)
    buf = schema.BufferT()
    buf.data = np.frombuffer(payload, dtype=np.uint8).copy()
    m.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(m.buffers) - 1
    m.metadata = [e for e in (m.metadata or []) if _s(e.name) != name] + [entry]
    b = flatbuffers.Builder(len(flat) + len(payload) + 1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _s(v) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


# ------------------------------------------------------------------ flatbuffer reading (no dependencies)

class _FB:
    """Minimal read-only flatbuffer access: tables, scalars, strings, vectors (little-endian)."""

    def __init__(self, data: bytes):
        self.d = bytes(data)
        if len(self.d) < 8 or self.d[4:8] != b"TFL3":
            raise ValueError("not a TFLite flatbuffer (missing 'TFL3' identifier)")

    def u8(self, p): return self.d[p]
    def i8(self, p): return struct.unpack_from("<b", self.d, p)[0]
    def u16(self, p): return struct.unpack_from("<H", self.d, p)[0]
    def i32(self, p): return struct.unpack_from("<i", self.d, p)[0]
    def u32(self, p): return struct.unpack_from("<I", self.d, p)[0]
    def u64(self, p): return struct.unpack_from("<Q", self.d, p)[0]

    def root(self) -> int:
        return self.u32(0)

    def field(self, table: int, slot: int) -> Optional[int]:
        vt = table - self.i32(table)
        if 4 + 2 * slot >= self.u16(vt):
            return None
        off = self.u16(vt + 4 + 2 * slot)
        return table + off if off else None

    def deref(self, p: int) -> int:
        return p + self.u32(p)

    def vector(self, table: int, slot: int):
        """(start, length) of a vector field, or (0, 0) when absent."""
        p = self.field(table, slot)
        if p is None:
            return 0, 0
        v = self.deref(p)
        return v + 4, self.u32(v)

    def tables(self, table: int, slot: int) -> List[int]:
        start, n = self.vector(table, slot)
        return [self.deref(start + 4 * i) for i in range(n)]

    def string(self, table: int, slot: int) -> Optional[str]:
        start, n = self.vector(table, slot)
        return self.d[start:start + n].decode("utf-8", "replace") if start else None

    def scalar(self, table: int, slot: int, kind: str, default=0):
        p = self.field(table, slot)
        return default if p is None else getattr(self, kind)(p)


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read TFLite model {source}: {exc.strerror or exc}") from None


def read_tflite_metadata(source, name: str = METADATA_NAME) -> dict:
    """The JSON stored under ``Model.metadata[name]`` of a .tflite file (path or bytes); ``{}`` if absent.

    >>> read_tflite_metadata("model.int8.tflite")["classes"]
    ['angry', 'calm', ...]
    """
    data = _read_bytes(source)
    fb = _FB(data)
    model = fb.root()
    buffers = fb.tables(model, 4)
    for entry in fb.tables(model, 6):
        if fb.string(entry, 0) != name:
            continue
        index = fb.scalar(entry, 1, "u32")
        if index >= len(buffers):
            raise ValueError(f"TFLite metadata {name!r} points at missing buffer {index}")
        start, n = fb.vector(buffers[index], 0)
        if not start:  # large-model layout: data stored after the flatbuffer at (offset, size)
            off, n = fb.scalar(buffers[index], 1, "u64"), fb.scalar(buffers[index], 2, "u64")
            start = off
        raw = data[start:start + n]
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"TFLite metadata {name!r} is not valid JSON: {exc}") from None
    return {}


def tflite_graph(source) -> Dict:
    """Operators and tensors of subgraph 0, read from the file: ``{"ops": [names], "tensors": [{"name",
    "dtype", "shape", "constant"}], "inputs": [...], "outputs": [...]}``."""
    fb = _FB(_read_bytes(source))
    model = fb.root()
    codes = []
    for oc in fb.tables(model, 1):
        code = max(fb.scalar(oc, 0, "i8"), fb.scalar(oc, 3, "i32"))
        codes.append(_BUILTIN_OPS.get(code, f"BUILTIN_{code}"))
    buffers = fb.tables(model, 4)
    sub = fb.tables(model, 2)[0]
    tensors = []
    for t in fb.tables(sub, 0):
        start, n = fb.vector(t, 0)
        shape = [fb.i32(start + 4 * i) for i in range(n)]
        b = fb.scalar(t, 2, "u32")
        const = 0 < b < len(buffers) and fb.vector(buffers[b], 0)[1] > 0
        tensors.append({"name": fb.string(t, 3), "dtype": _TENSOR_TYPES.get(fb.scalar(t, 1, "i8"), "other"),
                        "shape": shape, "constant": bool(const)})
    ops = []
    for op in fb.tables(sub, 3):
        ins, n_in = fb.vector(op, 1)
        outs, n_out = fb.vector(op, 2)
        ops.append({"op": codes[fb.scalar(op, 0, "u32")],
                    "inputs": [fb.i32(ins + 4 * i) for i in range(n_in)],
                    "outputs": [fb.i32(outs + 4 * i) for i in range(n_out)]})
    si, n_si = fb.vector(sub, 1)
    so, n_so = fb.vector(sub, 2)
    return {"ops": [o["op"] for o in ops], "op_details": ops, "tensors": tensors,
            "inputs": [fb.i32(si + 4 * i) for i in range(n_si)], "outputs": [fb.i32(so + 4 * i) for i in range(n_so)]}


def is_fully_integer(graph: Dict) -> bool:
    """True when every constant tensor is int8/int32 and every op except the edge QUANTIZE (float input
    -> int8) and DEQUANTIZE (int8 -> float output) reads and writes only integer tensors."""
    tensors = graph["tensors"]
    if any(t["constant"] and t["dtype"] not in ("int8", "int32") for t in tensors):
        return False
    for op in graph["op_details"]:
        dtypes = [tensors[i]["dtype"] for i in op["inputs"] + op["outputs"] if i >= 0]
        if op["op"] == "QUANTIZE" and set(op["inputs"]) <= set(graph["inputs"]):
            continue
        if op["op"] == "DEQUANTIZE" and set(op["outputs"]) <= set(graph["outputs"]):
            continue
        if any(d not in ("int8", "int32") for d in dtypes):
            return False
    return True


# ------------------------------------------------------------------ runtime

def _interpreter_class():
    try:
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {version('ai-edge-litert')}"
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        from tflite_runtime.interpreter import Interpreter

        return Interpreter, f"tflite-runtime {version('tflite-runtime')}"
    except ImportError:
        raise RuntimeError(f"no TFLite runtime found; install one: {RUNTIME_INSTALL}") from None


def _plain_metadata(meta: dict, source: str) -> dict:
    """pack_id / classes / feature_config / model_config from either plain keys with JSON values or the
    string form of :func:`edge_ser.runtime.model_metadata` (``"edge_ser.classes"`` -> JSON text)."""
    out = {}
    for key in ("pack_id", "classes", "feature_config", "model_config"):
        value = meta.get(key, meta.get(f"edge_ser.{key}"))
        if isinstance(value, str) and key != "pack_id":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: unreadable edge-ser metadata {key!r} ({exc})") from None
        if value is not None:
            out[key] = value
    return out


class TFLiteRunner:
    """Runs an edge-ser .tflite file on a real TFLite interpreter; float32 log-Mels in, float32 out.

    >>> r = load_tflite("model.int8.tflite", threads=1)
    >>> r.classes, r.feature_config.n_mels
    (['angry', ...], 64)
    """

    name = "tflite"

    def __init__(self, path, threads: int = 1):
        self.path = str(path)
        data = _read_bytes(path)
        self.metadata = read_tflite_metadata(data)
        Interpreter, self.runtime = _interpreter_class()
        try:
            with _native_stderr_quiet():     # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." every time
                self._it = Interpreter(model_content=data, num_threads=int(threads))
                self._it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: TFLite runtime refused the model: {str(exc).strip().splitlines()[0]}") from None
        self._in = self._it.get_input_details()[0]
        self._out = self._it.get_output_details()[0]
        self.input_shape = tuple(int(s) for s in self._in["shape"])
        self.threads = int(threads)
        meta = _plain_metadata(self.metadata, self.path)
        self.classes = tuple(meta.get("classes") or [str(i) for i in range(int(self._out["shape"][-1]))])
        self.pack_id = meta.get("pack_id")
        self.feature_config = None
        if meta.get("feature_config"):
            from .config import FeatureConfig

            self.feature_config = FeatureConfig.from_dict(meta["feature_config"])

    def _quant(self, x: np.ndarray, details) -> np.ndarray:
        if details["dtype"] == np.float32:
            return x.astype(np.float32)
        scale, zero = details["quantization"]
        info = np.iinfo(details["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(details["dtype"])

    def _dequant(self, y: np.ndarray, details) -> np.ndarray:
        if details["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zero = details["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def predict_logits(self, X) -> np.ndarray:
        """(B, n_mels, frames) or (n_mels, frames) float32 -> (B, C) float32 logits."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 2:
            X = X[None]
        if X.ndim != 3 or X.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"expected log-Mels (B, {self.input_shape[1]}, {self.input_shape[2]}), got {X.shape}")
        out = np.empty((len(X), int(self._out["shape"][-1])), dtype=np.float32)
        for i, x in enumerate(X):
            self._it.set_tensor(self._in["index"], self._quant(x[None], self._in))
            self._it.invoke()
            out[i] = self._dequant(self._it.get_tensor(self._out["index"]), self._out)[0]
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of :meth:`predict_logits`."""
        z = self.predict_logits(X)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def load_tflite(path, threads: int = 1) -> TFLiteRunner:
    """Open an exported .tflite on ai-edge-litert (or tflite-runtime) with ``threads`` threads.

    >>> runner = load_tflite("model/model.int8.tflite")
    >>> runner.predict_logits(features).argmax(1)
    """
    return TFLiteRunner(path, threads=threads)


if __name__ == "__main__":      # the converter process of export_tflite_int8 (see _child_main)
    sys.exit(_child_main(sys.argv[1:]))
