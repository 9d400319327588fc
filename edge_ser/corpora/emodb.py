"""EmoDB (Berlin Database of Emotional Speech): ``wav/03a01Fa.wav``; speaker = chars 0-1, emotion = char 5.

Codes (German initials): W anger, L boredom, E disgust, A fear, F happiness, T sadness, N neutral; they
map onto the shared vocabulary (angry, bored, disgust, fearful, happy, sad, neutral).
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import Corpus, Layout, Problem, Utterance, audio_files, mostly, ordered_classes, sample_audio_files

EMOTIONS = {"W": "angry", "L": "bored", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
CLASSES = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "bored")
#: speaker (2 digits), text code (letter + 2 digits), emotion letter, version letter(s)
NAME = re.compile(r"^(\d\d)([a-z]\d\d)([A-Za-z])([a-z]{0,2})$")


class EmoDB(Layout):
    name = "emodb"
    description = "EmoDB (Berlin): wav/03a01Fa.wav (speaker 03, emotion letter F)"

    def detect(self, root: Path) -> bool:
        return mostly(sample_audio_files(root, 100), lambda f: NAME.match(f.stem) and f.stem[5] in EMOTIONS)

    def scan(self, root: Path) -> Corpus:
        utts, problems = [], []
        for f in audio_files(root):
            rel = str(f.relative_to(root))
            m = NAME.match(f.stem)
            if not m:
                problems.append(Problem(rel, "name is not SSaNNEv (e.g. 03a01Fa); cannot label it"))
                continue
            speaker, _, code, _ = m.groups()
            if code not in EMOTIONS:
                problems.append(Problem(rel, f"unknown emotion letter {code!r} (known: {''.join(EMOTIONS)})"))
                continue
            utts.append(Utterance(str(f), EMOTIONS[code], speaker, rel))
        return Corpus("emodb", str(root), self.name, ordered_classes([u.label for u in utts], CLASSES),
                      utts, problems)
