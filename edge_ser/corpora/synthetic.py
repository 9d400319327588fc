"""The built-in DEMO corpus: procedurally generated emotional "speech" so the pipeline runs offline.

A DEMO, not data: nothing is recorded, no accuracy claim rests on it (accuracy claims use real corpora
such as RAVDESS). It exists so that ``edge-ser pack demo`` and the tests run with no download.

How it is made (source-filter synthesis, deterministic from a seed): a glottal pulse train (Rosenberg
pulses) follows a pitch contour (declination + syllable accents + slow wander) with jitter and shimmer
and aspiration noise; per syllable a vowel's formants (F1-F4, cascade resonators) shape it, a fricative
noise burst precedes it, and a syllable-rate envelope gates it; spectral tilt, level, tempo and pitch
mean/range depend on the emotion; speakers differ in base pitch, formant scale (vocal-tract length),
speaking rate, breathiness and voice quality. Recording level and background noise vary per utterance
and the emotion ranges overlap, so the classes are separable but not trivially (a compact CNN gets well
below 100% UAR on held-out speakers).

Default: 8 speakers (odd male, even female) x 4 classes (neutral, happy, sad, angry) x 12 utterances of
2-3 s, written once as 16 kHz int16 WAV + ``manifest.csv`` into ``cache_dir()/demo-corpus-v1/`` (built in
a temporary folder, then renamed into place) and read back through the normal CSV-manifest loader.

>>> root = ensure_demo_corpus()              # doctest: +SKIP
>>> open_demo_corpus().classes               # doctest: +SKIP
('neutral', 'happy', 'sad', 'angry')
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .base import Corpus, Layout, Problem

VERSION = 1
CLASSES = ("neutral", "happy", "sad", "angry")

#: Vowel formants (Hz, adult male reference; scaled per speaker): a, e, i, o, u, schwa.
VOWELS = np.array([[730, 1090, 2440, 3400], [530, 1840, 2480, 3500], [270, 2290, 3010, 3600],
                   [570, 840, 2410, 3300], [300, 870, 2240, 3300], [500, 1500, 2500, 3450]], dtype=np.float64)
BANDWIDTHS = np.array([70.0, 100.0, 130.0, 170.0])


@dataclass(frozen=True)
class Prosody:
    """Emotion-dependent prosody: (mean, sd) pairs drawn per utterance; ranges overlap on purpose."""

    f0_mult: tuple        # pitch mean relative to the speaker's base
    range_st: tuple       # pitch-accent range, semitones
    level_db: tuple       # loudness relative to neutral
    tempo: tuple          # syllable-rate multiplier
    tilt: tuple           # >0 brighter (pressed, loud voice), <0 darker (soft voice)
    open_quotient: float  # shift of the glottal open quotient (pressed voice: shorter open phase)
    breath: float         # aspiration-noise multiplier
    jitter: float         # jitter / shimmer multiplier
    f1_shift: float       # relative F1 raise (wider mouth opening)


EMOTIONS = {
    "neutral": Prosody((1.00, 0.06), (2.0, 0.8), (0.0, 2.0), (1.00, 0.08), (0.00, 0.12), 0.00, 1.0, 1.0, 0.00),
    "happy": Prosody((1.20, 0.08), (5.0, 1.4), (2.5, 2.0), (1.10, 0.08), (0.12, 0.12), -0.04, 1.0, 1.1, 0.05),
    "sad": Prosody((0.92, 0.06), (1.4, 0.7), (-3.5, 2.0), (0.84, 0.08), (-0.2, 0.12), 0.06, 2.5, 1.5, -0.03),
    "angry": Prosody((1.13, 0.08), (3.6, 1.3), (5.0, 2.0), (1.12, 0.08), (0.35, 0.12), -0.14, 0.8, 1.2, 0.08),
}


@dataclass(frozen=True)
class DemoConfig:
    """Size and seed of the demo corpus (the default is what ``"demo"`` means)."""

    speakers: int = 8
    utterances: int = 12          # per speaker and class
    seed: int = 0
    sample_rate: int = 16000
    min_seconds: float = 2.0
    max_seconds: float = 3.0

    @property
    def folder_name(self) -> str:
        if self == DemoConfig():
            return f"demo-corpus-v{VERSION}"
        return (f"demo-corpus-v{VERSION}-s{self.seed}-k{self.speakers}x{self.utterances}"
                f"-r{self.sample_rate}-{self.min_seconds:g}-{self.max_seconds:g}")


@dataclass(frozen=True)
class Speaker:
    id: str
    f0: float
    formant_scale: float
    rate: float
    breath: float
    open_quotient: float
    jitter: float
    shimmer: float
    level_db: float
    tilt: float


def make_speakers(cfg: DemoConfig):
    """Speakers with varied voices, deterministic from ``cfg.seed``; odd numbers male, even female."""
    rng = np.random.default_rng([cfg.seed, 1_000_003])
    out = []
    for i in range(cfg.speakers):
        male = i % 2 == 0
        out.append(Speaker(
            id=f"spk{i + 1:02d}",
            f0=rng.uniform(95, 140) if male else rng.uniform(170, 240),
            formant_scale=rng.uniform(0.92, 1.03) if male else rng.uniform(1.07, 1.2),
            rate=rng.uniform(0.85, 1.15), breath=rng.uniform(0.02, 0.09), open_quotient=rng.uniform(0.5, 0.68),
            jitter=rng.uniform(0.004, 0.012), shimmer=rng.uniform(0.03, 0.08), level_db=rng.uniform(-2, 2),
            tilt=rng.uniform(-0.12, 0.12)))
    return out


def _resonator(freq: float, bw: float, sr: int):
    """Second-order resonator (unity gain at DC) for one formant."""
    r = np.exp(-np.pi * bw / sr)
    c = 2 * r * np.cos(2 * np.pi * freq / sr)
    a = np.array([1.0, -c, r * r])
    return np.array([a.sum()]), a


def _smooth_noise(rng, n: int, per_second: float, sr: int) -> np.ndarray:
    """Slowly varying unit noise (``per_second`` independent values per second, linearly interpolated)."""
    k = max(2, int(n / sr * per_second) + 2)
    return np.interp(np.arange(n), np.linspace(0, n, k), rng.standard_normal(k))


def synthesize(speaker: Speaker, emotion: str, rng: np.random.Generator, cfg: DemoConfig = DemoConfig()) -> np.ndarray:
    """One utterance of ``emotion`` by ``speaker``: float32 mono in [-1, 1] at ``cfg.sample_rate``."""
    from scipy.signal import lfilter

    sr = cfg.sample_rate
    p = EMOTIONS[emotion]
    draw = lambda pair: rng.normal(*pair)  # noqa: E731
    f0_mult, range_st, tempo = max(0.7, draw(p.f0_mult)), max(0.3, draw(p.range_st)), max(0.6, draw(p.tempo))
    tilt = float(np.clip(draw(p.tilt) + speaker.tilt, -0.6, 0.75))
    duration = rng.uniform(cfg.min_seconds, cfg.max_seconds)
    lead, trail = rng.uniform(0.08, 0.3), rng.uniform(0.08, 0.3)
    n = int(duration * sr)
    speech0, speech1 = int(lead * sr), n - int(trail * sr)
    syll_rate = 4.3 * speaker.rate * tempo
    n_syll = max(3, int(round((speech1 - speech0) / sr * syll_rate)))
    lengths = rng.uniform(0.7, 1.3, n_syll)
    bounds = speech0 + np.concatenate([[0], np.cumsum(lengths) / lengths.sum()]) * (speech1 - speech0)
    bounds = bounds.astype(int)

    # pitch contour (semitones around the mean): declination + syllable accents + slow wander + jitter
    t = np.arange(n)
    contour = np.interp(t, [speech0, speech1], [0.4 * range_st, -0.5 * range_st])
    for s in range(n_syll):
        if rng.random() < 0.45:
            a, b = bounds[s], bounds[s + 1]
            bump = np.sin(np.linspace(0, np.pi, b - a)) ** 2
            contour[a:b] += rng.uniform(0.3, 1.0) * range_st * bump * rng.choice([1.0, -0.4])
    contour += 0.35 * _smooth_noise(rng, n, 3.0, sr)
    jitter = speaker.jitter * p.jitter
    f0 = speaker.f0 * f0_mult * 2.0 ** (contour / 12.0) * (1 + jitter * _smooth_noise(rng, n, 150.0, sr))
    f0 = np.clip(f0, 60.0, 500.0)

    # glottal source: Rosenberg pulses, shimmer per period, lip radiation (first difference)
    phase = np.cumsum(f0 / sr)
    period = phase.astype(np.int64)
    frac = phase - period
    oq = float(np.clip(speaker.open_quotient + p.open_quotient + rng.normal(0, 0.03), 0.3, 0.85))
    tp, tn = 0.62 * oq, 0.38 * oq
    pulse = np.where(frac < tp, 0.5 * (1 - np.cos(np.pi * frac / tp)),
                     np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    shimmer = 1 + speaker.shimmer * p.jitter * rng.standard_normal(period[-1] + 2)
    source = np.diff(pulse * shimmer[period], prepend=0.0)
    source /= np.std(source) + 1e-9
    breath = speaker.breath * p.breath
    source += breath * 6 * rng.standard_normal(n) * (0.4 + pulse)

    # syllables: fricative onset + vowel nucleus through its formants, gated by a syllable envelope
    out = np.zeros(n)
    fscale = speaker.formant_scale * rng.uniform(0.97, 1.03)
    for s in range(n_syll):
        a, b = bounds[s], bounds[s + 1]
        length = b - a
        onset = int(length * rng.uniform(0.12, 0.3))
        formants = VOWELS[rng.integers(len(VOWELS))] * fscale
        formants[0] *= 1 + p.f1_shift
        formants *= rng.uniform(0.95, 1.05, 4)
        tail = int(0.03 * sr)
        seg = source[a + onset: min(n, b + tail)]
        env = np.ones(len(seg))
        ramp = min(len(seg) // 3, int(0.04 * sr))
        env[:ramp] = np.linspace(0, 1, ramp) ** 2
        env[-ramp:] = np.linspace(1, 0, ramp) ** 2
        env *= 1.0 - 0.25 * np.linspace(0, 1, len(seg))      # energy decays across the nucleus
        voiced = seg * env * rng.uniform(0.7, 1.0)
        for f, bw in zip(formants, BANDWIDTHS * rng.uniform(0.9, 1.2)):
            if f < sr / 2 - 200:
                bnum, aden = _resonator(f, bw, sr)
                voiced = lfilter(bnum, aden, voiced)
        out[a + onset: a + onset + len(voiced)] += voiced / (np.std(voiced) + 1e-9)
        if onset > 40 and rng.random() < 0.75:  # fricative or plosive release before the vowel
            cf = rng.uniform(2500, 6500) * min(1.0, fscale)
            bnum, aden = _resonator(min(cf, sr / 2 - 500), rng.uniform(800, 2000), sr)
            fric = lfilter(bnum, aden, rng.standard_normal(onset))
            fric *= np.hanning(onset) * rng.uniform(0.15, 0.45) / (np.std(fric) + 1e-9)
            out[a: a + onset] += fric

    # spectral tilt: brighter = more first-difference (pre-emphasis), darker = more one-pole low-pass
    if tilt >= 0:
        out = out + 2.5 * tilt * lfilter([1.0, -0.95], [1.0], out)
    else:
        out = (1 + tilt) * out + (-tilt) * 2.0 * lfilter([0.3], [1.0, -0.7], out)
    # level: emotion + speaker + recording gain; then background noise at a random SNR
    level_db = -24 + draw(p.level_db) + speaker.level_db + rng.uniform(-4, 4)
    rms = np.sqrt(np.mean(out[speech0:speech1] ** 2)) + 1e-12
    out *= 10 ** (level_db / 20) / rms
    snr_db = rng.uniform(12, 35)
    noise = rng.standard_normal(n)
    noise = 0.6 * noise + lfilter([0.2], [1.0, -0.8], noise)
    out += noise * (10 ** (level_db / 20) / 10 ** (snr_db / 20)) / (np.std(noise) + 1e-12)
    peak = np.max(np.abs(out))
    if peak > 0.98:
        out *= 0.98 / peak
    return out.astype(np.float32)


def demo_root(cfg: DemoConfig = DemoConfig()) -> Path:
    """Where the demo corpus lives (it may not be built yet)."""
    from .extract import cache_dir

    return cache_dir() / cfg.folder_name


def ensure_demo_corpus(cfg: DemoConfig = DemoConfig(), progress: bool = False) -> Path:
    """Build the demo corpus once (atomic: temp folder, then rename) and return its folder.

    >>> (ensure_demo_corpus() / "manifest.csv").is_file()     # doctest: +SKIP
    True
    """
    import soundfile as sf

    root = demo_root(cfg)
    if (root / "manifest.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        rows = []
        speakers = make_speakers(cfg)
        for si, spk in enumerate(speakers):
            (tmp / spk.id).mkdir()
            for ci, emotion in enumerate(CLASSES):
                for k in range(cfg.utterances):
                    rng = np.random.default_rng([cfg.seed, si, ci, k])
                    wave = synthesize(spk, emotion, rng, cfg)
                    rel = f"{spk.id}/{spk.id}_{emotion}_{k + 1:02d}.wav"
                    sf.write(tmp / rel, wave, cfg.sample_rate, subtype="PCM_16")
                    rows.append((rel, emotion, spk.id))
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "speaker"])
            w.writerows(rows)
        (tmp / "README.txt").write_text(
            "edge-ser DEMO corpus: procedurally generated (source-filter synthesis), not recorded speech.\n"
            "For running the pipeline offline and for tests only; no accuracy claim rests on it.\n"
            f"{cfg}\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "manifest.csv").is_file():  # someone else won the race: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def open_demo_corpus(cfg: DemoConfig = DemoConfig()) -> Corpus:
    """The demo corpus, scanned through the ordinary CSV-manifest loader (built on first use)."""
    from .manifest import CsvManifest

    root = ensure_demo_corpus(cfg)
    corpus = CsvManifest().scan(root / "manifest.csv", name="demo")
    corpus.format = "demo"
    corpus.problems.append(Problem(".", "DEMO corpus: procedurally generated speech-like audio, not recorded "
                                        "speech; no accuracy claim rests on it", "note"))
    corpus.classes = tuple(c for c in CLASSES if c in corpus.classes)
    return corpus


class Demo(Layout):
    """``--format demo`` / the corpus argument ``demo``: never detected from a folder."""

    name = "demo"
    description = "built-in synthetic DEMO corpus (no download; not for accuracy claims)"

    def detect(self, root: Path) -> bool:
        return False

    def scan(self, root: Optional[Path] = None) -> Corpus:
        return open_demo_corpus()
