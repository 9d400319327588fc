"""One inference facade over ONNX Runtime, LiteRT/tflite-runtime and (optionally) torch.

A *runner* turns raw log-Mels ``(batch, n_mels, frames)`` float32 into logits; it carries the model's
class names and feature config, read from the model folder's ``model.json`` or the file's own metadata.

>>> runner = load_runtime("model/")                     # doctest: +SKIP  (model.int8.onnx by default)
>>> runner.name, runner.classes[:2]                     # doctest: +SKIP
('onnx-int8', ('neutral', 'calm'))
>>> runner.predict_proba(X).shape                       # doctest: +SKIP
(4, 8)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .config import FeatureConfig, ModelConfig

log = logging.getLogger("edge_ser.runtime")

#: runtime name -> file inside a model folder
RUNTIME_FILES: Dict[str, str] = {
    "onnx-int8": "model.int8.onnx",
    "onnx": "model.onnx",
    "tflite": "model.int8.tflite",
    "torch": "model.npz",
}
DEFAULT_RUNTIME = "onnx-int8"
#: keys of the metadata every exported file carries (ONNX metadata_props, TFLite metadata, npz member)
META_KEYS = ("edge_ser.pack_id", "edge_ser.classes", "edge_ser.feature_config", "edge_ser.model_config")
NPZ_META = "__edge_ser_meta__"


class RuntimeUnavailable(RuntimeError):
    """The runtime a model needs is not installed here (the message says how to install it)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_metadata(pack_id: str, classes, feature_config: FeatureConfig,
                   model_config: Optional[ModelConfig] = None) -> Dict[str, str]:
    """The string metadata every exported file carries (see :data:`META_KEYS`)."""
    meta = {"edge_ser.pack_id": str(pack_id),
            "edge_ser.classes": json.dumps(list(classes)),
            "edge_ser.feature_config": feature_config.to_json()}
    if model_config is not None:
        meta["edge_ser.model_config"] = model_config.to_json()
    return meta


def parse_metadata(meta: Dict[str, str], source: str) -> Tuple[str, Tuple[str, ...], FeatureConfig]:
    """(pack_id, classes, feature_config) from :func:`model_metadata` strings; one-line error if missing."""
    missing = [k for k in META_KEYS[:3] if k not in meta]
    if missing:
        raise ValueError(f"{source}: not an edge-ser model (metadata {', '.join(missing)} missing)")
    try:
        classes = tuple(json.loads(meta["edge_ser.classes"]))
        fcfg = FeatureConfig.from_dict(json.loads(meta["edge_ser.feature_config"]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: unreadable edge-ser metadata ({exc})") from None
    return meta["edge_ser.pack_id"], classes, fcfg


class Runner:
    """Base of every runner: ``predict_logits(X)`` -> (B, C) float32; ``predict_proba`` = softmax of it."""

    name: str = "?"
    path: str = ""
    classes: Tuple[str, ...] = ()
    feature_config: FeatureConfig = FeatureConfig()
    pack_id: str = ""

    def predict_logits(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.predict_logits(X))

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 2:
            X = X[None]
        fc = self.feature_config
        if X.ndim != 3 or X.shape[1:] != (fc.n_mels, fc.num_frames):
            raise ValueError(f"{self.name} runner expects log-Mels (batch, {fc.n_mels}, {fc.num_frames}), "
                             f"got {tuple(X.shape)}")
        return np.ascontiguousarray(X)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.path} classes={len(self.classes)}>"


class OnnxRunner(Runner):
    """ONNX Runtime on CPU with ``threads`` intra-op threads (default 1: predictable on small devices)."""

    def __init__(self, path, threads: int = 1, name: Optional[str] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
        self.path = str(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads or 1))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: cannot load ONNX model ({' '.join(str(exc).split())[:200]})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.pack_id, self.classes, self.feature_config = parse_metadata(meta, self.path)
        self.metadata = meta
        self.input_name = self.session.get_inputs()[0].name
        self.name = name or ("onnx-int8" if ".int8." in Path(self.path).name else "onnx")

    def predict_logits(self, X: np.ndarray) -> np.ndarray:
        X = self._check(X)
        return np.asarray(self.session.run(None, {self.input_name: X})[0], dtype=np.float32)


class TorchRunner(Runner):
    """The trained weights (``model.npz``, no pickle) in torch: the reference for parity checks."""

    name = "torch"

    def __init__(self, path, threads: Optional[int] = None):
        try:
            import torch  # noqa: F401 (only whether it is installed)
        except ImportError:
            raise RuntimeUnavailable("torch is not installed (only needed for --runtime torch): "
                                     "pip install torch --index-url https://download.pytorch.org/whl/cpu") from None
        from .models import build_model, load_state_arrays

        self.path = str(path)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise ValueError(f"{path}: cannot read weights ({exc})") from None
        if NPZ_META not in arrays:
            raise ValueError(f"{path}: not an edge-ser weights file ({NPZ_META} missing)")
        meta = json.loads(str(arrays.pop(NPZ_META)))
        self.pack_id, self.classes, self.feature_config = parse_metadata(meta, self.path)
        self.metadata = meta
        mcfg = ModelConfig.from_dict(json.loads(meta["edge_ser.model_config"]))
        self.model = load_state_arrays(build_model(mcfg), arrays).eval()
        self.threads = threads

    def predict_logits(self, X: np.ndarray) -> np.ndarray:
        import torch

        X = self._check(X)
        if self.threads:
            torch.set_num_threads(int(self.threads))
        with torch.no_grad():
            return self.model(torch.from_numpy(X)).numpy().astype(np.float32)


def save_npz(path, arrays: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write weights + metadata as a pickle-free ``.npz`` that :class:`TorchRunner` reads."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[NPZ_META] = np.array(json.dumps(metadata, sort_keys=True))
    with open(path, "wb") as fh:
        np.savez(fh, **payload)


def _tflite_runner(path, threads: int):
    try:
        from .export_tflite import load_tflite
    except ImportError as exc:
        raise RuntimeUnavailable(f"TFLite support is not available ({exc}); "
                                 "pip install ai-edge-litert (or tflite-runtime on a Raspberry Pi)") from None
    try:
        runner = load_tflite(path, threads=threads)
    except TypeError:
        runner = load_tflite(path)
    except ImportError as exc:
        raise RuntimeUnavailable(f"no TFLite runtime here ({exc}); pip install ai-edge-litert "
                                 "(or tflite-runtime on a Raspberry Pi)") from None
    if not getattr(runner, "name", None):
        runner.name = "tflite"
    return runner


def _folder_meta(folder: Path) -> Dict:
    f = folder / "model.json"
    if not f.exists():
        raise ValueError(f"{folder}: not a model folder (no model.json); run edge-ser train-local first")
    try:
        return json.loads(f.read_text())
    except ValueError as exc:
        raise ValueError(f"{f}: unreadable model.json ({exc})") from None


def load_runtime(path, runtime: Optional[str] = None, threads: int = 1) -> Runner:
    """A runner for a model folder (pick the file by ``runtime``: onnx-int8 (default), onnx, tflite,
    torch) or for one ``.onnx`` / ``.tflite`` / ``.npz`` file whose metadata names classes and features.

    >>> r = load_runtime("model/", runtime="onnx")          # doctest: +SKIP
    >>> r.predict_logits(np.zeros((1, 64, 298), np.float32)).shape  # doctest: +SKIP
    (1, 8)
    """
    p = Path(path).expanduser()
    if runtime is not None and runtime not in RUNTIME_FILES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_FILES)}")
    if p.is_dir():
        info = _folder_meta(p)
        name = runtime or DEFAULT_RUNTIME
        if runtime is None and ((info.get("files") or {}).get("onnx-int8") or {}).get("refused"):
            log.warning(f"{p}: the int8 model was refused at training (it disagreed with fp32); using the fp32 model.onnx")
            name = "onnx"
        f = p / RUNTIME_FILES[name]
        if not f.exists():
            have = [r for r, fn in RUNTIME_FILES.items() if (p / fn).exists()]
            hint = ""
            if name == "tflite" and (info.get("files", {}).get("tflite") or {}).get("error"):
                hint = f" (export failed: {info['files']['tflite']['error']})"
            raise ValueError(f"{p}: no {RUNTIME_FILES[name]} for runtime {name}{hint}; available: "
                             f"{', '.join(have) or 'none'}")
        runner = _load_file(f, name, threads)
        # the folder's model.json is authoritative for names (e.g. a TFLite file without metadata)
        if info.get("classes"):
            runner.classes = tuple(info["classes"])
        if info.get("feature_config"):
            runner.feature_config = FeatureConfig.from_dict(info["feature_config"])
        runner.model_info = info
        return runner
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder or file")
    suffix = p.suffix.lower()
    guess = {".onnx": "onnx-int8" if ".int8." in p.name else "onnx", ".tflite": "tflite", ".npz": "torch"}.get(suffix)
    if guess is None:
        raise ValueError(f"{p}: unknown model file type (use a model folder, .onnx, .tflite or .npz)")
    if runtime is not None and {"onnx-int8": "onnx"}.get(runtime, runtime) != {"onnx-int8": "onnx"}.get(guess, guess):
        raise ValueError(f"{p}: a {suffix} file cannot run with runtime {runtime}")
    runner = _load_file(p, runtime or guess, threads)
    runner.model_info = None
    return runner


def _load_file(f: Path, name: str, threads: int) -> Runner:
    if name in ("onnx", "onnx-int8"):
        return OnnxRunner(f, threads=threads, name=name)
    if name == "tflite":
        return _tflite_runner(f, threads)
    return TorchRunner(f, threads=threads)


def available_runtimes(folder) -> Dict[str, bool]:
    """Which runtimes a model folder has files for."""
    p = Path(folder)
    return {name: (p / fn).exists() for name, fn in RUNTIME_FILES.items()}
