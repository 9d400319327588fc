"""CSV manifest: a ``.csv`` file (or a folder holding ``manifest.csv`` / ``metadata.csv``) with columns
``path,label,speaker``; paths are relative to the CSV (absolute ones are taken as they are).

Header names are matched loosely (``file``/``filename``/``wav`` for path, ``emotion``/``class`` for label,
``speaker_id``/``actor`` for speaker). A missing speaker column falls back to file-name prefixes, noted.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from .base import Corpus, Layout, Problem, Utterance, ordered_classes
from .folders import guess_speaker, speaker_note

MANIFEST_NAMES = ("manifest.csv", "metadata.csv")
ALIASES = {"path": ("path", "file", "filename", "file_path", "filepath", "wav", "audio", "audio_path"),
           "label": ("label", "emotion", "class", "category"),
           "speaker": ("speaker", "speaker_id", "spk", "actor", "actor_id")}


def find_manifest(root: Path) -> Optional[Path]:
    """The CSV a path names: the file itself, or ``manifest.csv`` / ``metadata.csv`` inside a folder."""
    if root.is_file() and root.suffix.lower() == ".csv":
        return root
    if root.is_dir():
        for name in MANIFEST_NAMES:
            if (root / name).is_file():
                return root / name
    return None


def _columns(header) -> dict:
    lowered = {h.strip().lower(): h for h in header or [] if h is not None}
    out = {}
    for key, names in ALIASES.items():
        for n in names:
            if n in lowered:
                out[key] = lowered[n]
                break
    return out


class CsvManifest(Layout):
    name = "csv"
    description = "CSV manifest: FILE.csv or a folder with manifest.csv/metadata.csv (path,label,speaker)"

    def detect(self, root: Path) -> bool:
        manifest = find_manifest(root)
        if manifest is None:
            return False
        try:
            with open(manifest, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError):
            return root.is_file()  # named explicitly: let scan() say what is wrong
        cols = _columns(header)
        return "path" in cols and "label" in cols

    def scan(self, root: Path, name: Optional[str] = None) -> Corpus:
        manifest = find_manifest(root)
        if manifest is None:
            raise ValueError(f"{root}: no CSV manifest (a .csv file, or {' / '.join(MANIFEST_NAMES)} in the folder)")
        manifest = manifest.resolve()
        base = manifest.parent
        utts, problems, seen = [], [], {}
        try:
            fh = open(manifest, newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise ValueError(f"{manifest}: cannot read the manifest ({exc.strerror or exc})") from None
        with fh:
            reader = csv.DictReader(fh)
            cols = _columns(reader.fieldnames)
            if "path" not in cols or "label" not in cols:
                raise ValueError(f"{manifest}: needs a header with columns path,label[,speaker]; "
                                 f"found {','.join(reader.fieldnames or []) or 'nothing'}")
            guessed = "speaker" not in cols
            for row in reader:
                where = f"{manifest.name}:{reader.line_num}"
                if None in row:
                    problems.append(Problem(where, "more fields than the header names"))
                    continue
                raw = (row.get(cols["path"]) or "").strip()
                label = (row.get(cols["label"]) or "").strip().lower()
                if not raw:
                    problems.append(Problem(where, "no path"))
                    continue
                f = Path(raw) if Path(raw).is_absolute() else base / raw
                try:
                    rel = str(f.relative_to(base))
                except ValueError:
                    rel = str(f)
                if not label:
                    problems.append(Problem(rel, f"no label ({where}); cannot use it"))
                    continue
                if not f.is_file():
                    problems.append(Problem(rel, f"listed in {where} but no such file"))
                    continue
                key = str(f.resolve())
                if key in seen:
                    problems.append(Problem(rel, f"listed twice ({seen[key]} and {where}); second row ignored"))
                    continue
                seen[key] = where
                speaker = (row.get(cols["speaker"]) or "").strip() if not guessed else ""
                if not speaker:
                    speaker = guess_speaker(f)
                    guessed = True
                utts.append(Utterance(str(f), label, speaker, rel))
        if guessed and utts:
            problems += speaker_note(utts, "file names (the manifest has no speaker for some rows)")
        stem = base.name if manifest.name in MANIFEST_NAMES else manifest.stem
        return Corpus(name or stem or "csv", str(base), self.name, ordered_classes([u.label for u in utts]),
                      utts, problems)
