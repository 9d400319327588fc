"""Pack format tests: round trip, inspect, signing policy, and every way a bad pack must be refused
(tampering, truncation, wrong key, unsigned, unknown major version, traversal, oversized, bombs, pickle).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packutil import CLASSES, make_pack

import edge_ser.inspection as I
import edge_ser.packfile as P
from edge_ser import signing
from edge_ser.config import FeatureConfig

TINY = FeatureConfig(n_mels=8, clip_seconds=0.05, f_max=4000.0)   # (8, 3) log-Mels: packs of a few KB


@pytest.fixture
def signed_pack(tmp_path, home):
    info = make_pack(tmp_path / "a.pack", private_key=home["private_key"], sequence=7)
    return Path(info["path"]), info


def members(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rebuild(path, out, mutate=None, key=None, extra=(), compress=zipfile.ZIP_DEFLATED):
    """Rewrite a pack with ``mutate(members_dict, manifest_dict)`` applied, re-hashing the member table
    for the members it keeps and re-signing with ``key`` (so only the parser's own checks can refuse)."""
    mem = members(path)
    manifest = json.loads(mem.pop(P.MANIFEST))
    mem.pop(P.SIGNATURE, None)
    if mutate:
        mutate(mem, manifest)
    table = manifest.get("members") if isinstance(manifest, dict) else None
    for name, data in mem.items():
        if isinstance(table, dict) and isinstance(table.get(name), dict):
            manifest["members"][name]["sha256"] = hashlib.sha256(data).hexdigest()
            manifest["members"][name]["bytes"] = len(data)
    mbytes = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(P.MANIFEST, mbytes)
        if key:
            k = signing.load_private_key(key)
            zf.writestr(P.SIGNATURE, json.dumps({"algorithm": "ed25519", "key_id": signing.key_id(k.public_key()),
                                                 "signature": base64.b64encode(k.sign(mbytes)).decode()}))
        for name, data in list(mem.items()) + list(extra):
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return Path(out)


# ---------------------------------------------------------------- round trip and inspect

def test_round_trip_signed(tmp_path, home):
    info = make_pack(tmp_path / "a.pack", private_key=home["private_key"], sequence=42)
    p = P.load_pack(info["path"])                       # default public key from $EDGE_SER_HOME
    assert p.signed and p.key_id == home["key_id"]
    assert p.pack_id == info["pack_id"] == hashlib.sha256(members(info["path"])[P.MANIFEST]).hexdigest()
    assert p.sequence == 42 and p.format_version == P.FORMAT_VERSION and p.classes == CLASSES
    assert p.X.dtype == np.float32 and p.X.shape == (8, 64, 48) and p.y.dtype == np.int64
    rng = np.random.default_rng(0)
    assert np.array_equal(p.X, rng.standard_normal((8, 64, 48)).astype(np.float32))
    assert p.theta0["features.1.num_batches_tracked"].shape == ()
    assert p.theta0_sha256 == P.state_sha256(p.theta0)
    assert p.schedule.lr == 0.05 and p.model_config.num_frames == 48 and p.feature_config.clip_seconds == 0.5
    assert p.provenance["corpus"] == "fake" and p.calibration is None


def test_stem_resolution_pack_is_smaller_and_the_model_sees_the_same(tmp_path, home):
    """A pack stored at the model's stem resolution is ~4x smaller in X, loads back to full-size log-Mels,
    and a real ConvNet gives the same logits on them as on the original features."""
    import torch

    from edge_ser.config import FeatureConfig, default_model_config
    from edge_ser.models import build_model, set_input_stats, state_arrays

    fc = FeatureConfig(clip_seconds=1.0)
    mc = default_model_config(len(CLASSES), fc)
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((8, fc.n_mels, fc.num_frames)) * 3 - 6).astype(np.float32)
    model = build_model(mc, seed=0)
    set_input_stats(model, X.mean(axis=(0, 2)), X.std(axis=(0, 2)))
    theta0 = state_arrays(model)
    full = make_pack(tmp_path / "full.pack", private_key=home["private_key"], fc=fc, model_config=mc, X=X,
                     theta0=theta0, golden_inputs=X[:2], golden_logits=np.zeros((2, 4), np.float32))
    Z = P.to_stem(X, theta0, mc.stem_pool)
    stem = make_pack(tmp_path / "stem.pack", private_key=home["private_key"], fc=fc, model_config=mc, X=Z,
                     theta0=theta0, golden_inputs=Z[:2], golden_logits=np.zeros((2, 4), np.float32), resolution="stem")
    with pytest.raises(ValueError, match="stem's resolution"):
        make_pack(tmp_path / "bad.pack", fc=fc, model_config=mc, X=X, theta0=theta0, golden_inputs=X[:2],
                  golden_logits=np.zeros((2, 4), np.float32), resolution="stem")
    assert stem["bytes"] < full["bytes"]
    info = I.inspect_pack(stem["path"])
    assert info["members"]["data/X.npy"]["bytes"] < 0.3 * I.inspect_pack(full["path"])["members"]["data/X.npy"]["bytes"]
    assert info["members"]["data/X.npy"]["shape"] == [8, fc.n_mels // 2, fc.num_frames // 2]
    assert info["synthetic"]["stored_resolution"] == "stem" and info["synthetic"]["shape"] == [fc.n_mels, fc.num_frames]
    p = P.load_pack(stem["path"])
    assert p.X.shape == X.shape and p.golden_inputs.shape == (2, fc.n_mels, fc.num_frames)
    assert not np.allclose(p.X, X)                      # the detail under the stem is gone ...
    model.eval()
    with torch.no_grad():                               # ... and the model cannot tell
        a, b = model(torch.from_numpy(X)).numpy(), model(torch.from_numpy(p.X)).numpy()
    assert np.max(np.abs(a - b)) < 1e-4
    assert np.array_equal(p.X, P.from_stem(Z, theta0, mc.stem_pool, X.shape[1:]))   # bit for bit


def test_soft_labels_calibration_and_real_model_state(tmp_path, home):
    import torch

    from edge_ser.config import ModelConfig
    from edge_ser.models import build_model, load_state_arrays, state_arrays, state_sha256

    mc = ModelConfig(num_classes=4, n_mels=64, num_frames=48)
    theta = state_arrays(build_model(mc, seed=3))
    cal = np.ones((2, 64, 48), np.float32)
    info = make_pack(tmp_path / "s.pack", private_key=home["private_key"], soft=True, theta0=theta,
                     model_config=mc, calibration=cal)
    p = P.load_pack(info["path"])
    assert p.y.shape == (8, 4) and p.y.dtype == np.float32 and np.array_equal(p.calibration, cal)
    assert p.theta0_sha256 == state_sha256(theta)            # same digest as the models module's
    model = load_state_arrays(build_model(mc, seed=99), p.theta0)
    assert all(torch.equal(v, torch.from_numpy(theta[k])) for k, v in model.state_dict().items())


def test_augmented_schedule_travels_and_a_plain_one_stays_readable_by_format_1_1(tmp_path, home):
    """Format 1.2 adds the schedule's time shift and step-size decay; a schedule without them is written
    without those keys, so an edge-ser that reads format 1.1 still reads it (it refuses unknown keys)."""
    from edge_ser.schedule import Schedule

    sched = Schedule(lr=0.2, epochs=150, batch_size=16, augment=True, shift=60, decay="cosine")
    p = P.load_pack(make_pack(tmp_path / "aug.pack", private_key=home["private_key"], schedule=sched)["path"])
    assert p.schedule == sched and p.format_version == "1.2.0"
    info = make_pack(tmp_path / "plain.pack", private_key=home["private_key"])
    manifest = json.loads(members(info["path"])[P.MANIFEST])
    assert set(manifest["schedule"]) == {"optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size",
                                         "augment", "seed"}


def test_same_content_same_bytes(tmp_path, home):
    a = make_pack(tmp_path / "a.pack", sequence=1, created_ms=1000)
    b = make_pack(tmp_path / "b.pack", sequence=1, created_ms=1000)
    assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()


def test_inspect_and_cli(signed_pack, capsys):
    from edge_ser.cli import main

    path, info = signed_pack
    d = I.inspect_pack(path)
    assert d["ok"] and d["signature"].startswith("valid") and d["pack_id"] == info["pack_id"]
    assert d["synthetic"]["per_class"] == {c: 2 for c in CLASSES}
    text = I.format_inspect(d)
    assert info["pack_id"] in text and "data/X.npy" in text
    assert main(["pack", "inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sequence"] == 7 and out["classes"] == list(CLASSES)


def test_inspect_reports_wrong_key(signed_pack, tmp_path):
    path, _ = signed_pack
    other = signing.keygen(tmp_path / "other")
    d = I.inspect_pack(path, public_key=other["public_key"])
    assert d["ok"] is False and d["signature"] == "INVALID" and "does not verify" in d["error"]


# ---------------------------------------------------------------- signing policy

def test_wrong_key_refused(signed_pack, tmp_path):
    path, _ = signed_pack
    other = signing.keygen(tmp_path / "other")
    with pytest.raises(P.PackError, match="signature does not verify"):
        P.load_pack(path, public_key=other["public_key"])


def test_unsigned_refused_unless_opted_in(tmp_path, home, monkeypatch, capsys):
    info = make_pack(tmp_path / "u.pack")
    with pytest.raises(P.PackError, match="unsigned"):
        P.load_pack(info["path"])
    p = P.load_pack(info["path"], require_signature=False)
    assert not p.signed and "UNSIGNED" in capsys.readouterr().err
    monkeypatch.setenv(P.ALLOW_UNSIGNED_ENV, "1")
    with pytest.raises(P.PackError, match="does not override"):   # the env cannot weaken an installed key
        P.load_pack(info["path"])
    monkeypatch.setenv("EDGE_SER_HOME", str(tmp_path / "no-key-here"))
    assert P.load_pack(info["path"]).signed is False


def test_no_public_key_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SER_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv(P.ALLOW_UNSIGNED_ENV, raising=False)
    keys = signing.keygen(tmp_path / "k")
    info = make_pack(tmp_path / "a.pack", private_key=keys["private_key"])
    with pytest.raises(P.PackError, match="no public key"):
        P.load_pack(info["path"])
    assert P.load_pack(info["path"], public_key=keys["public_key"]).signed


def test_keygen_refuses_overwrite(tmp_path):
    signing.keygen(tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        signing.keygen(tmp_path)
    assert (tmp_path / "signing.key").stat().st_mode & 0o077 == 0
    signing.keygen(tmp_path, force=True)


# ---------------------------------------------------------------- damage and tampering

@pytest.mark.faults
def test_tampered_member_byte(signed_pack, tmp_path):
    path, _ = signed_pack
    data = bytearray(path.read_bytes())
    # flip a byte inside the (deflated) X member's data
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("data/X.npy")
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0x01
    bad = tmp_path / "bad.pack"
    bad.write_bytes(bytes(data))
    with pytest.raises(P.PackError, match="data/X.npy|damaged|corrupt"):
        P.load_pack(bad)


@pytest.mark.faults
def test_tampered_manifest_fails_signature(signed_pack, tmp_path):
    path, _ = signed_pack
    raw = path.read_bytes()
    bad = tmp_path / "bad.pack"
    bad.write_bytes(raw.replace(b'"sequence": 7', b'"sequence": 9', 1))   # stored manifest, same length
    assert bad.read_bytes() != raw
    with pytest.raises(P.PackError):
        P.load_pack(bad)
    # even with the zip CRC fixed up, the signature catches it
    def bump(mem, manifest):
        manifest["sequence"] = 9
    forged = rebuild(path, tmp_path / "forged.pack", bump)
    zin = members(path)
    with zipfile.ZipFile(forged, "a") as zf:
        zf.writestr(P.SIGNATURE, zin[P.SIGNATURE])
    with pytest.raises(P.PackError, match="signature does not verify"):
        P.load_pack(forged)


@pytest.mark.faults
@pytest.mark.slow
def test_every_byte_flipped_tiny_pack(tmp_path, home):
    """Flip each byte in turn: the pack is refused with a PackError, or (a byte the format does not use,
    e.g. a zip timestamp) it loads with exactly the original content. Never anything else."""
    info = make_pack(tmp_path / "t.pack", private_key=home["private_key"], fc=TINY, ipc=1, provenance={},
                     theta0={"w": np.arange(6, dtype=np.float32)},
                     golden_inputs=np.zeros((1, 8, 3), np.float32), golden_logits=np.zeros((1, 4), np.float32))
    raw = Path(info["path"]).read_bytes()
    ref = P.load_pack(info["path"])
    pub = signing.load_public_key()
    bad = tmp_path / "flip.pack"
    refused = accepted = 0
    for i in range(len(raw)):
        mutated = bytearray(raw)
        mutated[i] ^= 0xFF
        bad.write_bytes(bytes(mutated))
        try:
            p = P.load_pack(bad, public_key=pub)
        except P.PackError:
            refused += 1
            continue
        accepted += 1
        assert p.pack_id == ref.pack_id and np.array_equal(p.X, ref.X) and np.array_equal(p.y, ref.y)
        assert all(np.array_equal(p.theta0[k], ref.theta0[k]) for k in ref.theta0)
    assert refused > 0.7 * len(raw), (refused, accepted, len(raw))


@pytest.mark.faults
def test_truncated_everywhere(signed_pack, tmp_path):
    path, _ = signed_pack
    raw = path.read_bytes()
    bad = tmp_path / "trunc.pack"
    for n in sorted(set(list(range(0, len(raw), max(1, len(raw) // 150))) + [len(raw) - 1, 1, 22])):
        bad.write_bytes(raw[:n])
        with pytest.raises(P.PackError):
            P.load_pack(bad)


def test_not_a_pack_and_missing(tmp_path, home):
    f = tmp_path / "x.pack"
    f.write_bytes(b"hello world" * 10)
    with pytest.raises(P.PackError, match="not an edge-ser pack"):
        P.load_pack(f)
    with pytest.raises(FileNotFoundError, match="pack not found"):
        P.load_pack(tmp_path / "nope.pack")


@pytest.mark.faults
def test_unknown_major_version(tmp_path, home):
    info = make_pack(tmp_path / "v2.pack", private_key=home["private_key"], format_version="2.0.0")
    with pytest.raises(P.PackError, match=r"format version 2\.0\.0 is not supported.*1\.x.*upgrade"):
        P.load_pack(info["path"])
    newer_minor = make_pack(tmp_path / "v13.pack", private_key=home["private_key"], format_version="1.3.0")
    assert P.load_pack(newer_minor["path"]).format_version == "1.3.0"
    bad = make_pack(tmp_path / "vx.pack", private_key=home["private_key"], format_version="one")
    with pytest.raises(P.PackError, match="semver"):
        P.load_pack(bad["path"])


@pytest.mark.faults
@pytest.mark.parametrize("name", ["../evil.npy", "/etc/passwd", "theta0/../../x.npy", "data/../../../tmp/x.npy",
                                  "theta0/a/b.npy", "data/", "run.py", "theta0/x.pkl"])
def test_path_traversal_and_unknown_members(signed_pack, tmp_path, home, name):
    path, _ = signed_pack
    bad = rebuild(path, tmp_path / "trav.pack", key=home["private_key"], extra=[(name, b"x")])
    with pytest.raises(P.PackError, match="not allowed"):
        P.load_pack(bad)


@pytest.mark.faults
def test_member_not_in_manifest_and_missing_member(signed_pack, tmp_path, home):
    path, _ = signed_pack
    extra = rebuild(path, tmp_path / "extra.pack", key=home["private_key"],
                    extra=[("calibration/X.npy", P.npy_bytes(np.zeros((1, 64, 48), np.float32)))])
    with pytest.raises(P.PackError, match="members differ"):
        P.load_pack(extra)
    missing = rebuild(path, tmp_path / "missing.pack", lambda m, man: m.pop("data/y.npy"), key=home["private_key"])
    with pytest.raises(P.PackError, match="members differ"):
        P.load_pack(missing)


@pytest.mark.faults
def test_oversized_declared_length(signed_pack, tmp_path):
    path, _ = signed_pack
    raw = bytearray(path.read_bytes())
    # central directory entry of data/X.npy: uncompressed size is at offset 20 after b"PK\x01\x02"
    pos = 0
    while True:
        pos = raw.find(b"PK\x01\x02", pos)
        assert pos >= 0
        nlen = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46: pos + 46 + nlen] == b"data/X.npy":
            break
        pos += 4
    struct.pack_into("<I", raw, pos + 24, 0x7FFFFFF0)
    bad = tmp_path / "big.pack"
    bad.write_bytes(bytes(raw))
    with pytest.raises(P.PackError, match="declares .* bytes, over"):
        P.load_pack(bad)


@pytest.mark.faults
def test_manifest_length_mismatch(signed_pack, tmp_path, home):
    path, _ = signed_pack
    bad = rebuild(path, tmp_path / "lie.pack", key=home["private_key"])
    mem = members(bad)
    man = json.loads(mem[P.MANIFEST])
    man["members"]["data/y.npy"]["bytes"] = 10 ** 9
    mbytes = json.dumps(man).encode()
    k = signing.load_private_key(home["private_key"])
    with zipfile.ZipFile(tmp_path / "lie2.pack", "w") as zf:
        zf.writestr(P.MANIFEST, mbytes)
        zf.writestr(P.SIGNATURE, json.dumps({"algorithm": "ed25519", "key_id": "x",
                                             "signature": base64.b64encode(k.sign(mbytes)).decode()}))
        for n, d in mem.items():
            if n not in (P.MANIFEST, P.SIGNATURE):
                zf.writestr(n, d)
    with pytest.raises(P.PackError, match="data/y.npy.*bytes, expected 1000000000"):
        P.load_pack(tmp_path / "lie2.pack")


@pytest.mark.faults
def test_zip_bomb(signed_pack, tmp_path, home):
    path, _ = signed_pack
    bomb = np.zeros((1, 64, 48 * 4000), np.float32)     # 49 MB of zeros deflates to ~50 KB

    def swap(mem, manifest):
        mem["calibration/X.npy"] = P.npy_bytes(bomb)
        manifest["members"]["calibration/X.npy"] = {"dtype": "<f4", "shape": list(bomb.shape)}
    bad = rebuild(path, tmp_path / "bomb.pack", swap, key=home["private_key"])
    assert bad.stat().st_size < 2_000_000
    with pytest.raises(P.PackError, match="decompression bomb"):
        P.load_pack(bad)
    small_limits = P.PackLimits(max_member_bytes=1 << 20)
    with pytest.raises(P.PackError, match="over the 1048576-byte member limit"):
        P.load_pack(bad, limits=small_limits)


@pytest.mark.faults
def test_pickled_and_malformed_arrays_refused(signed_pack, tmp_path, home):
    path, _ = signed_pack
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([1, "a", None], dtype=object), allow_pickle=True)

    def pickled(mem, manifest):
        mem["data/y.npy"] = buf.getvalue()
    bad = rebuild(path, tmp_path / "pkl.pack", pickled, key=home["private_key"])
    with pytest.raises(P.PackError, match="dtype .* not allowed"):
        P.load_pack(bad)

    def lying_header(mem, manifest):   # header declares 10**12 elements; must not allocate them
        hdr = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
        hdr += b" " * (63 - (10 + len(hdr)) % 64) + b"\n"
        mem["data/X.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr + b"\0" * 16
    bad = rebuild(path, tmp_path / "hdr.pack", lying_header, key=home["private_key"])
    with pytest.raises(P.PackError, match="header says"):
        P.load_pack(bad)


@pytest.mark.faults
def test_validly_signed_but_inconsistent_contents(signed_pack, tmp_path, home):
    """A signature proves origin, not sanity: shapes, labels, θ0 digest are still checked."""
    path, _ = signed_pack

    def bad_labels(mem, manifest):
        mem["data/y.npy"] = P.npy_bytes(np.full(8, 99, np.int64))
    with pytest.raises(P.PackError, match="labels out of range"):
        P.load_pack(rebuild(path, tmp_path / "l.pack", bad_labels, key=home["private_key"]))

    def bad_theta(mem, manifest):
        mem["theta0/classifier.weight.npy"] = P.npy_bytes(np.zeros((4, 32), np.float32))
    with pytest.raises(P.PackError, match="theta0_sha256"):
        P.load_pack(rebuild(path, tmp_path / "t.pack", bad_theta, key=home["private_key"]))

    def nan(mem, manifest):
        x = np.random.default_rng(0).standard_normal((8, 64, 48)).astype(np.float32)
        x[0, 0, 0] = np.nan
        mem["data/X.npy"] = P.npy_bytes(x)
    with pytest.raises(P.PackError, match="NaN"):
        P.load_pack(rebuild(path, tmp_path / "n.pack", nan, key=home["private_key"]))


# ---------------------------------------------------------------- property tests

ERRORS = (P.PackError,)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=4096))
def test_property_arbitrary_bytes_give_pack_error(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("h") / "x.pack"
    f.write_bytes(data)
    with pytest.raises(ERRORS):
        P.load_pack(f, require_signature=False)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6),
       field=st.sampled_from(["classes", "feature_config", "model_config", "schedule", "sequence",
                              "golden_tolerance", "members", "format_version", "theta0_sha256", "provenance"]),
       value=_json, mutate_manifest=st.booleans())
@pytest.mark.slow
def test_property_mutated_pack_refused_or_unchanged(tmp_path_factory, edits, field, value, mutate_manifest):
    """Random byte edits, or an unsigned pack whose manifest field is replaced by arbitrary JSON: the
    parser answers with a PackError or a pack whose content is exactly the original. Nothing else."""
    d = tmp_path_factory.mktemp("m")
    info = make_pack(d / "a.pack", fc=TINY, ipc=1, golden_inputs=np.zeros((1, 8, 3), np.float32),
                     golden_logits=np.zeros((1, 4), np.float32), sequence=5, created_ms=0)
    ref = P.load_pack(info["path"], require_signature=False)
    if mutate_manifest:
        target = rebuild(info["path"], d / "b.pack", lambda m, man: man.__setitem__(field, value))
    else:
        raw = bytearray(Path(info["path"]).read_bytes())
        for pos, val in edits:
            raw[pos % len(raw)] = val
        target = d / "b.pack"
        target.write_bytes(bytes(raw))
    try:
        p = P.load_pack(target, require_signature=False)
    except ERRORS:
        return
    assert np.array_equal(p.X, ref.X) and np.array_equal(p.y, ref.y) and p.classes == ref.classes
    assert p.theta0_sha256 == ref.theta0_sha256
