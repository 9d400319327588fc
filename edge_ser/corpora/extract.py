"""Corpus -> FeatureSet: decode, fix length, log-Mel; on both cores; cached on disk.

The cache key is the SHA-256 of every file's bytes plus the feature config, so an edited file or a
changed front-end never reuses stale features. Unreadable files become one problem line each and
the rest of the corpus still loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..audio import AudioError, load_audio
from ..config import FeatureConfig
from ..data import FeatureSet
from ..features import extract
from ..files import atomic_write
from .base import Corpus, Problem, map_files
from .detect import open_corpus

CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$EDGE_SER_CACHE`` or ``~/.cache/edge-ser``."""
    return Path(os.environ.get("EDGE_SER_CACHE", Path.home() / ".cache" / "edge-ser"))


def file_sha256(path: str) -> str:
    """SHA-256 of a regular file; ``OSError`` for anything else (a FIFO would block, a device never end)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"not a regular file but {_kind(path)}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _kind(path: str) -> str:
    mode = os.stat(path).st_mode
    return "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"


def hash_utterances(corpus: Corpus) -> Tuple[Corpus, List[str], List[Problem]]:
    """Hash every file; ones that cannot be read (permissions, broken symlink, FIFO, ...) become one
    problem line each and leave the returned corpus. ``(corpus, hashes, problems)``."""
    keep, hashes, problems = [], [], []
    for u in corpus.utterances:
        try:
            hashes.append(file_sha256(u.path))
            keep.append(u)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if isinstance(exc, FileNotFoundError) and os.path.islink(u.path):
                why = f"broken symbolic link to {os.readlink(u.path)}"
            problems.append(Problem(u.rel, f"cannot read the file ({why})"))
    if len(keep) != len(corpus.utterances):
        corpus = replace(corpus, utterances=keep)
    return corpus, hashes, problems


def _one(args) -> Tuple[Optional[np.ndarray], List[str], Optional[str]]:
    path, cfg_json = args
    cfg = FeatureConfig.from_dict(json.loads(cfg_json))
    try:
        audio = load_audio(path, cfg.sample_rate)
        return extract(audio.samples, cfg), audio.notes, None
    except AudioError as exc:
        return None, [], exc.reason
    except Exception as exc:  # anything else is still one line about one file
        return None, [], f"{type(exc).__name__}: {exc}"


def corpus_key(corpus: Corpus, cfg: FeatureConfig, hashes: List[str]) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{cfg.to_json()}|{corpus.format}|".encode())
    for u, digest in zip(corpus.utterances, hashes):
        h.update(f"{u.rel}|{u.label}|{u.speaker}|{digest}\n".encode())
    return h.hexdigest()[:32]


def load_features(path_or_corpus, cfg: FeatureConfig = FeatureConfig(), fmt: Optional[str] = None,
                  workers: Optional[int] = None, use_cache: bool = True,
                  progress: bool = False) -> Tuple[FeatureSet, List[Problem]]:
    """Features of a whole corpus: ``(FeatureSet, problems)``.

    >>> fs, problems = load_features("../shared/corpora/ravdess")   # doctest: +SKIP
    >>> fs.X.shape                                                  # doctest: +SKIP
    (1440, 64, 298)
    """
    corpus = path_or_corpus if isinstance(path_or_corpus, Corpus) else open_corpus(path_or_corpus, fmt)
    problems = list(corpus.problems)
    corpus, hashes, unreadable = hash_utterances(corpus)
    problems += unreadable
    key = corpus_key(corpus, cfg, hashes)
    cache_file = cache_dir() / "features" / f"{corpus.name}-{key}.npz"
    if use_cache and cache_file.exists():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                fs = FeatureSet(z["X"], z["y"], z["speakers"], tuple(z["classes"].tolist()), z["paths"], corpus.name)
                problems += [Problem(p, r, s) for p, r, s in z["problems"].tolist()]
            return fs, problems
        except Exception:
            pass  # unreadable cache: recompute
    # duplicates: identical bytes under two names are noted (both kept: they are two labelled takes)
    seen = {}
    for u, digest in zip(corpus.utterances, hashes):
        if digest in seen:
            problems.append(Problem(u.rel, f"byte-identical to {seen[digest]}", "note"))
        else:
            seen[digest] = u.rel
    jobs = [(u.path, cfg.to_json()) for u in corpus.utterances]
    results = map_files(_one, jobs, workers, wrap=lambda it: _progress(it, len(jobs), progress))
    X, keep = [], []
    for i, (feat, notes, error) in enumerate(results):
        rel = corpus.utterances[i].rel
        if error:
            problems.append(Problem(rel, error))
            continue
        problems += [Problem(rel, n, "note") for n in notes]
        X.append(feat)
        keep.append(i)
    if not keep:
        raise ValueError(f"{corpus.root}: no file could be decoded ({len(results)} tried)")
    utts = [corpus.utterances[i] for i in keep]
    class_index = {c: i for i, c in enumerate(corpus.classes)}
    present = sorted({u.label for u in utts}, key=lambda c: class_index[c])
    classes = tuple(present)
    index = {c: i for i, c in enumerate(classes)}
    fs = FeatureSet(np.stack(X), np.array([index[u.label] for u in utts]), np.array([u.speaker for u in utts]),
                    classes, np.array([u.rel for u in utts]), corpus.name)
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        found = np.array([(p.path, p.reason, p.severity) for p in problems], dtype=str).reshape(-1, 3)
        atomic_write(cache_file, write=lambda f: np.savez(f, X=fs.X, y=fs.y, speakers=fs.speakers, classes=np.array(classes),
                                                          paths=fs.paths, problems=found), durable=False)
    return fs, problems


def _progress(it, total, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc="features", unit="file", leave=False)
