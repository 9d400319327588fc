"""On-device training (``edge-ser train-local``): verify a pack, train θ0 on its synthetic set within a
memory budget, check the golden vectors, export ONNX/TFLite, and swap the model folder in atomically.

>>> result = train_local("demo.pack", "model/", memory_budget_mb=600, threads=1)   # doctest: +SKIP
>>> result["golden"]["passed"], result["peak_rss_mb"] < 600                         # doctest: +SKIP
(True, True)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from . import memory
from .files import json_default

log = logging.getLogger("edge_ser.local")

MODEL_FORMAT = "edge-ser-model/1"
#: an int8 model whose top-1 agrees with fp32 on fewer of the pack's own vectors than this is not installed
INT8_MIN_AGREEMENT = 0.80


def train_local(pack, output, memory_budget_mb: Optional[float] = None, threads: Optional[int] = None,
                public_key=None, export: bool = True, progress: bool = True, lean: bool = False) -> Dict[str, Any]:
    """Load and verify ``pack`` (a path), then :func:`train_from_pack` into the folder ``output``.
    ``lean=True`` trades time for memory even without a budget (see :mod:`edge_ser.memory`)."""
    from .packfile import load_pack

    t0 = time.perf_counter()
    p = load_pack(pack, public_key=public_key)
    return train_from_pack(p, output, memory_budget_mb=memory_budget_mb, threads=threads, export=export,
                           progress=progress, lean=lean, _t0=t0)


def _check_pack(p) -> None:
    fc, mc = p.feature_config, p.model_config
    X = np.asarray(p.X)
    if X.ndim != 3 or X.shape[1:] != (fc.n_mels, fc.num_frames) or (mc.n_mels, mc.num_frames) != X.shape[1:]:
        raise ValueError(f"pack {p.pack_id}: synthetic set shape {X.shape} does not match the feature/model config "
                         f"({fc.n_mels}, {fc.num_frames})")
    if len(p.classes) != mc.num_classes:
        raise ValueError(f"pack {p.pack_id}: {len(p.classes)} classes but the model has {mc.num_classes} outputs")
    y = np.asarray(p.y)
    if len(y) != len(X) or not np.all(np.isfinite(X)):
        raise ValueError(f"pack {p.pack_id}: synthetic set has {len(X)} inputs, {len(y)} labels, or non-finite values")
    if y.ndim == 1 and (y.min() < 0 or y.max() >= mc.num_classes):
        raise ValueError(f"pack {p.pack_id}: labels outside 0..{mc.num_classes - 1}")


def golden_check(model, golden_inputs: np.ndarray, golden_logits: np.ndarray, tolerance: float) -> Dict[str, Any]:
    """Compare the trained model's logits on the pack's golden inputs with the server's logits."""
    import torch

    gi = np.asarray(golden_inputs, np.float32)
    gl = np.asarray(golden_logits, np.float32)
    if len(gi) == 0:
        return {"passed": False, "n": 0, "reason": "pack has no golden vectors"}
    model.eval()
    with torch.no_grad():
        out = np.concatenate([model(torch.from_numpy(gi[i: i + 8])).numpy() for i in range(0, len(gi), 8)])
    if out.shape != gl.shape:
        return {"passed": False, "n": int(len(gi)), "reason": f"golden logits shape {gl.shape} != model {out.shape}"}
    dev = float(np.max(np.abs(out - gl)))
    agree = float(np.mean(out.argmax(1) == gl.argmax(1)))
    return {"passed": bool(np.isfinite(dev) and dev <= tolerance and agree == 1.0), "n": int(len(gi)),
            "max_abs_deviation": dev, "tolerance": float(tolerance), "argmax_agreement": agree}


def _replace_folder(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` in as ``out``; the previous ``out`` is kept until the new one is in place."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_folder(out: Path) -> None:
    """After a crash inside :func:`_replace_folder`: between its two renames, put the previous model back;
    after them (killed while deleting the old folder), the new model is complete and the old one is
    garbage. Either way no ``.old-*`` or ``.tmp-*`` folder is left behind."""
    out = Path(out)
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not out.exists() and olds:
        os.replace(olds.pop(), out)
    for stale in olds + list(out.parent.glob(f".{out.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def train_from_pack(p, output, memory_budget_mb: Optional[float] = None, threads: Optional[int] = None,
                    export: bool = True, progress: bool = False, tflite: bool = True,
                    require_golden: bool = True, lean: bool = False, _t0: Optional[float] = None,
                    int8_min_agreement: float = INT8_MIN_AGREEMENT) -> Dict[str, Any]:
    """Train a loaded pack (any object with the :class:`edge_ser.packfile.Pack` attributes) into ``output``.

    Raises ``ValueError`` (bad pack, θ0 hash mismatch), :class:`memory.MemoryBudgetError` (budget cannot be
    met; raised before training) or ``RuntimeError`` (golden check failed); the previous model stays.
    """
    t_start = _t0 if _t0 is not None else time.perf_counter()
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    _check_pack(p)
    from .models import state_sha256

    if state_sha256(p.theta0) != p.theta0_sha256:
        raise ValueError(f"pack {p.pack_id}: initialisation tensors do not match their SHA-256 "
                         f"(expected {str(p.theta0_sha256)[:16]}…, got {state_sha256(p.theta0)[:16]}…); refusing to train")
    import torch

    from .models import build_model, load_state_arrays, state_arrays
    from .schedule import train_schedule

    plan = memory.plan_training(p.model_config, len(p.X), p.schedule.batch_size, threads, memory_budget_mb,
                                export=export, lean=lean)
    torch.set_num_threads(plan.threads)
    try:
        model = load_state_arrays(build_model(p.model_config), p.theta0)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"pack {p.pack_id}: initialisation does not fit the model config "
                         f"({' '.join(str(exc).split())[:160]})") from None
    t_train = time.perf_counter()
    heap = memory.use_lean_heap() if plan.lean_heap else "default"
    if plan.lean:
        history = train_schedule(model, p.X, p.y, p.schedule, progress=progress,
                                 chunk_floats=int(memory.LEAN_CHUNK_MB * (1 << 20) / 4))
    elif plan.exact:
        history = train_schedule(model, p.X, p.y, p.schedule, progress=progress)
    else:
        history = train_schedule(model, p.X, p.y, p.schedule, progress=progress, micro_batch=plan.micro_batch)
    train_seconds = time.perf_counter() - t_train
    train_peak = memory.peak_rss_mb()
    golden = golden_check(model, p.golden_inputs, p.golden_logits, p.golden_tolerance)
    golden["exact_schedule"] = plan.exact
    if not golden["passed"] and require_golden and plan.exact:
        raise RuntimeError(f"pack {p.pack_id}: golden-vector check failed (max logit deviation "
                           f"{golden.get('max_abs_deviation', float('nan')):.3g} > tolerance "
                           f"{golden.get('tolerance', float('nan')):.3g}, argmax agreement "
                           f"{golden.get('argmax_agreement', 0):.0%}); the model was not installed")
    warnings_list = []
    if not plan.exact:
        warnings_list.append(f"memory budget forced micro-batches of {plan.micro_batch} (schedule batch "
                             f"{plan.batch}): BatchNorm statistics differ from the server's, golden check informative only")

    from .runtime import model_metadata, save_npz

    meta = model_metadata(p.pack_id, p.classes, p.feature_config, p.model_config)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        arrays = state_arrays(model)
        save_npz(tmp / "model.npz", arrays, meta)
        from .export import calibration_set, file_info

        files = {"torch": file_info(tmp / "model.npz")}
        t_export = time.perf_counter()
        if export:
            from .export import export_all

            calib = calibration_set(p.X, getattr(p, "calibration", None))
            if tflite and memory_budget_mb is not None and \
                    memory.current_rss_mb() + memory.TFLITE_EXPORT_MB > float(memory_budget_mb):
                tflite = False
                warnings_list.append(f"TFLite export skipped: its converter process (TensorFlow) needs ~"
                                     f"{memory.TFLITE_EXPORT_MB:.0f} MB beside this one, beyond the "
                                     f"{memory_budget_mb:.0f} MB budget (the ONNX models are written; convert where "
                                     "TensorFlow fits)")
            files.update(export_all(model, tmp, meta, calib, tflite=tflite, warn=warnings_list.append))
            refuse_collapsed_int8(tmp, files, int8_min_agreement, warnings_list.append)
        export_seconds = time.perf_counter() - t_export
        provenance = dict(getattr(p, "provenance", {}) or {})
        info = {
            "format": MODEL_FORMAT,
            "pack_id": p.pack_id,
            "pack_sequence": getattr(p, "sequence", None),
            "pack_signed": getattr(p, "signed", None),
            "pack_key_id": getattr(p, "key_id", None),
            "classes": list(p.classes),
            "feature_config": p.feature_config.to_dict(),
            "model_config": p.model_config.to_dict(),
            "schedule": p.schedule.to_dict(),
            "theta0_sha256": p.theta0_sha256,
            "weights_sha256": state_sha256(arrays),
            "test_speakers": list(provenance.get("test_speakers") or []),
            "files": files,
            "golden": golden,
            "metrics": {"final_loss": history[-1]["loss"] if history else None, "epochs": len(history),
                        "steps": p.schedule.steps(len(p.X)), "n_synthetic": int(len(p.X))},
            "memory": plan.to_dict(),
            "timing": {"train_seconds": round(train_seconds, 3), "export_seconds": round(export_seconds, 3)},
            "peak_rss_mb": round(peak_rss_with_converter_mb(files), 1),
            "train_peak_rss_mb": round(train_peak, 1),
            "converter_peak_rss_mb": converter_peak_rss_mb(files),
            "threads": plan.threads,
            "warnings": warnings_list,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
        }
        (tmp / "model.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=json_default))
        _fsync_files(tmp)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for w in warnings_list:
        log.warning(w)
    peak = peak_rss_with_converter_mb(files)
    result = {
        "ok": True, "output": str(out), "pack_id": p.pack_id, "classes": list(p.classes),
        "golden": golden, "wall_seconds": round(time.perf_counter() - t_start, 3),
        "train_seconds": round(train_seconds, 3), "export_seconds": round(export_seconds, 3),
        "peak_rss_mb": round(peak, 1), "process_peak_rss_mb": round(memory.peak_rss_mb(), 1),
        "converter_peak_rss_mb": converter_peak_rss_mb(files),
        "memory_budget_mb": memory_budget_mb, "threads": plan.threads,
        "micro_batch": plan.micro_batch, "batch": plan.batch, "exact_schedule": plan.exact, "lean": plan.lean,
        "heap": heap,
        "estimate_mb": round(plan.estimate_mb, 1),
        "files": {k: (v.get("file") if isinstance(v, dict) else v) for k, v in files.items()},
        "sizes": {k: v.get("bytes") for k, v in files.items() if isinstance(v, dict) and v.get("bytes")},
        "int8_agreement": (files.get("onnx-int8") or {}).get("agreement_vs_fp32", {}).get("argmax_agreement"),
        "int8": "refused" if (files.get("onnx-int8") or {}).get("refused") else ("installed" if export else None),
        "warnings": warnings_list,
    }
    if memory_budget_mb is not None and peak > memory_budget_mb:
        result["warnings"].append(f"peak RSS {peak:.0f} MB exceeded the budget {memory_budget_mb:.0f} MB "
                                  "(estimate was too low)")
    return result


def converter_peak_rss_mb(files: Dict[str, Any]) -> Optional[float]:
    """Peak RSS of the TFLite converter process (TensorFlow, without torch: see :mod:`edge_ser.export_tflite`),
    MB, as it measured itself; where it could not (no /proc, or it failed), the peak of this process's waited-for
    children (``ru_maxrss``: an upper bound, it counts this process's own pages at the start). None: no conversion
    process was started."""
    process = (files.get("tflite") or {}).get("converter_process")
    if not isinstance(process, dict):
        return None
    own = process.get("peak_rss_mb")
    return round(float(own if own is not None else memory.peak_rss_mb(children=True)), 1)


def peak_rss_with_converter_mb(files: Dict[str, Any]) -> float:
    """train-local's peak RSS, MB: this process's, or the TFLite converter process's where that was higher."""
    return max(memory.peak_rss_mb(), converter_peak_rss_mb(files) or 0.0)


def refuse_collapsed_int8(folder: Path, files: Dict[str, Any], threshold: float, warn) -> None:
    """Remove each int8 model (ONNX, TFLite) whose top-1 agreement with fp32 on the pack's own vectors is
    below ``threshold`` (e.g. a quantisation that collapsed to one class); ``listen`` then runs fp32."""
    for key, name in (("onnx-int8", "model.int8.onnx"), ("tflite", "model.int8.tflite")):
        info = files.get(key)
        agree = ((info or {}).get("agreement_vs_fp32") or {}).get("argmax_agreement")
        if agree is None or agree >= threshold:
            continue
        (Path(folder) / name).unlink(missing_ok=True)
        files[key] = {"refused": True, "agreement_vs_fp32": info["agreement_vs_fp32"], "threshold": threshold}
        if "converter_process" in info:      # (its memory still counts in peak_rss_mb)
            files[key]["converter_process"] = info["converter_process"]
        warn(f"{name} refused: its top-1 agrees with fp32 on only {agree:.0%} of the pack's vectors (threshold "
             f"{threshold:.0%}); the fp32 model (model.onnx) is used instead")


def _fsync_files(folder: Path) -> None:
    """Flush every file of a model folder to disk before the folder is swapped in."""
    for f in folder.iterdir():
        try:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError:
            pass
