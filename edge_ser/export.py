"""Export a trained model for inference without torch: ONNX fp32, ONNX int8 (static QDQ), TFLite int8.

Every file carries the pack id, class names and feature config as metadata; parity with torch (fp32) and
fp32-vs-int8 agreement on the calibration set are measured at export and returned (and warned about).

>>> info = export_all(model, "out/", meta, calib_X)          # doctest: +SKIP
>>> info["onnx-int8"]["agreement"]["argmax_agreement"] >= 0.9  # doctest: +SKIP
True
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .runtime import OnnxRunner, softmax

log = logging.getLogger("edge_ser.export")

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "logmel", "logits"
#: fp32-vs-int8 argmax agreement below this on the calibration set gives a warning
AGREEMENT_WARN = 0.90
#: max calibration windows used for int8 (more costs time and memory, not accuracy)
MAX_CALIB = 256
#: calibration windows whose intermediate tensors the percentile calibrator holds at once (bounds its memory)
CALIB_STRIDE = 4
#: activation range = this central percentile of the calibration values (see quantize_int8)
PERCENTILE = 99.9


def file_info(path) -> Dict:
    data = Path(path).read_bytes()
    return {"file": Path(path).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def set_onnx_metadata(path, metadata: Dict[str, str]) -> None:
    """Write ``metadata`` into an ONNX file's ``metadata_props`` (replacing keys that exist)."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, props[k]
    model.producer_name = "edge-ser"
    onnx.save(model, str(path))


def export_onnx(model, path, metadata: Dict[str, str], n_mels: int, frames: int, opset: int = OPSET) -> Dict:
    """Export ``model`` (eval mode: BatchNorm folds into the convolutions) to ONNX fp32 with a dynamic
    batch axis: input ``logmel`` (batch, n_mels, frames) raw log-Mels -> ``logits`` (batch, C)."""
    import torch

    model = model.eval()
    dummy = torch.zeros(2, n_mels, frames)
    path = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter: sub-second and a clean graph (BN folded) for these models
            torch.onnx.export(model, (dummy,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, do_constant_folding=True, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as legacy_exc:  # e.g. a torch without the legacy exporter: use dynamo
            log.info("legacy ONNX exporter failed (%s); using dynamo", legacy_exc)
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (dummy,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    set_onnx_metadata(path, metadata)
    return file_info(path)


class _Calib:
    """CalibrationDataReader over a float32 array, a few windows per batch."""

    def __init__(self, X: np.ndarray, batch: int = 1):
        self.X, self.batch, self.i = X, batch, 0

    def get_next(self):
        if self.i >= len(self.X):
            return None
        xb = self.X[self.i: self.i + self.batch]
        self.i += self.batch
        return {INPUT_NAME: np.ascontiguousarray(xb, dtype=np.float32)}

    def rewind(self):
        self.i = 0


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _streamed_histograms(stride: int):
    """While active, onnxruntime's percentile calibrator collects its histograms ``stride`` windows at a time
    (:func:`_collect_histograms_streamed`) instead of holding every intermediate tensor of every calibration
    window at once (~2.5 MB a window for the default model: +200 MB at the end of train-local). The histograms,
    hence the int8 model, are the same bit for bit (tested). Where onnxruntime's internals differ from
    1.2x's, nothing is patched and quantisation runs as onnxruntime does it."""
    import functools
    import importlib

    try:   # (the package's ``quantize`` attribute is a function that shadows the module of that name)
        calibrate = importlib.import_module("onnxruntime.quantization.calibrate")
        ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
        original = ort_quantize.create_calibrator
        calibrate.HistogramCollector.collect_absolute_value  # noqa: B018 (what the stream reproduces)
    except (ImportError, AttributeError):
        yield
        return

    def create_calibrator(*args, **kwargs):
        calibrator = original(*args, **kwargs)
        if type(calibrator) is calibrate.PercentileCalibrater and calibrator.symmetric:
            calibrator.collect_data = functools.partial(_collect_histograms_streamed, calibrator, stride=stride)
        return calibrator

    with _PATCH_LOCK:      # one quantisation at a time sees the patched factory; restored after it
        ort_quantize.create_calibrator = create_calibrator
        try:
            yield
        finally:
            ort_quantize.create_calibrator = original


def _collect_histograms_streamed(calibrator, data_reader, stride: int = 4) -> None:
    """``HistogramCalibrater.collect_data`` for the symmetric percentile method (onnxruntime's default) in
    two passes over the calibration windows, ``stride`` windows at a time: (1) each tensor's min and max and
    those of its absolute values, i.e. the range ``HistogramCollector.collect_absolute_value`` gives the
    histogram of |x| when it sees all the data at once; (2) histogram counts on that range, summed.
    Counting is per value, so the sums are the one-shot histogram exactly."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    session = calibrator.infer_session
    names = [o.name for o in session.get_outputs()]
    wanted = [i for i, name in enumerate(names) if name in calibrator.tensors_to_calibrate]

    def strides():
        data_reader.rewind()
        while True:
            outputs = []
            for _ in range(stride):
                inputs = data_reader.get_next()
                if not inputs:
                    break
                outputs.append(session.run(None, inputs))
            if not outputs:
                return
            yield {names[i]: np.asarray([out[i] for out in outputs]).flatten() for i in wanted}
            if len(outputs) < stride:
                return

    ranges: Dict[str, list] = {}     # name -> [min x, max x, min |x|, max |x|]
    for arrays in strides():
        for name, a in arrays.items():
            if a.size:
                magnitude = np.absolute(a)
                now = [np.nanmin(a), np.nanmax(a), magnitude.min(), magnitude.max()]
                old = ranges.get(name, now)
                ranges[name] = [min(old[0], now[0]), max(old[1], now[1]), min(old[2], now[2]), max(old[3], now[3])]
    if not ranges:
        raise ValueError("No data is collected.")
    hists: Dict[str, tuple] = {}
    for arrays in strides():
        for name, a in arrays.items():
            if name in ranges:
                counts, edges = np.histogram(np.absolute(a), bins=calibrator.num_bins,
                                             range=(ranges[name][2], ranges[name][3]))
                hists[name] = (hists[name][0] + counts, hists[name][1]) if name in hists else \
                    (counts, edges.astype(a.dtype))
    collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                   num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                   percentile=calibrator.percentile, scenario=calibrator.scenario)
    collector.histogram_dict = {name: (counts, edges, ranges[name][0], ranges[name][1])
                                for name, (counts, edges) in hists.items()}
    calibrator.collector = collector
    calibrator.clear_collected_data()


def quantize_int8(fp32_path, out_path, calib_X: np.ndarray, metadata: Dict[str, str], per_channel: bool = True,
                  max_intermediate: int = 4, calibration: str = "percentile",
                  calib_stride: Optional[int] = CALIB_STRIDE) -> Dict:
    """Static int8 quantisation (QDQ, per-channel int8 weights, int8 activations) calibrated on ``calib_X``.

    ``calibration="percentile"`` (default) sets each activation's range to its 0.1-99.9 % quantiles, so a
    few extreme calibration values (learned synthetic features can have them) do not cost resolution
    everywhere: on RAVDESS test actors it kept int8 within 0.3 UAR points of fp32 where ``"minmax"`` lost
    1.3-1.6 (benchmarks/RESULTS.md). ``max_intermediate`` (min/max) and ``calib_stride`` (percentile; None:
    onnxruntime's own collection, all windows at once) bound the calibration tensors held at once."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax}
    if calibration not in methods:
        raise ValueError(f"calibration must be one of {sorted(methods)}, got {calibration!r}")
    method = methods[calibration]
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if calibration == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    out_path = str(out_path)
    pre = out_path + ".pre.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(fp32_path), pre, skip_symbolic_shape=True)
            src = pre
        except Exception as exc:  # pre-processing is an optimisation only
            log.info("quant_pre_process failed (%s); quantising the raw graph", exc)
            src = str(fp32_path)
        logging.getLogger("root").setLevel(logging.WARNING)
        # onnxruntime flushes every `max_intermediate` batches and fails when the last flush is empty
        n_batches = len(calib_X)
        while max_intermediate > 1 and n_batches % max_intermediate == 0:
            max_intermediate += 1
        extra["CalibMaxIntermediateOutputs"] = max_intermediate
        # (the histogram calibrators print progress lines to stdout: kept off a --json command's output)
        streamed = _streamed_histograms(calib_stride) if calib_stride else contextlib.nullcontext()
        with contextlib.redirect_stdout(io.StringIO()), streamed:
            quantize_static(src, out_path, _Calib(calib_X), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "Gemm", "AveragePool", "Relu", "ReduceMean", "MatMul"],
                            calibrate_method=method, extra_options=extra)
    if os.path.exists(pre):
        os.unlink(pre)
    set_onnx_metadata(out_path, metadata)
    return file_info(out_path)


def agreement(ref_logits: np.ndarray, logits: np.ndarray) -> Dict:
    """How well ``logits`` match reference logits: argmax agreement, max |Δlogit|, max |Δprob|."""
    ref_logits, logits = np.asarray(ref_logits, np.float32), np.asarray(logits, np.float32)
    return {"n": int(len(ref_logits)),
            "argmax_agreement": float(np.mean(ref_logits.argmax(1) == logits.argmax(1))) if len(ref_logits) else 1.0,
            "max_abs_logit_diff": float(np.max(np.abs(ref_logits - logits))) if len(ref_logits) else 0.0,
            "max_abs_prob_diff": float(np.max(np.abs(softmax(ref_logits) - softmax(logits)))) if len(ref_logits) else 0.0}


def export_tflite(model, calib_X: np.ndarray, path, metadata: Dict[str, str]) -> Dict:
    """TFLite full-integer model via the colleague's ``export_tflite.export_tflite_int8`` (lazy import).
    Raises ``RuntimeError`` with the install command when the converter is missing."""
    try:
        from .export_tflite import export_tflite_int8
    except ImportError as exc:
        raise RuntimeError(f"TFLite export unavailable ({exc}); pip install 'edge-ser[tflite]'") from None
    info = export_tflite_int8(model, calib_X, str(path), dict(metadata)) or {}
    out = file_info(path)
    out.update({k: v for k, v in info.items() if k not in out})
    return out


def batched(fn, X: np.ndarray, batch: int = 8) -> np.ndarray:
    """``fn`` over ``X`` in batches of ``batch`` (bounded memory), concatenated."""
    return np.concatenate([np.asarray(fn(X[i: i + batch]), np.float32) for i in range(0, len(X), batch)])


def calibration_set(X: np.ndarray, extra: Optional[np.ndarray] = None, limit: int = MAX_CALIB,
                    seed: int = 0) -> np.ndarray:
    """Calibration windows: the synthetic set plus pack-provided calibration features, at most ``limit``."""
    parts = [np.asarray(X, np.float32)]
    if extra is not None and len(extra):
        parts.append(np.asarray(extra, np.float32))
    allx = np.concatenate(parts)
    if len(allx) > limit:
        allx = allx[np.sort(np.random.default_rng(seed).choice(len(allx), limit, replace=False))]
    return allx


def export_all(model, folder, metadata: Dict[str, str], calib_X: np.ndarray, tflite: bool = True,
               max_intermediate: int = 4, warn=None) -> Dict:
    """Write model.onnx, model.int8.onnx (and model.int8.tflite) into ``folder``; return per-file info
    with timings and parity: torch-vs-fp32 and fp32-vs-int8 on ``calib_X``. ``warn(msg)`` gets warnings."""
    import torch

    from .progress import phase

    warn = warn or (lambda msg: log.warning(msg))
    folder = Path(folder)
    fc_frames = calib_X.shape[2]
    n_mels = calib_X.shape[1]
    files: Dict[str, Dict] = {}
    model = model.eval()
    with torch.no_grad():  # in small batches: activations of a whole calibration set cost 100s of MB
        ref = np.concatenate([model(torch.from_numpy(np.ascontiguousarray(calib_X[i:i + 8], np.float32))).numpy()
                              for i in range(0, len(calib_X), 8)])

    t0 = time.perf_counter()
    with phase("export: ONNX fp32"):
        files["onnx"] = export_onnx(model, folder / "model.onnx", metadata, n_mels, fc_frames)
        fp32 = OnnxRunner(folder / "model.onnx", threads=1)
        fp32_logits = batched(fp32.predict_logits, calib_X)
    files["onnx"]["agreement_vs_torch"] = agreement(ref, fp32_logits)
    files["onnx"]["seconds"] = time.perf_counter() - t0
    if files["onnx"]["agreement_vs_torch"]["max_abs_logit_diff"] > 1e-3:
        warn(f"ONNX fp32 differs from torch by {files['onnx']['agreement_vs_torch']['max_abs_logit_diff']:.2g} "
             "in the logits")

    t0 = time.perf_counter()
    with phase(f"export: ONNX int8, calibrated on {len(calib_X)} windows"):
        files["onnx-int8"] = quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", calib_X, metadata,
                                           max_intermediate=max_intermediate)
        int8 = OnnxRunner(folder / "model.int8.onnx", threads=1)
        agree = agreement(fp32_logits, batched(int8.predict_logits, calib_X))
    files["onnx-int8"]["agreement_vs_fp32"] = agree
    files["onnx-int8"]["seconds"] = time.perf_counter() - t0
    if agree["argmax_agreement"] < AGREEMENT_WARN:
        warn(f"int8 ONNX agrees with fp32 on only {agree['argmax_agreement']:.0%} of {agree['n']} calibration "
             f"windows (threshold {AGREEMENT_WARN:.0%}); prefer --runtime onnx")
    del fp32, int8

    if tflite:
        t0 = time.perf_counter()
        try:
            with phase("export: TFLite int8 (TensorFlow's converter, in its own process)"):
                files["tflite"] = export_tflite(model, calib_X, folder / "model.int8.tflite", metadata)
            try:
                from .runtime import load_runtime

                tfl = load_runtime(folder / "model.int8.tflite", "tflite")
                files["tflite"]["agreement_vs_fp32"] = agreement(fp32_logits, batched(tfl.predict_logits, calib_X))
            except Exception as exc:  # converter present, interpreter missing
                files["tflite"]["agreement_vs_fp32"] = {"error": " ".join(str(exc).split())[:200]}
            files["tflite"]["seconds"] = time.perf_counter() - t0
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            if (folder / "model.int8.tflite").exists():
                (folder / "model.int8.tflite").unlink()
            files["tflite"] = {"file": None, "error": msg}
            if isinstance(getattr(exc, "converter_process", None), dict):   # it ran: its memory counts
                files["tflite"]["converter_process"] = exc.converter_process
            warn(f"TFLite export skipped: {msg}")
    return files
