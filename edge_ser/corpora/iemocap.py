"""IEMOCAP (standard release): ``Session1..5/dialog/EmoEvaluation/*.txt`` + ``sentences/wav/<dialog>/<utt>.wav``.

The usual 4-class convention: neutral, happy (with *excited* merged in), angry, sad; every other label
(frustrated, surprised, fear, disgust, other, xxx = no agreement) is left out and counted in one note.
Speaker = session + the speaker's gender from the utterance id (``Ses01F_impro01_M003`` -> ``Ses01M``).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import List

from .base import Corpus, Layout, Problem, Utterance, ordered_classes

FOUR_CLASS = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
CLASSES = ("neutral", "happy", "sad", "angry")
LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)")
SESSION = re.compile(r"^Session\d+$")
UTT = re.compile(r"^(Ses\d\d)[FM]_.+_([FM])\d+$")


def _sessions(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    if SESSION.match(root.name) and (root / "dialog" / "EmoEvaluation").is_dir():
        return [root]
    return sorted((d for d in root.iterdir() if SESSION.match(d.name) and (d / "dialog" / "EmoEvaluation").is_dir()),
                  key=lambda d: int(d.name[7:]))


class Iemocap(Layout):
    name = "iemocap"
    description = "IEMOCAP: Session1..5/dialog/EmoEvaluation/*.txt + sentences/wav (4 classes, exc -> happy)"

    def detect(self, root: Path) -> bool:
        return bool(_sessions(root))

    def scan(self, root: Path) -> Corpus:
        utts, problems = [], []
        left_out: Counter = Counter()
        for session in _sessions(root):
            for txt in sorted((session / "dialog" / "EmoEvaluation").glob("*.txt")):
                txt_rel = str(txt.relative_to(root))
                try:
                    text = txt.read_text(encoding="utf-8", errors="replace")
                except OSError as exc:
                    problems.append(Problem(txt_rel, f"cannot read ({exc.strerror or exc})"))
                    continue
                for line in text.splitlines():
                    m = LINE.match(line.strip())
                    if not m:
                        continue
                    utt, code = m.group(3), m.group(4).lower()
                    if code not in FOUR_CLASS:
                        left_out[code] += 1
                        continue
                    wav = session / "sentences" / "wav" / utt.rsplit("_", 1)[0] / f"{utt}.wav"
                    rel = str(wav.relative_to(root))
                    who = UTT.match(utt)
                    if not who:
                        problems.append(Problem(rel, f"utterance id {utt!r} in {txt.name} names no session/speaker"))
                        continue
                    if not wav.is_file():
                        problems.append(Problem(rel, f"labelled {code} in {txt.name} but the wav is missing"))
                        continue
                    utts.append(Utterance(str(wav), FOUR_CLASS[code], who.group(1) + who.group(2), rel))
        if left_out:
            detail = ", ".join(f"{k}: {v}" for k, v in left_out.most_common())
            problems.append(Problem("EmoEvaluation", f"4-class convention: {sum(left_out.values())} utterances "
                                                     f"with other labels left out ({detail})", "note"))
        return Corpus("iemocap", str(root), self.name, ordered_classes([u.label for u in utts], CLASSES),
                      utts, problems)
