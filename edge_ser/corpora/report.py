"""``edge-ser corpus info``: what is in a corpus (speakers, classes, counts, hours) and what is wrong with it.

Every file is decoded with the same loader training uses (:func:`edge_ser.audio.load_audio`), so a corrupt,
truncated, empty, silent or too-short file shows up here as one error line, and oddities that do not stop
a file being used (stereo, DC offset, clipping, byte-identical duplicates) as notes. Per-file results are
cached on disk keyed by the file's SHA-256 and the loader's limits, so a second run only hashes.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from ..files import atomic_write
from .base import Problem, map_files

#: Bump when what a probe records changes; cached probes of another version are ignored.
PROBE_VERSION = 2
#: Near-duplicate test: same length and a 64-segment RMS envelope equal to within this (relative to RMS).
NEAR_DUP_TOL = 0.02


def _probe_key() -> str:
    from .. import audio

    return f"p{PROBE_VERSION}|{audio.MIN_SECONDS}|{audio.SILENCE_PEAK}|{audio.MAX_SECONDS}"


def probe_file(path: str) -> Dict:
    """Decode one file: ``{"ok", "reason", "notes", "seconds", "rate", "channels", "samples", "envelope"}``.

    ``envelope`` (RMS of 64 equal segments over the whole-file RMS) fingerprints the audio, so copies
    that differ only by dither or re-encoding are found as near-duplicates.

    >>> probe_file("speech.wav")["seconds"]      # doctest: +SKIP
    3.1
    """
    from ..audio import AudioError, load_audio

    try:
        import numpy as np

        a = load_audio(path)
        x = a.samples.astype(np.float64)
        segs = np.array_split(x, 64) if len(x) >= 64 else [x]
        env = np.array([np.sqrt(np.mean(s ** 2)) for s in segs]) / (np.sqrt(np.mean(x ** 2)) + 1e-12)
        return {"ok": True, "reason": "", "notes": list(a.notes), "seconds": round(a.seconds, 4),
                "rate": a.source_rate, "channels": a.channels, "samples": int(len(x)),
                "envelope": [round(float(v), 4) for v in env]}
    except AudioError as exc:
        return {"ok": False, "reason": exc.reason, "notes": [], "seconds": 0.0, "rate": None, "channels": None}
    except Exception as exc:  # still one line about one file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return {"ok": False, "reason": reason, "notes": [], "seconds": 0.0, "rate": None, "channels": None}


def _cache_file() -> Path:
    from .extract import cache_dir

    return cache_dir() / "info" / f"probes-v{PROBE_VERSION}.json"


def _load_cache() -> Dict[str, Dict]:
    try:
        with open(_cache_file()) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: Dict[str, Dict]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(cache).encode(), durable=False)
    except OSError:
        pass  # a cache that cannot be written only costs time


def corpus_info(path, fmt: Optional[str] = None, workers: Optional[int] = None, use_cache: bool = True) -> Dict:
    """Scan and decode a corpus; return a JSON-able report.

    Keys: format, name, root, speakers (count), speaker_ids, speaker_counts, classes, class_counts,
    files (usable), files_listed, hours, seconds (min/median/max), sample_rates, channels, problems
    (error lines: files left out), notes (one-line remarks on files that are used), seconds_taken,
    probes_cached.

    >>> r = corpus_info("../shared/corpora/ravdess")            # doctest: +SKIP
    >>> r["speakers"], len(r["classes"]), r["files"], r["problems"]  # doctest: +SKIP
    (24, 8, 1440, [])
    """
    from .detect import open_corpus
    from .extract import hash_utterances

    t0 = time.perf_counter()
    corpus, hashes, unreadable = hash_utterances(open_corpus(path, fmt))
    utts = corpus.utterances
    key = _probe_key()
    cache = _load_cache() if use_cache else {}
    results: List[Optional[Dict]] = [cache.get(f"{h}|{key}") for h in hashes]
    missing = [i for i, r in enumerate(results) if r is None]
    cached = len(utts) - len(missing)
    if missing:
        paths = [utts[i].path for i in missing]
        fresh = map_files(probe_file, paths, workers)
        for i, r in zip(missing, fresh):
            results[i] = r
            cache[f"{hashes[i]}|{key}"] = r
        if use_cache:
            _save_cache(cache)

    problems: List[Problem] = [p for p in corpus.problems] + unreadable
    seen: Dict[str, str] = {}
    usable = []
    for u, h, r in zip(utts, hashes, results):
        if not r["ok"]:
            problems.append(Problem(u.rel, r["reason"]))
            continue
        usable.append((u, r))
        problems += [Problem(u.rel, n, "note") for n in r["notes"]]
        if h in seen:
            problems.append(Problem(u.rel, f"byte-identical to {seen[h]} (a duplicate; both kept)", "note"))
        else:
            seen[h] = u.rel
    problems += _near_duplicates(usable, hashes_of={u.rel: h for u, h in zip(utts, hashes)})

    from ..data import _natural_key

    class_counts = Counter(u.label for u, _ in usable)
    classes = [c for c in corpus.classes if class_counts.get(c)]
    speaker_counts = Counter(u.speaker for u, _ in usable)
    speaker_ids = sorted(speaker_counts, key=_natural_key)
    secs = sorted(r["seconds"] for _, r in usable)
    rates = Counter(r["rate"] for _, r in usable)
    chans = Counter(r["channels"] for _, r in usable)
    return {
        "format": corpus.format,
        "name": corpus.name,
        "root": corpus.root,
        "speakers": len(speaker_ids),
        "speaker_ids": speaker_ids,
        "speaker_counts": {s: speaker_counts[s] for s in speaker_ids},
        "classes": classes,
        "class_counts": {c: class_counts[c] for c in classes},
        "files": len(usable),
        "files_listed": len(utts),
        "hours": round(sum(secs) / 3600.0, 4),
        "seconds": {"min": secs[0], "median": secs[len(secs) // 2], "max": secs[-1]} if secs else {},
        "sample_rates": {str(k): v for k, v in sorted(rates.items())},
        "channels": {str(k): v for k, v in sorted(chans.items())},
        "problems": [p.line() for p in problems if p.severity == "error"],
        "notes": [p.line() for p in problems if p.severity != "error"],
        "seconds_taken": round(time.perf_counter() - t0, 3),
        "probes_cached": cached,
    }


def _near_duplicates(usable, hashes_of) -> List[Problem]:
    """Notes for files whose audio matches an earlier file's to within dither (different bytes).

    Candidates share the decoded length; within a length, envelopes are compared with numpy (huge
    equal-length groups are first bucketed by a coarse envelope, which may miss a pair on a bucket edge).
    """
    import numpy as np

    groups: Dict[tuple, list] = {}
    for u, r in usable:
        env = r.get("envelope") or []
        key = (r.get("samples", -1), len(env))
        groups.setdefault(key, []).append((u, env))
    if any(len(g) > 4000 for g in groups.values()):
        regrouped: Dict[tuple, list] = {}
        for key, g in groups.items():
            for u, env in g:
                coarse = tuple(np.round(np.asarray(env[:8]) * 5).astype(int).tolist()) if len(g) > 4000 else ()
                regrouped.setdefault(key + coarse, []).append((u, env))
        groups = regrouped
    notes = []
    for group in groups.values():
        if len(group) < 2 or not group[0][1]:
            continue
        E = np.asarray([env for _, env in group], dtype=np.float64)
        for j in range(1, len(group)):
            diff = np.abs(E[:j] - E[j]).max(axis=1)
            i = int(np.argmin(diff))
            u, v = group[j][0], group[i][0]
            if diff[i] <= NEAR_DUP_TOL and hashes_of[u.rel] != hashes_of[v.rel]:
                notes.append(Problem(u.rel, f"duplicate audio: same samples as {v.rel} to within dither "
                                            f"(not byte-identical; envelope differs by {diff[i]:.4f}); both kept",
                                     "note"))
    return notes


def format_report(r: Dict, max_lines: int = 40) -> str:
    """The human table ``edge-ser corpus info`` prints for a :func:`corpus_info` result."""
    out = [f"corpus      {r['name']}  (format {r['format']})",
           f"root        {r['root']}",
           f"files       {r['files']} usable of {r['files_listed']} listed, {r['hours']:.2f} h"
           + (f" (clips {r['seconds']['min']:.2f}-{r['seconds']['max']:.2f} s, median {r['seconds']['median']:.2f} s)"
              if r.get("seconds") else ""),
           f"speakers    {r['speakers']}: {_ids(r['speaker_ids'])}",
           f"classes     {len(r['classes'])}",
           "sample rate " + ", ".join(f"{k} Hz: {v}" for k, v in r["sample_rates"].items()),
           "channels    " + ", ".join(f"{_chan(k)}: {v}" for k, v in r["channels"].items()),
           "",
           f"  {'class':<14}{'files':>7}"]
    for c in r["classes"]:
        out.append(f"  {c:<14}{r['class_counts'][c]:>7}")
    if r["speakers"] < 2:
        out.append("\nwarning: fewer than 2 speakers; a speaker-independent split is impossible")
    for title, lines in (("problems (files left out)", r["problems"]), ("notes", r["notes"])):
        out.append(f"\n{title}: {len(lines)}")
        out += [f"  {line}" for line in lines[:max_lines]]
        if len(lines) > max_lines:
            out.append(f"  ... {len(lines) - max_lines} more (see --json)")
    out.append(f"\n({r['seconds_taken']:.2f} s; {r['probes_cached']} of {r['files_listed']} files from the probe cache)")
    return "\n".join(out)


def _ids(ids: List[str], limit: int = 12) -> str:
    return " ".join(ids[:limit]) + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _chan(k: str) -> str:
    return {"1": "mono", "2": "stereo"}.get(k, f"{k} channels")
