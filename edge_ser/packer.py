"""Server-side ``edge_ser.pack()``: corpus -> features -> θ0 -> distillation -> golden vectors -> signed pack.

What ``edge-ser pack`` runs. The pack holds no audio: a few log-Mel feature samples per class (learned, or
with the default at IPC >= 10 usually real clips' features chosen by herding), θ0, configs, golden vectors
computed on those samples, and provenance.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("edge_ser.packer")

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


#: distillation statistics that point back at corpus files, clip indices, speakers or the server's disk: never
#: written into a pack (a device does not need them, and they identify real clips)
PRIVATE_STATS = ("indices", "init_indices", "experts", "workdir", "val_speakers", "paths")


def public_stats(stats: dict) -> dict:
    """``stats`` without what identifies real clips or server paths."""
    return {k: v for k, v in stats.items() if k not in PRIVATE_STATS}


def privacy_claim(syn, cfg) -> dict:
    """What a reviewer must know first: does any pack member hold real clips' features, and is it DP?
    Learned sets that start from real clips count as holding them (a set can stay close to its start:
    ``edge-ser pack audit`` measures how close)."""
    from .distill.base import REAL_CLIP_METHODS

    if syn.method in REAL_CLIP_METHODS:
        real, init = True, f"real clips, unchanged ({syn.method})"
    elif syn.stats.get("init") == "mixture":
        real, init = False, f"learned from mixtures of {syn.stats.get('mix_clips')} real clips each, one per speaker"
    elif cfg.init == "real":
        real, init = True, "learned from a start of real clips"
        if syn.stats.get("best_iteration") == 0:
            init = "real clips, unchanged (the distillation kept its start of real clips)"
    else:
        real, init = False, f"learned from {cfg.init}"
    return {"real_clips": real, "init": init, "epsilon": None, "delta": None}


def check_output(output) -> Path:
    """The pack file to write, refused at once when it cannot be written (a folder, a missing or read-only
    folder): otherwise the failure would come after the whole distillation."""
    if not output:
        raise ValueError("no output file: pass -o FILE.pack")
    out = Path(output).expanduser()
    if out.is_dir():
        raise ValueError(f"-o {output}: is a folder; give a file name, e.g. -o {out / 'corpus.pack'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"-o {output}: folder {parent} does not exist; create it first (mkdir -p {parent})")
    try:        # a real probe: permission bits say nothing for root, /proc or a read-only mount
        import tempfile

        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.probe-"):
            pass
    except OSError as exc:
        raise PermissionError(f"-o {output}: cannot write in {parent} ({exc.strerror or exc}); "
                              "choose another -o") from None
    return out


def pack(corpus, output, method: Optional[str] = None, ipc: int = 10, test_speakers=None, seed: int = 0,
         fmt: Optional[str] = None, key=None, model: str = "convnet", iterations: Optional[int] = None,
         progress: bool = True, params: Optional[dict] = None, threads: Optional[int] = None,
         deployment: Optional[str] = None) -> dict:
    """Distil ``corpus`` (a path, or ``"demo"``) into a signed pack at ``output``.

    ``params`` are the method's own settings (its module docstring lists them), e.g. fixed-init's
    ``{"epoch_grid": (80, 120)}`` to keep the device's schedule at 120 epochs or fewer. ``threads``: torch
    threads for distillation (None: the method's default); 1 is far faster on a busy machine.

    Held-out speakers (``test_speakers``, e.g. ``"19-24"``; default the last quarter) never enter
    distillation. Signs with ``key`` (default ``$EDGE_SER_HOME/signing.key`` or
    ``~/.config/edge-ser/signing.key``, created with a loud note if there is none).

    >>> info = pack("demo", "demo.pack", ipc=10)          # doctest: +SKIP
    >>> info["pack_id"], info["bytes"]                     # doctest: +SKIP
    """
    t0 = time.perf_counter()
    # everything a user can get wrong is refused here, in well under a second, before torch loads
    output = check_output(output)
    from .corpora.problems import check_corpus_path, report_problems

    check_corpus_path(corpus, fmt)
    if int(ipc) < 1:
        raise ValueError(f"--ipc must be at least 1 (synthetic samples per class), got {ipc}")
    if iterations is not None and int(iterations) < 0:
        raise ValueError(f"--iterations must be 0 or more, got {iterations}")
    from .distill import DEFAULT_METHOD, DistillConfig

    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    cfg = DistillConfig(method=method or DEFAULT_METHOD, ipc=int(ipc), iterations=iterations, seed=int(seed),
                        threads=threads, params=tuple(sorted((params or {}).items())))

    from .corpora import open_corpus

    corp = open_corpus(corpus, fmt)     # scanned before torch loads: an unusable layout fails at once
    from . import signing

    # the key next: failing after a long distillation would waste the user's time
    key_note = None
    key_path = Path(key).expanduser() if key else signing.default_private_key()
    if not key and not key_path.exists():
        info = signing.keygen(None)
        key_note = f"created a new signing key pair in {Path(info['private_key']).parent} (copy signing.pub to devices)"
        log.warning(key_note)
    private_key = signing.load_private_key(key_path)

    import torch

    from .config import default_model_config
    from .corpora import load_features
    from .data import default_test_speakers, parse_speakers
    from .distill import distill
    from .models import build_model, input_stats, set_input_stats, state_arrays
    from .packfile import write_pack
    from .schedule import train_schedule
    from .train import predict_logits

    corpus_bytes = int(sum(os.path.getsize(u.path) for u in corp.utterances if os.path.exists(u.path)))
    fs, problems = load_features(corp, progress=progress)
    left_out = report_problems(problems)
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

    # golden vectors: θ0 trained with the pack's own schedule on the synthetic set, logits on a few of the
    # pack's own samples (no other clip of the corpus enters the pack)
    trained = build_model(model_cfg, seed=int(seed))
    trained.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in theta0.items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as a one-core device replays it: the check is then tightest there
    try:
        from .progress import phase

        with phase(f"golden vectors: θ0 trained with the pack's schedule ({syn.schedule.epochs} epochs, one thread)"):
            train_schedule(trained, syn.X, syn.y, syn.schedule)
    finally:
        torch.set_num_threads(threads)
    gidx = golden_indices(syn.hard_labels)
    golden_inputs = np.ascontiguousarray(syn.X[gidx], dtype=np.float32)
    golden_logits = predict_logits(trained, golden_inputs).astype(np.float32)

    created_ms = int(time.time() * 1000)
    provenance = {
        "corpus": corp.name, "corpus_format": corp.format, "corpus_utterances": int(len(fs)),
        "corpus_bytes": corpus_bytes, "train_speakers": len(train.speaker_ids()), "test_speakers": test.speaker_ids(),
        "train_utterances": int(len(train)), "method": syn.method, "ipc": int(syn.ipc), "seed": int(seed),
        "iterations": iterations, "params": _jsonable(dict(cfg.params)), "versions": _versions(),
        "created_ms": created_ms,
        "golden": f"logits of θ0 trained with the schedule on synthetic samples {gidx.tolist()}",
        "distill_stats": _jsonable(public_stats(syn.stats)), "distill_seconds": round(distill_seconds, 2),
        "problems": len(left_out), "privacy": privacy_claim(syn, cfg),
    }
    if provenance["privacy"]["real_clips"]:
        log.warning(f"this pack holds real clips' features ({provenance['privacy']['init']}); it does not keep the "
                    "corpus on the server. Measure it: edge-ser pack audit PACK CORPUS")
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
              "real_clips": provenance["privacy"]["real_clips"],
              "distill_seconds": round(distill_seconds, 2), "seconds": round(time.perf_counter() - t0, 2)}
    if left_out:
        result["left_out"] = left_out
    if key_note:
        result["note"] = key_note
    return result
