"""Find the layout of a corpus folder (or take ``--format``) and scan it."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from .base import Corpus, Layout
from .ravdess import Ravdess

#: Layouts in detection order: the most specific first, the generic ones last.
LAYOUTS: Dict[str, Layout] = {layout.name: layout for layout in (Ravdess(),)}


class CorpusError(ValueError):
    """A corpus that cannot be used at all (missing, empty, undetectable, < 2 classes)."""


def open_corpus(path, fmt: Optional[str] = None) -> Corpus:
    """Scan the corpus at ``path``; detect the layout unless ``fmt`` names one of :data:`LAYOUTS`."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"{root}: no such corpus folder or file")
    if fmt:
        if fmt not in LAYOUTS:
            raise CorpusError(f"unknown --format {fmt!r}; known: {', '.join(LAYOUTS)}")
        layout = LAYOUTS[fmt]
    else:
        layout = next((l for l in LAYOUTS.values() if l.detect(root)), None)
        if layout is None:
            raise CorpusError(f"{root}: layout not recognised; use --format ({', '.join(LAYOUTS)})")
    corpus = layout.scan(root.resolve() if root.is_dir() else root)
    if not corpus.utterances:
        raise CorpusError(f"{root}: no usable utterances found as {layout.name}")
    if len(corpus.classes) < 2:
        raise CorpusError(f"{root}: only {len(corpus.classes)} class(es) found; need at least 2")
    return corpus
