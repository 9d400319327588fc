"""CREMA-D: ``AudioWAV/1001_DFA_ANG_XX.wav``; speaker = actor id (1001-1091), emotion = third field.

Fields: actor, sentence code, emotion (ANG DIS FEA HAP NEU SAD), intensity (LO MD HI XX).
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import Corpus, Layout, Problem, Utterance, audio_files, mostly, ordered_classes, sample_audio_files

EMOTIONS = {"NEU": "neutral", "HAP": "happy", "SAD": "sad", "ANG": "angry", "FEA": "fearful", "DIS": "disgust"}
CLASSES = tuple(EMOTIONS.values())
NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


class CremaD(Layout):
    name = "cremad"
    description = "CREMA-D: AudioWAV/1001_DFA_ANG_XX.wav (actor 1001, emotion ANG)"

    def detect(self, root: Path) -> bool:
        return mostly(sample_audio_files(root, 100), lambda f: NAME.match(f.stem))

    def scan(self, root: Path) -> Corpus:
        utts, problems = [], []
        for f in audio_files(root):
            rel = str(f.relative_to(root))
            m = NAME.match(f.stem)
            if not m:
                problems.append(Problem(rel, "name is not AAAA_SSS_EMO_II (e.g. 1001_DFA_ANG_XX); cannot label it"))
                continue
            actor, _, code, _ = m.groups()
            if code not in EMOTIONS:
                problems.append(Problem(rel, f"unknown emotion code {code!r} (known: {' '.join(EMOTIONS)})"))
                continue
            utts.append(Utterance(str(f), EMOTIONS[code], actor, rel))
        return Corpus("cremad", str(root), self.name, ordered_classes([u.label for u in utts], CLASSES),
                      utts, problems)
