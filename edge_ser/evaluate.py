"""``edge-ser evaluate``: UAR / WA / F1 / confusion of an exported (or torch) model on held-out speakers.

Features come from the same front-end and cache as training; classes are matched by name, so a model may
be scored on a corpus whose class set differs (only the shared classes count).

>>> r = evaluate("model/", "../shared/corpora/ravdess", speakers="19-24")    # doctest: +SKIP
>>> round(r["uar"], 3), r["runtime"]                                        # doctest: +SKIP
(0.412, 'onnx-int8')
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np


def evaluate(model, corpus, speakers: Optional[str] = None, fmt: Optional[str] = None,
             runtime: Optional[str] = None, threads: int = 1, batch: int = 16,
             progress: bool = False) -> Dict[str, Any]:
    """Score ``model`` (folder or file, see :func:`runtime.load_runtime`) on ``corpus`` (path or "demo").

    ``speakers``: e.g. "19-24"; default: the model's test speakers (model.json), else every speaker.
    Files that cannot be decoded are left out and listed one line each on stderr (and in ``left_out``);
    ``progress`` shows the feature extraction of a corpus not yet in the cache on stderr.
    """
    from .corpora import load_features
    from .corpora.problems import check_corpus_path, report_problems
    from .data import normalise_speaker, parse_speakers
    from .metrics import scores
    from .runtime import load_runtime

    check_corpus_path(corpus, fmt)
    runner = load_runtime(model, runtime=runtime, threads=threads)
    fs, problems = load_features(corpus, runner.feature_config, fmt=fmt, progress=progress)
    left_out = report_problems(problems)
    info = getattr(runner, "model_info", None) or {}
    wanted = parse_speakers(speakers) if speakers else list(info.get("test_speakers") or [])
    source = "--speakers" if speakers else ("model test speakers" if wanted else "all speakers")
    if wanted:
        known = fs.speaker_ids()
        try:
            ids = sorted({normalise_speaker(s, known) for s in wanted})
        except ValueError as exc:
            if speakers:
                raise
            ids = []  # the model's test speakers are not in this corpus: score everyone
            source = f"all speakers (model test speakers not in this corpus: {exc})"
        if ids:
            fs = fs.subset(np.flatnonzero(np.isin(fs.speakers, ids)))
    model_classes = list(runner.classes)
    shared = [c for c in fs.classes if c in model_classes]
    if not shared:
        raise ValueError(f"model classes ({', '.join(model_classes)}) and corpus classes "
                         f"({', '.join(fs.classes)}) have none in common")
    keep = np.isin(np.asarray(fs.classes)[fs.y], shared)
    fs = fs.subset(np.flatnonzero(keep))
    if len(fs) == 0:
        raise ValueError("no utterances left to evaluate (speakers/classes filter removed everything)")
    logits = np.concatenate([runner.predict_logits(fs.X[i: i + batch]) for i in range(0, len(fs), batch)])
    # predictions over the shared classes only; labels re-indexed into model class order
    cols = [model_classes.index(c) for c in shared]
    pred = np.asarray(cols)[logits[:, cols].argmax(axis=1)]
    pred_names = np.asarray(model_classes)[pred]
    index = {c: i for i, c in enumerate(shared)}
    y_true = np.array([index[fs.classes[k]] for k in fs.y])
    y_pred = np.array([index[c] for c in pred_names])
    out = scores(y_true, y_pred, len(shared), shared)
    out.update({"runtime": runner.name, "classes": shared, "model_classes": model_classes,
                "corpus_classes": list(fs.classes), "speakers": sorted(set(fs.speakers.tolist())),
                "speaker_source": source, "model": str(model), "corpus": str(corpus)})
    if left_out:
        out["left_out"] = left_out
    dropped = [c for c in model_classes if c not in shared]
    if dropped:
        out["note"] = f"model classes not in corpus ignored: {', '.join(dropped)}"
    return out


def format_evaluation(d: Dict[str, Any]) -> str:
    """Readable report: headline metrics, per-class recall and the confusion matrix."""
    lines = [f"runtime {d['runtime']}  n={d['n']}  speakers: {', '.join(d['speakers'][:12])}"
             f"{' ...' if len(d['speakers']) > 12 else ''} ({d['speaker_source']})",
             f"UAR {d['uar']:.3f}   WA {d['wa']:.3f}   macro-F1 {d['f1']:.3f}", "recall:"]
    lines += [f"  {c:<12} {r:.3f}" for c, r in d["recall"].items()]
    classes = d["classes"]
    w = max(6, max(len(c) for c in classes) + 1)
    lines.append("confusion (rows true, columns predicted):")
    lines.append(" " * w + "".join(f"{c[:5]:>6}" for c in classes))
    for c, row in zip(classes, d["confusion"]):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>6}" for v in row))
    if d.get("note"):
        lines.append(d["note"])
    return "\n".join(lines)
