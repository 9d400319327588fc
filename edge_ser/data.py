"""FeatureSet: a corpus as model inputs (log-Mels, labels, speakers) with speaker-independent splits.

>>> fs = FeatureSet(np.zeros((4, 64, 298), np.float32), np.array([0, 1, 0, 1]),
...                 np.array(["a", "a", "b", "b"]), ("neutral", "angry"))
>>> train, test = fs.split_speakers(["b"])
>>> len(train), len(test)
(2, 2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np


@dataclass
class FeatureSet:
    X: np.ndarray                     # (N, n_mels, frames) float32 raw log-Mels
    y: np.ndarray                     # (N,) int64 class indices
    speakers: np.ndarray              # (N,) str speaker ids
    classes: Tuple[str, ...]          # class names, index = label
    paths: Optional[np.ndarray] = None  # (N,) str source files (relative to the corpus root)
    name: str = ""

    def __post_init__(self):
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        self.speakers = np.asarray(self.speakers).astype(str)
        self.classes = tuple(self.classes)
        if not (len(self.X) == len(self.y) == len(self.speakers)):
            raise ValueError("X, y and speakers differ in length")
        if self.paths is not None:
            self.paths = np.asarray(self.paths).astype(str)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index) -> "FeatureSet":
        index = np.asarray(index)
        return FeatureSet(self.X[index], self.y[index], self.speakers[index], self.classes,
                          None if self.paths is None else self.paths[index], self.name)

    def speaker_ids(self) -> list[str]:
        return sorted(set(self.speakers.tolist()), key=_natural_key)

    def split_speakers(self, test_speakers: Iterable[str]) -> Tuple["FeatureSet", "FeatureSet"]:
        """(train, test) with every utterance of ``test_speakers`` in test. Unknown ids are an error."""
        wanted = {normalise_speaker(s, self.speaker_ids()) for s in test_speakers}
        mask = np.isin(self.speakers, sorted(wanted))
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))

    def class_counts(self) -> dict:
        return {c: int((self.y == i).sum()) for i, c in enumerate(self.classes)}


def _natural_key(s: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def normalise_speaker(spec: str, known: Sequence[str]) -> str:
    """Match a user-typed speaker id to a known one: exact, or numerically ("19" == "Actor_19" == "019")."""
    spec = str(spec).strip()
    if spec in known:
        return spec
    import re

    digits = re.sub(r"\D", "", spec)
    if digits:
        matches = [k for k in known if re.sub(r"\D", "", k) and int(re.sub(r"\D", "", k)) == int(digits)]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(f"unknown speaker {spec!r}; known speakers: {', '.join(known[:30])}{' ...' if len(known) > 30 else ''}")


def parse_speakers(text: str | None) -> list[str]:
    """'19-24' or '19,20,21' or 'Actor_19,Actor_20' -> list of ids (ranges expanded numerically)."""
    if not text:
        return []
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part and all(p.strip().isdigit() for p in part.split("-", 1)):
            lo, hi = (int(p) for p in part.split("-", 1))
            out += [str(i) for i in range(lo, hi + 1)]
        else:
            out.append(part)
    return out


def default_test_speakers(speakers: Sequence[str], fraction: float = 0.25) -> list[str]:
    """The last quarter of speakers in natural order (RAVDESS: actors 19-24), at least one."""
    ordered = sorted(speakers, key=_natural_key)
    k = max(1, int(round(len(ordered) * fraction)))
    if len(ordered) < 2:
        raise ValueError("a speaker-independent split needs at least 2 speakers")
    return ordered[-k:]
