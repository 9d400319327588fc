"""Server-side ``edge_ser.pack()``: corpus -> features -> θ0 -> distillation -> golden vectors -> signed pack.

What ``edge-ser pack`` runs. The real speech never enters the pack: only synthetic features, θ0, configs,
golden vectors computed *on synthetic inputs*, and provenance.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

#: how many golden inputs a pack carries (taken from the synthetic set, spread over the classes)
GOLDEN_COUNT = 8


def _versions() -> dict:
    from . import __version__

    out = {"edge_ser": __version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


def _jsonable(obj, depth: int = 0):
    """Keep only JSON-friendly, small parts of distillation stats (histories are trimmed)."""
    if depth > 4:
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(obj.items())[:64]}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in list(obj)[-50:]]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"array{list(obj.shape)}"
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if obj is None or isinstance(obj, (int, str, bool)):
        return obj
    return str(obj)


def golden_indices(labels: np.ndarray, count: int = GOLDEN_COUNT) -> np.ndarray:
    """Up to ``count`` synthetic-sample indices, round-robin over the classes (first of each, then second...)."""
    labels = np.asarray(labels)
    per_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out = []
    while len(out) < min(count, len(labels)):
        for idx in per_class:
            if idx and len(out) < count:
                out.append(idx.pop(0))
    return np.array(sorted(out), dtype=np.int64)


def golden_tolerance(logits: np.ndarray) -> float:
    """Max absolute logit difference a device may show after replaying the schedule: 5% of the largest
    logit, at least 0.1. Float rounding grows over hundreds of steps: on RAVDESS, 2 threads against the
    server's 1 drifted 0.04 over 120 SGD steps; on the demo corpus a 1e-7 change of the inputs grew to
    0.12 over 300 Adam steps (logits ~7), every argmax equal. A wrong θ0, set or schedule moves logits by units."""
    return float(max(0.1, 0.05 * float(np.abs(logits).max())))


def pack(corpus, output, method: Optional[str] = None, ipc: int = 10, test_speakers=None, seed: int = 0,
         fmt: Optional[str] = None, key=None, model: str = "convnet", iterations: Optional[int] = None,
         progress: bool = True, params: Optional[dict] = None, deployment: Optional[str] = None) -> dict:
    """Distil ``corpus`` (a path, or ``"demo"``) into a signed pack at ``output``.

    ``params`` are the method's own settings (its module docstring lists them), e.g. fixed-init's
    ``{"epoch_grid": (80, 120)}`` to keep the device's schedule at 120 epochs or fewer.

    Held-out speakers (``test_speakers``, e.g. ``"19-24"``; default the last quarter) never enter
    distillation. Signs with ``key`` (default ``$EDGE_SER_HOME/signing.key`` or
    ``~/.config/edge-ser/signing.key``, created with a loud note if there is none).

    >>> info = pack("demo", "demo.pack", ipc=10)          # doctest: +SKIP
    >>> info["pack_id"], info["bytes"]                     # doctest: +SKIP
    """
    import torch

    from . import signing
    from .config import default_model_config
    from .corpora import load_features, open_corpus
    from .data import default_test_speakers, parse_speakers
    from .distill import DEFAULT_METHOD, DistillConfig, distill
    from .models import build_model, input_stats, set_input_stats, state_arrays
    from .packfile import write_pack
    from .schedule import train_schedule
    from .train import predict_logits

    t0 = time.perf_counter()
    if not output:
        raise ValueError("no output file: pass -o FILE.pack")
    if ipc < 1:
        raise ValueError("--ipc must be at least 1")
    output = Path(output)
    cfg = DistillConfig(method=method or DEFAULT_METHOD, ipc=int(ipc), iterations=iterations, seed=int(seed),
                        params=tuple(sorted((params or {}).items())))

    # the key first: failing after a long distillation would waste the user's time
    key_note = None
    key_path = Path(key).expanduser() if key else signing.default_private_key()
    if not key and not key_path.exists():
        info = signing.keygen(None)
        key_note = f"created a new signing key pair in {Path(info['private_key']).parent} (copy signing.pub to devices)"
        sys.stderr.write(f"edge-ser: NOTE: {key_note}\n")
    private_key = signing.load_private_key(key_path)

    corp = open_corpus(corpus, fmt)
    corpus_bytes = int(sum(os.path.getsize(u.path) for u in corp.utterances if os.path.exists(u.path)))
    fs, problems = load_features(corp, progress=progress)
    speakers = fs.speaker_ids()
    held = parse_speakers(test_speakers) if test_speakers else default_test_speakers(speakers)
    train, test = fs.split_speakers(held)
    if len(train) == 0:
        raise ValueError("no training utterances left after holding out the test speakers")

    from .config import FeatureConfig

    feature_cfg = FeatureConfig()
    model_cfg = default_model_config(len(fs.classes), feature_cfg, arch=model)
    net = build_model(model_cfg, seed=int(seed))
    set_input_stats(net, *input_stats(train.X))
    theta0 = state_arrays(net)

    t_distill = time.perf_counter()
    syn = distill(train, cfg, model_cfg, theta0, progress=progress)
    distill_seconds = time.perf_counter() - t_distill

    # the pack stores the synthetic set as the model's stem sees it (4x smaller for a 2x2 stem, and none
    # of the real clips' detail the model cannot see); from here on the server uses exactly what a
    # device will reconstruct, so golden vectors and schedule hold bit for bit
    resolution = "stem" if model_cfg.arch == "convnet" and tuple(model_cfg.stem_pool) != (1, 1) else "input"
    stored = syn.X
    if resolution == "stem":
        from .packfile import from_stem, to_stem

        stored = to_stem(syn.X, theta0, model_cfg.stem_pool)
        syn.X = from_stem(stored, theta0, model_cfg.stem_pool, syn.X.shape[1:])

    # golden vectors: θ0 trained with the pack's own schedule on the synthetic set, logits on a few
    # synthetic inputs (never real speech: the pack must not carry the corpus)
    trained = build_model(model_cfg, seed=int(seed))
    trained.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in theta0.items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as a one-core device replays it: the check is then tightest there
    try:
        train_schedule(trained, syn.X, syn.y, syn.schedule)
    finally:
        torch.set_num_threads(threads)
    gidx = golden_indices(syn.hard_labels)
    golden_inputs = np.ascontiguousarray(syn.X[gidx], dtype=np.float32)
    golden_logits = predict_logits(trained, golden_inputs).astype(np.float32)

    created_ms = int(time.time() * 1000)
    provenance = {
        "corpus": corp.name, "corpus_format": corp.format, "corpus_utterances": int(len(fs)),
        "corpus_bytes": corpus_bytes, "train_speakers": train.speaker_ids(), "test_speakers": test.speaker_ids(),
        "train_utterances": int(len(train)), "method": syn.method, "ipc": int(syn.ipc), "seed": int(seed),
        "iterations": iterations, "params": _jsonable(dict(cfg.params)), "versions": _versions(),
        "created_ms": created_ms,
        "golden": f"logits of θ0 trained with the schedule on synthetic samples {gidx.tolist()}",
        "distill_stats": _jsonable(syn.stats), "distill_seconds": round(distill_seconds, 2),
        "problems": len(problems),
    }
    info = write_pack(output, X=stored, y=syn.y, classes=fs.classes, feature_config=feature_cfg,
                      model_config=model_cfg, schedule=syn.schedule, theta0=theta0,
                      golden_inputs=np.ascontiguousarray(stored[gidx]),
                      golden_logits=golden_logits, golden_tolerance=golden_tolerance(golden_logits),
                      provenance=provenance, calibration=None, sequence=created_ms, private_key=private_key,
                      created_ms=created_ms, resolution=resolution, deployment=deployment)
    result = {"ok": True, "path": info["path"], "pack_id": info["pack_id"], "sequence": info["sequence"],
              "bytes": info["bytes"], "corpus_bytes": corpus_bytes,
              "ratio": round(info["bytes"] / corpus_bytes, 5) if corpus_bytes else None,
              "method": syn.method, "ipc": int(syn.ipc), "samples": int(len(syn.X)), "classes": list(fs.classes),
              "train_speakers": len(train.speaker_ids()), "test_speakers": test.speaker_ids(),
              "signed": info["signed"], "key_id": signing.key_id(private_key.public_key()),
              "distill_seconds": round(distill_seconds, 2), "seconds": round(time.perf_counter() - t0, 2)}
    if key_note:
        result["note"] = key_note
    return result
