"""TESS (Toronto emotional speech set): ``OAF_angry/OAF_back_angry.wav``; speaker OAF / YAF.

The emotion is the last part of the file name (``ps``, ``pleasant_surprise(d)`` -> surprised); when the
folder also names one (``YAF_sad``) the two must agree, else the file is a labelling problem.
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import Corpus, Layout, Problem, Utterance, audio_files, mostly, ordered_classes, sample_audio_files

EMOTIONS = {"neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry", "fear": "fearful",
            "disgust": "disgust", "ps": "surprised", "pleasant_surprise": "surprised",
            "pleasant_surprised": "surprised", "surprise": "surprised", "surprised": "surprised"}
CLASSES = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
SPEAKERS = ("OAF", "YAF")
NAME = re.compile(r"^([A-Za-z]{2,4}\d*)_([^_]+)_(.+)$")
FOLDER = re.compile(r"^([A-Za-z]{2,4}\d*)_(.+)$")


def _emotion(text: str):
    return EMOTIONS.get(text.lower().replace(" ", "_"))


class Tess(Layout):
    name = "tess"
    description = "TESS: OAF_angry/OAF_back_angry.wav (speaker OAF/YAF; ps = pleasant surprise)"

    def detect(self, root: Path) -> bool:
        def ok(f: Path) -> bool:
            m = NAME.match(f.stem)
            return bool(m) and m.group(1).upper() in SPEAKERS and _emotion(m.group(3)) is not None
        return mostly(sample_audio_files(root, 100), ok)

    def scan(self, root: Path) -> Corpus:
        utts, problems = [], []
        for f in audio_files(root):
            rel = str(f.relative_to(root))
            m = NAME.match(f.stem)
            if not m:
                problems.append(Problem(rel, "name is not SPK_word_emotion (e.g. OAF_back_angry); cannot label it"))
                continue
            speaker, _, code = m.groups()
            label = _emotion(code)
            if label is None:
                problems.append(Problem(rel, f"unknown emotion {code!r} (known: {', '.join(sorted(EMOTIONS))})"))
                continue
            folder = FOLDER.match(f.parent.name)
            if folder and _emotion(folder.group(2)) not in (None, label):
                problems.append(Problem(rel, f"file says {label} but folder {f.parent.name} says "
                                             f"{_emotion(folder.group(2))}; mislabeled"))
                continue
            utts.append(Utterance(str(f), label, speaker.upper(), rel))
        return Corpus("tess", str(root), self.name, ordered_classes([u.label for u in utts], CLASSES),
                      utts, problems)
