"""What every corpus layout yields: utterances (path, label, speaker) and a list of problems.

A layout module implements :class:`Layout` (``detect`` and ``scan``); scanning never reads audio, it
only maps file names/manifests to labels and speakers. Decoding problems surface later, per file.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")


@dataclass(frozen=True)
class Utterance:
    path: str      # absolute path
    label: str     # canonical class name
    speaker: str   # speaker id as the corpus names it
    rel: str       # path relative to the corpus root (for reports and caches)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    severity: str = "error"   # "error": file left out; "note": file used, but worth knowing

    def line(self) -> str:
        return f"{self.severity}: {self.path}: {self.reason}"


@dataclass
class Corpus:
    """A scanned corpus: ``utterances`` usable, ``problems`` one line each, ``classes`` in label order."""

    name: str
    root: str
    format: str
    classes: Tuple[str, ...]
    utterances: List[Utterance]
    problems: List[Problem] = field(default_factory=list)

    @property
    def speakers(self) -> List[str]:
        from ..data import _natural_key

        return sorted({u.speaker for u in self.utterances}, key=_natural_key)


class Layout:
    """One corpus layout. ``name`` is what ``--format`` accepts."""

    name: str = ""
    description: str = ""

    def detect(self, root: Path) -> bool:
        raise NotImplementedError

    def scan(self, root: Path) -> Corpus:
        raise NotImplementedError


def audio_files(root: Path) -> List[Path]:
    """Every audio file under ``root`` (recursive, sorted, hidden files skipped)."""
    return list(iter_audio_files(root)) if root.is_dir() else []


def iter_audio_files(root: Path) -> Iterator[Path]:
    """Audio files under ``root`` in the same order as :func:`audio_files`, lazily (cheap detection)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                yield Path(dirpath) / name


def sample_audio_files(root: Path, limit: int = 200) -> List[Path]:
    """The first ``limit`` audio files under ``root`` (what layouts look at to detect themselves)."""
    if not root.is_dir():
        return []
    return list(itertools.islice(iter_audio_files(root), limit))


def mostly(files: Sequence[Path], test, fraction: float = 0.8) -> bool:
    """True when at least ``fraction`` of ``files`` (and at least one) pass ``test``."""
    return bool(files) and sum(bool(test(f)) for f in files) >= fraction * len(files)


#: Shared class vocabulary: every layout maps its own codes onto these names where they mean the same,
#: so models and reports read alike across corpora. Layout-specific classes keep their own name.
CANONICAL = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "bored")


def ordered_classes(found: Sequence[str], canonical: Sequence[str] = CANONICAL) -> Tuple[str, ...]:
    """Classes present, in the layout's canonical order (unknown ones after, alphabetically)."""
    present = set(found)
    return tuple([c for c in canonical if c in present] + sorted(present - set(canonical)))


def map_files(fn, items: Sequence, workers: Optional[int] = None, wrap=None) -> list:
    """``[fn(item) for item in items]``, in ``workers`` processes (default: up to 2) when there are more than 16.
    ``wrap`` wraps the iterator of results (a progress bar).

    The workers do not inherit this process's threads: a plain ``fork`` of a process that has already run torch
    or BLAS thread pools (a notebook, the test suite, a server that trained before) can leave a child waiting
    forever on a lock a vanished thread held, so they come from a ``forkserver`` (Linux, with ``fn``'s module
    preloaded; ``spawn`` elsewhere). As with ``spawn``, a script that calls this must guard its entry point with
    ``if __name__ == "__main__":``.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    wrap = wrap or (lambda it: it)
    workers = workers or min(2, os.cpu_count() or 1)
    if workers <= 1 or len(items) <= 16:
        return list(wrap(map(fn, items)))
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([fn.__module__])
    else:
        ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(wrap(pool.map(fn, items, chunksize=16)))
