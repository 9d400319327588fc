"""RAVDESS (speech): ``Actor_NN/MM-VC-EE-II-SS-RR-AA.(wav|flac)``; emotion = field 3, actor = field 7."""
from __future__ import annotations

import re
from pathlib import Path

from .base import Corpus, Layout, Problem, Utterance, audio_files, mostly, ordered_classes, sample_audio_files

EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
CLASSES = tuple(EMOTIONS.values())
NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


class Ravdess(Layout):
    name = "ravdess"
    description = "RAVDESS: Actor_NN/03-01-EE-II-SS-RR-AA.wav"

    def detect(self, root: Path) -> bool:
        return mostly(sample_audio_files(root, 50), lambda f: NAME.match(f.stem))

    def scan(self, root: Path) -> Corpus:
        utts, problems = [], []
        for f in audio_files(root):
            rel = str(f.relative_to(root))
            m = NAME.match(f.stem)
            if not m:
                problems.append(Problem(rel, "name is not MM-VC-EE-II-SS-RR-AA; cannot label it"))
                continue
            modality, channel, emotion, _, _, _, actor = m.groups()
            if channel != "01":
                problems.append(Problem(rel, "song (vocal channel 02), not speech: skipped", "note"))
                continue
            if emotion not in EMOTIONS:
                problems.append(Problem(rel, f"unknown emotion code {emotion}"))
                continue
            parent = f.parent.name
            if parent.startswith("Actor_") and parent[6:].lstrip("0") != actor.lstrip("0"):
                problems.append(Problem(rel, f"actor {actor} in the name but folder {parent}"))
                continue
            utts.append(Utterance(str(f), EMOTIONS[emotion], f"Actor_{actor}", rel))
        return Corpus("ravdess", str(root), self.name, ordered_classes([u.label for u in utts], CLASSES),
                      utts, problems)
