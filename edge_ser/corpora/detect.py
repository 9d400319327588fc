"""Find the layout of a corpus folder (or take ``--format``) and scan it.

``open_corpus("demo")`` (or ``fmt="demo"``) is the built-in synthetic demo corpus, built on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from .base import Corpus, Layout
from .cremad import CremaD
from .emodb import EmoDB
from .folders import Folders
from .iemocap import Iemocap
from .manifest import CsvManifest
from .ravdess import Ravdess
from .synthetic import Demo
from .tess import Tess

#: Layouts in detection order: the most specific first (file-name conventions, then IEMOCAP's folder
#: structure), then the generic ones (a CSV manifest, one folder per class). ``demo`` is never detected.
LAYOUTS: Dict[str, Layout] = {layout.name: layout for layout in (
    Ravdess(), EmoDB(), CremaD(), Tess(), Iemocap(), CsvManifest(), Folders(), Demo())}


class CorpusError(ValueError):
    """A corpus that cannot be used at all (missing, empty, undetectable, < 2 classes)."""


def is_demo(path, fmt: Optional[str] = None) -> bool:
    """True when ``path``/``fmt`` ask for the built-in demo corpus (the literal string ``"demo"``)."""
    return fmt == "demo" or (not fmt and isinstance(path, str) and path.strip() == "demo")


def detect_layout(root: Path) -> Optional[Layout]:
    """The first layout in :data:`LAYOUTS` that recognises ``root``, or ``None``."""
    return next((l for l in LAYOUTS.values() if l.detect(root)), None)


def open_corpus(path, fmt: Optional[str] = None) -> Corpus:
    """Scan the corpus at ``path``; detect the layout unless ``fmt`` names one of :data:`LAYOUTS`.

    >>> corpus = open_corpus("../shared/corpora/ravdess")       # doctest: +SKIP
    >>> corpus.format, len(corpus.utterances), len(corpus.speakers)  # doctest: +SKIP
    ('ravdess', 1440, 24)
    """
    if is_demo(path, fmt):
        corpus = LAYOUTS["demo"].scan(None)
        root = Path(corpus.root)
        layout = LAYOUTS["demo"]
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise CorpusError(f"{root}: no such corpus folder or file (or use 'demo' for the built-in demo corpus)")
        if fmt:
            if fmt not in LAYOUTS:
                raise CorpusError(f"unknown --format {fmt!r}; known: {', '.join(LAYOUTS)}")
            layout = LAYOUTS[fmt]
        else:
            layout = detect_layout(root)
            if layout is None:
                what = "no audio files or CSV manifest found" if root.is_dir() else "not a folder or .csv manifest"
                raise CorpusError(f"{root}: layout not recognised ({what}); use --format ({', '.join(LAYOUTS)})")
        try:
            corpus = layout.scan(root.resolve())
        except CorpusError:
            raise
        except (ValueError, OSError) as exc:
            raise CorpusError(" ".join(str(exc).split())) from None
    if not corpus.utterances:
        errors = [p for p in corpus.problems if p.severity == "error"]
        hint = f"; first problem: {errors[0].line()}" if errors else ""
        raise CorpusError(f"{root}: no usable utterances found as {layout.name} ({len(errors)} problem(s)){hint}")
    if len(corpus.classes) < 2:
        empty = [p.path.rstrip("/") for p in corpus.problems if "holds no audio" in p.reason]
        extra = f"; empty class folder(s): {', '.join(empty)}" if empty else ""
        raise CorpusError(f"{root}: only {len(corpus.classes)} class(es) found ({', '.join(corpus.classes)}); "
                          f"need at least 2{extra}")
    return corpus
