"""One folder per class: ``root/<class>/*.wav`` (optionally ``root/<class>/<speaker>/*.wav``).

The class is the folder name (lower-cased). The speaker comes from a ``spk_`` prefix (``spk_07_take1.wav``
or a ``spk_07/`` sub-folder) or else from the file-name part before the first ``_`` or ``-``
(``anna_001.wav`` -> ``anna``). Speaker-independent splits need real speaker ids: name files that way.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .base import Corpus, Layout, Problem, Utterance, audio_files, ordered_classes, sample_audio_files

SPK = re.compile(r"^spk[_-]?([A-Za-z0-9]+)", re.IGNORECASE)
PREFIX = re.compile(r"^([^_\-]+)[_\-].")
UNKNOWN = "unknown"


def guess_speaker(path: Path, class_dir: Path | None = None) -> str:
    """Speaker id of a file: ``spk_ID`` from a ``spk`` folder or prefix, else the name before ``_``/``-``.

    >>> guess_speaker(Path("happy/spk_07_take1.wav")), guess_speaker(Path("happy/anna-001.wav"))
    ('spk_07', 'anna')
    """
    if class_dir is not None:
        for part in path.relative_to(class_dir).parts[:-1]:
            m = SPK.match(part)
            if m:
                return f"spk_{m.group(1)}"
    m = SPK.match(path.stem)
    if m:
        return f"spk_{m.group(1)}"
    m = PREFIX.match(path.stem)
    return m.group(1) if m else UNKNOWN


def speaker_note(utts, how: str) -> list:
    """The notes every layout that guesses speakers from names adds (one line each)."""
    notes = [Problem(".", f"speakers taken from {how}; speaker-independent splits need real speaker ids "
                          "(name files spk_ID_*.wav or ID_*.wav)", "note")]
    unknown = sum(u.speaker == UNKNOWN for u in utts)
    if unknown:
        notes.append(Problem(".", f"{unknown} file(s) carry no speaker prefix: speaker '{UNKNOWN}'", "note"))
    if len({u.speaker for u in utts}) == 1 and utts:
        notes.append(Problem(".", "only one speaker found: no speaker-independent split is possible", "note"))
    return notes


class Folders(Layout):
    name = "folders"
    description = "one folder per class: root/<class>/*.wav (speaker from spk_ID_ or ID_ file-name prefix)"

    def detect(self, root: Path) -> bool:
        if not root.is_dir():
            return False
        return any(len(f.relative_to(root).parts) >= 2 for f in sample_audio_files(root, 200))

    def scan(self, root: Path) -> Corpus:
        utts, problems = [], []
        for f in audio_files(root):
            parts = f.relative_to(root).parts
            rel = str(f.relative_to(root))
            if len(parts) < 2:
                problems.append(Problem(rel, "not inside a class folder; cannot label it"))
                continue
            label = parts[0].strip().lower()
            utts.append(Utterance(str(f), label, guess_speaker(f, root / parts[0]), rel))
        found = Counter(u.label for u in utts)
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if d.name.strip().lower() not in found:
                problems.append(Problem(d.name + "/", "class folder holds no audio files: class left out"))
        if utts:
            problems += speaker_note(utts, "file names (folders layout)")
        return Corpus(root.name or "folders", str(root), self.name, ordered_classes(list(found)), utts, problems)
