"""Tests of corpus layouts, bad-file handling, the feature cache, the demo corpus and the corpus report.

Small corpora are built in tmp_path from tiny generated WAVs (never copied corpus audio); the RAVDESS
test uses ../shared/corpora and skips cleanly when it is absent.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from edge_ser.config import FeatureConfig
from edge_ser.corpora import LAYOUTS, Corpus, CorpusError, load_features, open_corpus
from edge_ser.corpora.report import corpus_info, format_report

SMALL = FeatureConfig(clip_seconds=0.5)   # tiny features keep these tests fast


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SER_CACHE", str(tmp_path / "cache"))


def wav(path, seed=0, seconds=0.3, rate=16000, channels=1):
    """A tiny distinct 'utterance' (tone + noise) written as 16-bit PCM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.02 * rng.standard_normal(len(t))
    if channels > 1:
        x = np.stack([x] * channels, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")
    return path


def build(root, names):
    for i, name in enumerate(names):
        wav(root / name, seed=i)
    return root


def labels(corpus: Corpus):
    return {u.rel.replace("\\", "/"): (u.label, u.speaker) for u in corpus.utterances}


# ------------------------------------------------------------------ layouts

def test_ravdess_layout(tmp_path):
    root = build(tmp_path / "rav", ["Actor_01/03-01-05-01-01-01-01.wav", "Actor_01/03-01-01-01-01-01-01.wav",
                                    "Actor_02/03-01-04-02-02-01-02.wav", "Actor_02/03-02-04-01-01-01-02.wav"])
    c = open_corpus(root)
    assert c.format == "ravdess"
    assert labels(c) == {"Actor_01/03-01-05-01-01-01-01.wav": ("angry", "Actor_01"),
                         "Actor_01/03-01-01-01-01-01-01.wav": ("neutral", "Actor_01"),
                         "Actor_02/03-01-04-02-02-01-02.wav": ("sad", "Actor_02")}
    assert any("song" in p.reason for p in c.problems)


def test_emodb_layout(tmp_path):
    root = build(tmp_path / "emodb", ["wav/03a01Fa.wav", "wav/03a01Wa.wav", "wav/08b02Tc.wav", "wav/16a05Lb.wav",
                                      "wav/10a02Ea.wav", "wav/11b03Ab.wav", "wav/12a01Nc.wav"])
    c = open_corpus(root)
    assert c.format == "emodb"
    got = labels(c)
    assert got["wav/03a01Fa.wav"] == ("happy", "03") and got["wav/03a01Wa.wav"] == ("angry", "03")
    assert got["wav/08b02Tc.wav"] == ("sad", "08") and got["wav/16a05Lb.wav"] == ("bored", "16")
    assert got["wav/10a02Ea.wav"][0] == "disgust" and got["wav/11b03Ab.wav"][0] == "fearful"
    assert got["wav/12a01Nc.wav"][0] == "neutral"
    assert len(c.classes) == 7


def test_cremad_layout(tmp_path):
    root = build(tmp_path / "crema", ["AudioWAV/1001_DFA_ANG_XX.wav", "AudioWAV/1001_IEO_HAP_HI.wav",
                                      "AudioWAV/1091_TSI_SAD_LO.wav", "AudioWAV/1091_DFA_NEU_XX.wav"])
    c = open_corpus(root)
    assert c.format == "cremad"
    assert labels(c) == {"AudioWAV/1001_DFA_ANG_XX.wav": ("angry", "1001"),
                         "AudioWAV/1001_IEO_HAP_HI.wav": ("happy", "1001"),
                         "AudioWAV/1091_TSI_SAD_LO.wav": ("sad", "1091"),
                         "AudioWAV/1091_DFA_NEU_XX.wav": ("neutral", "1091")}


def test_tess_layout(tmp_path):
    root = build(tmp_path / "tess", ["OAF_angry/OAF_back_angry.wav", "OAF_Pleasant_surprise/OAF_back_ps.wav",
                                     "YAF_pleasant_surprised/YAF_bath_ps.wav", "YAF_sad/YAF_bath_sad.wav",
                                     "YAF_sad/YAF_dog_happy.wav"])
    c = open_corpus(root)
    assert c.format == "tess"
    got = labels(c)
    assert got["OAF_angry/OAF_back_angry.wav"] == ("angry", "OAF")
    assert got["OAF_Pleasant_surprise/OAF_back_ps.wav"] == ("surprised", "OAF")
    assert got["YAF_pleasant_surprised/YAF_bath_ps.wav"] == ("surprised", "YAF")
    assert got["YAF_sad/YAF_bath_sad.wav"] == ("sad", "YAF")
    bad = [p for p in c.problems if "YAF_dog_happy" in p.path]
    assert len(bad) == 1 and "mislabeled" in bad[0].reason


def test_iemocap_layout(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    for s in (1, 2):
        ev = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        ev.mkdir(parents=True)
        d = f"Ses0{s}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", "",
                 f"[6.2901 - 8.2357]\t{d}_F000\tneu\t[2.5000, 2.5000, 2.5000]", "C-E2:\tNeutral;\t()",
                 f"[10.01 - 11.36]\t{d}_M001\texc\t[4.0, 3.5, 3.0]",
                 f"[12.0 - 13.0]\t{d}_F002\tang\t[2.0, 4.0, 4.0]",
                 f"[14.0 - 15.0]\t{d}_M003\tsad\t[2.0, 2.0, 2.0]",
                 f"[16.0 - 17.0]\t{d}_F004\tfru\t[2.0, 3.0, 3.0]",
                 f"[18.0 - 19.0]\t{d}_M005\thap\t[4.0, 3.0, 3.0]",
                 f"[20.0 - 21.0]\t{d}_F006\tsad\t[2.0, 2.0, 2.0]"]     # its wav is missing
        (ev / f"{d}.txt").write_text("\n".join(lines) + "\n")
        for i, who in enumerate(["F000", "M001", "F002", "M003", "F004", "M005"]):
            wav(root / f"Session{s}" / "sentences" / "wav" / d / f"{d}_{who}.wav", seed=10 * s + i)
    c = open_corpus(root)
    assert c.format == "iemocap"
    got = labels(c)
    assert got["Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"] == ("neutral", "Ses01F")
    assert got["Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M001.wav"] == ("happy", "Ses01M")  # exc
    assert got["Session2/sentences/wav/Ses02F_impro01/Ses02F_impro01_M005.wav"] == ("happy", "Ses02M")
    assert got["Session2/sentences/wav/Ses02F_impro01/Ses02F_impro01_F002.wav"] == ("angry", "Ses02F")
    assert c.classes == ("neutral", "happy", "sad", "angry")
    assert len(c.utterances) == 10 and set(c.speakers) == {"Ses01F", "Ses01M", "Ses02F", "Ses02M"}
    assert sum("wav is missing" in p.reason for p in c.problems) == 2
    assert any(p.severity == "note" and "fru: 2" in p.reason for p in c.problems)


def test_csv_manifest(tmp_path):
    root = tmp_path / "mycorpus"
    for i, (name, _, _) in enumerate(rows := [("audio/a.wav", "joy", "s1"), ("audio/b.wav", "anger", "s1"),
                                              ("audio/c.wav", "joy", "s2"), ("audio/d.wav", "anger", "s2")]):
        wav(root / name, seed=i)
    text = "path,label,speaker\n" + "".join(f"{p},{l},{s}\n" for p, l, s in rows)
    text += "audio/missing.wav,joy,s3\naudio/a.wav,joy,s1\naudio/c.wav,,s2\n"
    (root / "manifest.csv").write_text(text)
    for target in (root, root / "manifest.csv"):
        c = open_corpus(target)
        assert c.format == "csv" and c.name == "mycorpus"
        assert labels(c) == {"audio/a.wav": ("joy", "s1"), "audio/b.wav": ("anger", "s1"),
                             "audio/c.wav": ("joy", "s2"), "audio/d.wav": ("anger", "s2")}
        reasons = " | ".join(p.line() for p in c.problems)
        assert "no such file" in reasons and "listed twice" in reasons and "no label" in reasons
        assert len([p for p in c.problems if p.severity == "error"]) == 3
    other = tmp_path / "list.csv"      # any .csv file, paths relative to it, loose header names
    other.write_text("File,Emotion,Speaker_ID\nmycorpus/audio/a.wav,joy,x\nmycorpus/audio/b.wav,anger,y\n")
    assert labels(open_corpus(other)) == {"mycorpus/audio/a.wav": ("joy", "x"), "mycorpus/audio/b.wav": ("anger", "y")}


def test_csv_without_path_column_is_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("name,emotion\nx.wav,joy\n")
    with pytest.raises(CorpusError, match="path,label"):
        open_corpus(tmp_path / "bad.csv", fmt="csv")


def test_class_folders(tmp_path):
    root = build(tmp_path / "byclass", ["happy/spk_01_take1.wav", "happy/anna-002.wav", "Sad/spk_02_x.wav",
                                        "Sad/spk_07/take.wav", "loose.wav"])
    (root / "README.txt").write_text("not audio: ignored")
    c = open_corpus(root)
    assert c.format == "folders"
    assert labels(c) == {"happy/spk_01_take1.wav": ("happy", "spk_01"), "happy/anna-002.wav": ("happy", "anna"),
                         "Sad/spk_02_x.wav": ("sad", "spk_02"), "Sad/spk_07/take.wav": ("sad", "spk_07")}
    lines = [p.line() for p in c.problems]
    assert any("loose.wav" in l and "not inside a class folder" in l for l in lines)
    assert any("speaker-independent splits need" in l for l in lines)


def test_format_override_and_unknown_format(tmp_path):
    root = build(tmp_path / "rav", ["Actor_01/03-01-05-01-01-01-01.wav", "Actor_02/03-01-04-01-01-01-02.wav"])
    assert open_corpus(root).format == "ravdess"
    c = open_corpus(root, fmt="folders")        # read the same files as one folder per class
    assert c.format == "folders" and set(c.classes) == {"actor_01", "actor_02"}
    with pytest.raises(CorpusError, match="unknown --format"):
        open_corpus(root, fmt="nope")
    assert list(LAYOUTS)[-3:] == ["csv", "folders", "demo"]       # generic layouts are tried last


def test_missing_and_unrecognised_corpus(tmp_path):
    with pytest.raises(CorpusError, match="no such corpus"):
        open_corpus(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="not recognised"):
        open_corpus(tmp_path / "empty")


def test_empty_class_and_single_class_are_clear_errors(tmp_path):
    root = build(tmp_path / "one", ["sad/a_1.wav", "sad/b_1.wav"])
    (root / "happy").mkdir()
    with pytest.raises(CorpusError) as info:
        open_corpus(root)
    msg = str(info.value)
    assert "only 1 class" in msg and "happy" in msg and "\n" not in msg
    root2 = build(tmp_path / "single", ["Actor_01/03-01-05-01-01-01-01.wav", "Actor_02/03-01-05-01-01-01-02.wav"])
    with pytest.raises(CorpusError, match="only 1 class"):
        open_corpus(root2)


# ------------------------------------------------------------------ bad files in a corpus

def bad_corpus(root):
    good = ["Actor_01/03-01-05-01-01-01-01.wav", "Actor_01/03-01-04-01-01-01-01.wav",
            "Actor_02/03-01-05-01-01-01-02.wav", "Actor_02/03-01-04-01-01-01-02.wav"]
    build(root, good)
    bad = {}
    p = wav(root / "Actor_01/03-01-05-01-02-01-01.wav", seed=50)        # corrupt header
    data = bytearray(p.read_bytes())
    data[:4] = b"JUNK"
    p.write_bytes(bytes(data))
    bad["corrupt"] = p
    p = wav(root / "Actor_01/03-01-04-01-02-01-01.wav", seed=51, seconds=1.0)   # truncated
    p.write_bytes(p.read_bytes()[:3000])
    bad["truncated"] = p
    p = root / "Actor_02/03-01-05-01-02-01-02.wav"
    p.write_bytes(b"")
    bad["zero"] = p
    p = root / "Actor_02/03-01-04-01-02-01-02.wav"
    p.write_text("not audio at all\n" * 20)
    bad["nonaudio"] = p
    bad["mislabeled"] = wav(root / "Actor_02/03-01-09-01-01-02-02.wav", seed=52)   # emotion 09 does not exist
    bad["unparseable"] = wav(root / "Actor_02/take_two.wav", seed=53)
    return good, bad


def test_bad_files_give_one_line_each_and_the_rest_loads(tmp_path):
    good, bad = bad_corpus(tmp_path / "c")
    fs, problems = load_features(tmp_path / "c", SMALL, workers=1)
    assert sorted(fs.paths.tolist()) == sorted(good) and fs.X.shape == (4, 64, SMALL.num_frames)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == len(bad)
    for kind, path in bad.items():
        mine = [p for p in errors if p.path == str(path.relative_to(tmp_path / "c"))]
        assert len(mine) == 1, (kind, [p.line() for p in errors])
        assert "\n" not in mine[0].line()
    text = {p.path.split("/")[-1]: p.reason for p in errors}
    assert "not a readable audio file" in text[bad["corrupt"].name]
    assert "truncated" in text[bad["truncated"].name]
    assert "empty file" in text[bad["zero"].name]
    assert "not a readable audio file" in text[bad["nonaudio"].name]
    assert "unknown emotion code 09" in text[bad["mislabeled"].name]
    assert "cannot label" in text[bad["unparseable"].name]
    # the corpus report finds the same problems by decoding
    r = corpus_info(tmp_path / "c")
    assert r["files"] == 4 and len(r["problems"]) == len(bad)
    assert "problems (files left out): 6" in format_report(r)


# ------------------------------------------------------------------ feature cache

def test_feature_cache_hit_and_invalidation(tmp_path):
    root = build(tmp_path / "c", ["happy/a_1.wav", "happy/b_1.wav", "sad/a_2.wav", "sad/b_2.wav"])
    fs1, _ = load_features(root, SMALL, workers=1)
    cached = list((tmp_path / "cache" / "features").glob("*.npz"))
    assert len(cached) == 1
    fs2, _ = load_features(root, SMALL, workers=1)
    assert np.array_equal(fs1.X, fs2.X) and np.array_equal(fs1.y, fs2.y) and list(fs1.paths) == list(fs2.paths)
    wav(root / "sad/b_2.wav", seed=99)                    # same name, new content
    fs3, _ = load_features(root, SMALL, workers=1)
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 2
    i = fs3.paths.tolist().index("sad/b_2.wav")
    assert not np.allclose(fs3.X[i], fs1.X[i])
    assert np.array_equal(np.delete(fs3.X, i, 0), np.delete(fs1.X, i, 0))
    fs4, _ = load_features(root, SMALL.replace(n_mels=32), workers=1)   # config is in the key too
    assert fs4.X.shape[1] == 32


def test_parallel_and_serial_extraction_agree(tmp_path):
    root = build(tmp_path / "c", [f"{c}/s{k}_{i}.wav" for c in ("happy", "sad") for k in range(2) for i in range(5)])
    a, _ = load_features(root, SMALL, workers=1, use_cache=False)
    b, _ = load_features(root, SMALL, workers=2, use_cache=False)
    assert np.array_equal(a.X, b.X) and list(a.paths) == list(b.paths)


# ------------------------------------------------------------------ demo corpus

@pytest.fixture(scope="session")
def demo_corpus():
    """The built-in demo corpus, built once into the normal cache (as users get it)."""
    return open_corpus("demo")   # session scope: set up before the per-test private cache


def test_demo_corpus(demo_corpus, monkeypatch):
    c = demo_corpus
    assert c.format == "demo" and c.name == "demo"
    assert c.classes == ("neutral", "happy", "sad", "angry")
    assert len(c.speakers) == 8 and len(c.utterances) == 8 * 4 * 12
    assert not [p for p in c.problems if p.severity == "error"]
    from collections import Counter

    assert set(Counter(u.label for u in c.utterances).values()) == {96}
    sub = Corpus("demo-sub", c.root, c.format, c.classes, c.utterances[::24], [])
    fs, problems = load_features(sub, FeatureConfig(), workers=1, use_cache=False)
    assert fs.X.shape == (16, 64, 298) and not [p for p in problems if p.severity == "error"]
    info = sf.info(c.utterances[0].path)
    assert info.samplerate == 16000 and info.subtype == "PCM_16" and 2.0 <= info.duration <= 3.0


def test_demo_synthesis_is_deterministic_and_emotional():
    from edge_ser.corpora.synthetic import DemoConfig, make_speakers, synthesize

    spk = make_speakers(DemoConfig())[0]
    a = synthesize(spk, "angry", np.random.default_rng([0, 0, 3, 0]))
    b = synthesize(spk, "angry", np.random.default_rng([0, 0, 3, 0]))
    assert np.array_equal(a, b) and a.dtype == np.float32 and np.abs(a).max() <= 1.0

    def brightness(emotion):   # share of energy above 2 kHz, averaged over utterances
        vals = []
        for k in range(6):
            x = synthesize(spk, emotion, np.random.default_rng([5, k]))
            p = np.abs(np.fft.rfft(x)) ** 2
            f = np.fft.rfftfreq(len(x), 1 / 16000)
            vals.append(p[f > 2000].sum() / p.sum())
        return np.mean(vals)

    assert brightness("angry") > brightness("sad")


def test_demo_build_is_atomic_and_reused(tmp_path):
    from edge_ser.corpora.synthetic import DemoConfig, ensure_demo_corpus

    cfg = DemoConfig(speakers=2, utterances=1, seed=3)
    root = ensure_demo_corpus(cfg)
    assert root.parent == tmp_path / "cache" and (root / "manifest.csv").is_file()
    assert len(list(root.rglob("*.wav"))) == 2 * 4
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]
    stamp = (root / "manifest.csv").stat().st_mtime_ns
    assert ensure_demo_corpus(cfg) == root and (root / "manifest.csv").stat().st_mtime_ns == stamp


def test_demo_is_not_detected_from_a_folder_named_demo(tmp_path, monkeypatch):
    build(tmp_path / "demo", ["happy/a_1.wav", "sad/b_1.wav"])
    monkeypatch.chdir(tmp_path)
    assert open_corpus("./demo").format == "folders"


# ------------------------------------------------------------------ the real corpus

@pytest.mark.corpus
def test_ravdess_report(ravdess_path, monkeypatch):
    monkeypatch.delenv("EDGE_SER_CACHE")        # share the probe cache with the user's runs
    r = corpus_info(ravdess_path)
    assert r["format"] == "ravdess" and r["speakers"] == 24 and len(r["classes"]) == 8 and r["files"] == 1440
    assert r["class_counts"]["neutral"] == 96 and set(r["class_counts"].values()) == {96, 192}
    assert r["problems"] == []
    stereo = [n for n in r["notes"] if "stereo" in n]
    assert len(stereo) == 5
    dup = [n for n in r["notes"] if "duplicate" in n or "byte-identical" in n]
    assert len(dup) == 1
    assert "Actor_07/03-01-03-01-02-02-07" in dup[0] and "Actor_07/03-01-03-01-02-01-07" in dup[0]
    text = format_report(r)
    assert "24" in text and "1440 usable" in text
