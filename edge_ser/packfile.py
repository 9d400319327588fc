"""The pack: one signed file with a synthetic training set, the fixed initialisation θ0 and everything a
device needs to train and check itself: writing and safe loading (no code execution); `inspection.py` shows one.

Container (format 1.x): a ZIP archive (stored or deflated members only) holding

==========================  =================================================================
``manifest.json``           format, format_version (semver), sequence, configs, classes, schedule (its
                            ``shift`` and ``decay``, a time-shift augmentation and an annealed step
                            size, are format >= 1.2: an older edge-ser refuses such a pack rather than
                            train it differently),
                            provenance, theta0_sha256, golden_tolerance and, per member, its
                            SHA-256, byte length, dtype and shape
``signature.json``          optional: ``{"algorithm": "ed25519", "key_id", "signature" (base64)}``
                            over the exact bytes of ``manifest.json``
``data/X.npy``              (M, n_mels, frames) float32 synthetic log-Mels, or with
                            ``synthetic_resolution: "stem"`` (format >= 1.1) the model's own view of them:
                            (M, n_mels // a, frames // b) per-band-normalised log-Mels average-pooled by the
                            model's ``stem_pool`` (a, b); see :func:`to_stem` / :func:`from_stem`
``data/y.npy``              (M,) int64 labels or (M, C) float32 soft labels
``golden/inputs.npy``       (G, n_mels, frames) float32 golden inputs (stem resolution likewise)
``golden/logits.npy``       (G, C) float32 logits of θ0 trained with the schedule, on those inputs
``calibration/X.npy``       optional (K, n_mels, frames) float32 int8-calibration features
``theta0/<tensor>.npy``     one array per state-dict entry of the initial model
==========================  =================================================================

Loading never unpickles (arrays are parsed from their ``.npy`` header and raw bytes with a dtype
allow-list), accepts only allow-listed member names, checks declared sizes against caps before
reading (decompression bombs), refuses an unknown major format version, and verifies every member's
SHA-256 against the manifest, and the manifest against the Ed25519 signature. The pack id is the
SHA-256 of ``manifest.json``, so it names the content exactly.

>>> p = load_pack("demo.pack", public_key="signing.pub")           # doctest: +SKIP
>>> p.classes, p.X.shape, p.signed                                  # doctest: +SKIP
(('neutral', ...), (80, 64, 298), True)
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .config import FeatureConfig, ModelConfig
from .files import atomic_write, json_default
from .schedule import Schedule

log = logging.getLogger("edge_ser.packfile")

FORMAT = "edge-ser-pack"
FORMAT_VERSION = "1.2.0"
SUPPORTED_MAJOR = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
ALLOW_UNSIGNED_ENV = "EDGE_SER_ALLOW_UNSIGNED"

_FIXED_MEMBERS = {"data/X.npy", "data/y.npy", "golden/inputs.npy", "golden/logits.npy", "calibration/X.npy"}
_THETA_RE = re.compile(r"^theta0/([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.npy$")
_DTYPES = {"<f4": np.float32, "<i8": np.int64}
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class PackLimits:
    """Caps checked *before* anything is decompressed or allocated."""

    max_file_bytes: int = 512 << 20
    max_members: int = 512
    max_member_bytes: int = 256 << 20
    max_total_bytes: int = 768 << 20
    max_manifest_bytes: int = 1 << 20
    max_ratio: int = 200               # uncompressed / compressed per member (deflate tops out near 1000) ...
    ratio_floor: int = 16 << 20        # ... checked only for members larger than this (constant arrays are legit)
    max_array_bytes: int = 256 << 20   # any array a device derives from the pack (stem expansion, ...)
    max_dim: int = 1 << 16             # one config dimension (Mel bins, frames, channels, classes)
    max_train_steps: int = 1_000_000   # epochs x steps per epoch of the signed schedule
    max_epochs: int = 100_000


LIMITS = PackLimits()


class PackError(ValueError):
    """A pack that cannot be used: one line naming the file and the cause."""


@dataclass
class Pack:
    """A verified, loaded pack. Arrays are private copies owned by the object (torch can wrap them)."""

    path: str
    pack_id: str
    sequence: int
    format_version: str
    classes: Tuple[str, ...]
    feature_config: FeatureConfig
    model_config: ModelConfig
    schedule: Schedule
    theta0: Dict[str, np.ndarray]
    theta0_sha256: str
    X: np.ndarray
    y: np.ndarray
    golden_inputs: np.ndarray
    golden_logits: np.ndarray
    golden_tolerance: float
    calibration: Optional[np.ndarray]
    provenance: Dict[str, Any]
    signed: bool
    key_id: Optional[str]
    created: str = ""
    manifest: Dict[str, Any] = field(default_factory=dict, repr=False)
    deployment: Optional[Dict[str, Any]] = None     # signed {"id", "classes", "model"}; None in older packs

    @property
    def hard_labels(self) -> np.ndarray:
        return self.y if self.y.ndim == 1 else self.y.argmax(axis=1)

    @property
    def ipc(self) -> Optional[int]:
        return self.provenance.get("ipc")

    @property
    def method(self) -> Optional[str]:
        return self.provenance.get("method")


# ---------------------------------------------------------------- small helpers

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over tensors in canonical form: for each key in sorted order its name, dtype, shape and
    little-endian C-order bytes. Identical weights give an identical digest on any platform. Here, not in
    models.py (which re-exports it), so that reading a pack needs no torch."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(key.encode() + b"\0" + arr.dtype.str.encode() + b"\0" + repr(tuple(arr.shape)).encode() + b"\0")
        h.update(arr.tobytes(order="C"))
    return h.hexdigest()


def parse_version(text: Any) -> Tuple[int, int, int]:
    m = _SEMVER.match(str(text))
    if not m:
        raise PackError(f"format_version {text!r} is not semver MAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def allowed_member(name: str) -> bool:
    """True for the member names a pack may hold (no directories, no traversal, nothing else)."""
    return name in (MANIFEST, SIGNATURE) or name in _FIXED_MEMBERS or bool(_THETA_RE.match(name))


def npy_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    arr = arr if arr.flags.c_contiguous else arr.copy(order="C")   # (keeps 0-d arrays 0-d)
    if arr.dtype.str not in _DTYPES:
        raise ValueError(f"pack arrays must be float32 or int64, got {arr.dtype}")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _band_stats(theta0: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """θ0's per-band input statistics as the model's InputNorm uses them (already clamped when set)."""
    return (np.asarray(theta0["input_norm.mean"], np.float32)[:, None],
            np.asarray(theta0["input_norm.std"], np.float32)[:, None])


def stem_shape(feature_config: FeatureConfig, model_config: ModelConfig) -> Tuple[int, int]:
    """(Mel bins, frames) of the synthetic set as a stem-resolution pack stores it."""
    a, b = model_config.stem_pool
    return feature_config.n_mels // a, feature_config.num_frames // b


def to_stem(X: np.ndarray, theta0: Mapping[str, np.ndarray], stem: Tuple[int, int]) -> np.ndarray:
    """Raw log-Mels (M, n_mels, frames) -> what the model's stem sees: per-band normalised with θ0's input
    statistics, then average-pooled by ``stem`` (a, b) with floor (M, n_mels // a, frames // b).

    The model's output depends on X only through this view, so a pack can store it instead of X: 4x
    fewer bytes for a 2x2 stem, and none of the detail of real speech that the model never sees."""
    a, b = (int(v) for v in stem)
    mean, std = _band_stats(theta0)
    z = (np.asarray(X, np.float32) - mean) / std
    M, F, T = z.shape
    z = z[:, : F // a * a, : T // b * b].reshape(M, F // a, a, T // b, b)
    return np.ascontiguousarray(z.mean(axis=(2, 4), dtype=np.float64).astype(np.float32))


def from_stem(Z: np.ndarray, theta0: Mapping[str, np.ndarray], stem: Tuple[int, int], shape: Tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`to_stem` up to what the model cannot see: every pooled value is repeated over
    its (a, b) cell (edge values fill a remainder the pool drops) and mapped back to raw log-Mels, so
    ``to_stem(from_stem(Z)) == Z`` up to float rounding and the model gives the same outputs."""
    a, b = (int(v) for v in stem)
    mean, std = _band_stats(theta0)
    z = np.repeat(np.repeat(np.asarray(Z, np.float32), a, axis=1), b, axis=2)
    F, T = shape
    z = np.pad(z, ((0, 0), (0, F - z.shape[1]), (0, T - z.shape[2])), mode="edge")
    return np.ascontiguousarray(z * std + mean, dtype=np.float32)


def parse_npy(data: bytes, where: str) -> np.ndarray:
    """Parse ``.npy`` bytes without pickle and without trusting the header's shape for allocation."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    try:
        major, minor = fmt.read_magic(buf)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(buf, max_header_size=4096)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(buf, max_header_size=4096)
        else:
            raise ValueError(f"npy version {major}.{minor}")
    except Exception as exc:
        raise PackError(f"{where}: not a valid .npy array ({' '.join(str(exc).split())[:120]})") from None
    if dtype.str not in _DTYPES or dtype.hasobject:
        raise PackError(f"{where}: dtype {dtype.str} not allowed (float32 / int64 only)")
    if len(shape) > 4 or any((not isinstance(d, int)) or d < 0 for d in shape):
        raise PackError(f"{where}: bad array shape {shape}")
    count = 1
    for d in shape:
        count *= d
    offset = buf.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise PackError(f"{where}: header says {shape} {dtype.str} ({count * dtype.itemsize} bytes) "
                        f"but {len(data) - offset} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return np.array(arr, dtype=_DTYPES[dtype.str], copy=True, order="C")


def _warn(message: str) -> None:
    log.warning(message)


def _allow_unsigned_env() -> bool:
    return os.environ.get(ALLOW_UNSIGNED_ENV, "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------- writing

def write_pack(path, *, X, y, classes, feature_config: FeatureConfig, model_config: ModelConfig,
               schedule: Schedule, theta0: Mapping[str, np.ndarray], golden_inputs, golden_logits,
               golden_tolerance: float, provenance: Optional[dict] = None, calibration=None,
               sequence: Optional[int] = None, private_key=None, created_ms: Optional[int] = None,
               format_version: str = FORMAT_VERSION, resolution: str = "input",
               deployment: Optional[str] = None) -> dict:
    """Write a pack atomically (temp file, fsync, rename); sign it when ``private_key`` is given
    (an Ed25519 key object or a PEM path). Returns ``{"path", "pack_id", "bytes", "sequence", "signed"}``.

    ``resolution="stem"``: ``X`` and ``golden_inputs`` are given as the model's stem sees them
    (:func:`to_stem`, shape (M, n_mels // a, frames // b)) and stored as they are; a device trains on
    :func:`from_stem` of them, so the golden logits must be computed on exactly that, bit for bit (as
    ``edge_ser.packer.pack`` does).

    >>> write_pack("x.pack", X=X, y=y, classes=cls, feature_config=fc, model_config=mc, schedule=s,
    ...            theta0=state_arrays(model), golden_inputs=gi, golden_logits=gl, golden_tolerance=0.05,
    ...            private_key="signing.key")                  # doctest: +SKIP
    """
    created_ms = int(time.time() * 1000) if created_ms is None else int(created_ms)
    sequence = created_ms if sequence is None else int(sequence)
    X = np.ascontiguousarray(X, dtype=np.float32)
    golden_inputs = np.asarray(golden_inputs, dtype=np.float32)
    if resolution not in ("input", "stem"):
        raise ValueError(f"resolution must be 'input' or 'stem', got {resolution!r}")
    if resolution == "stem":
        want = stem_shape(feature_config, model_config)
        if X.shape[1:] != want or golden_inputs.shape[1:] != want:
            raise ValueError(f"resolution='stem' takes X and golden inputs at the stem's resolution {want} "
                             f"(edge_ser.packfile.to_stem), got {X.shape[1:]} / {golden_inputs.shape[1:]}")
    y = np.asarray(y)
    y = np.ascontiguousarray(y, dtype=np.int64 if y.ndim == 1 else np.float32)
    members: Dict[str, bytes] = {
        "data/X.npy": npy_bytes(X), "data/y.npy": npy_bytes(y),
        "golden/inputs.npy": npy_bytes(golden_inputs),
        "golden/logits.npy": npy_bytes(np.asarray(golden_logits, dtype=np.float32)),
    }
    if calibration is not None:
        members["calibration/X.npy"] = npy_bytes(np.asarray(calibration, dtype=np.float32))
    theta = {}
    for k, v in theta0.items():
        v = np.asarray(v)
        v = v.astype(np.int64 if v.dtype.kind in "iu" else np.float32)
        name = f"theta0/{k}.npy"
        if not _THETA_RE.match(name):
            raise ValueError(f"tensor name {k!r} not allowed in a pack")
        members[name] = npy_bytes(v)
        theta[k] = v
    table = {}
    for name, data in members.items():
        arr_header = parse_npy(data, name)
        table[name] = {"sha256": sha256_bytes(data), "bytes": len(data), "dtype": arr_header.dtype.str,
                       "shape": list(arr_header.shape)}
    manifest = {
        "format": FORMAT, "format_version": format_version, "sequence": sequence,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_ms / 1000)),
        "created_ms": created_ms, "classes": list(classes),
        "feature_config": feature_config.to_dict(), "model_config": model_config.to_dict(),
        "schedule": schedule.to_dict(), "theta0_sha256": state_sha256(theta),
        "golden_tolerance": float(golden_tolerance), "provenance": provenance or {}, "members": table,
    }
    if resolution != "input":
        manifest["synthetic_resolution"] = resolution
    if deployment is not None:
        manifest["deployment"] = deployment_identity(deployment, classes, model_config)
    manifest_bytes = json.dumps(manifest, sort_keys=True, indent=1, default=json_default).encode()
    signature = None
    if private_key is not None:
        from . import signing

        key = signing.load_private_key(private_key) if isinstance(private_key, (str, os.PathLike)) else private_key
        signature = json.dumps({"algorithm": "ed25519", "key_id": signing.key_id(key.public_key()),
                                "signature": base64.b64encode(signing.sign(manifest_bytes, key)).decode()},
                               sort_keys=True).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(fh):
        with zipfile.ZipFile(fh, "w") as zf:
            def add(name, data, compress):
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                zf.writestr(info, data)

            add(MANIFEST, manifest_bytes, False)
            if signature is not None:
                add(SIGNATURE, signature, False)
            for name in sorted(members):
                add(name, members[name], True)

    atomic_write(path, write=write)
    return {"path": str(path), "pack_id": sha256_bytes(manifest_bytes), "bytes": path.stat().st_size,
            "sequence": sequence, "signed": signature is not None}


# ---------------------------------------------------------------- reading

@dataclass
class _Container:
    manifest_bytes: bytes
    manifest: dict
    signature: Optional[dict]
    arrays: Dict[str, np.ndarray]
    size: int
    verdict: Any = None          # what ``verify`` returned, before any array member was read


def deployment_identity(deployment: str, classes, model_config: ModelConfig) -> dict:
    """The signed identity a device checks: which deployment (topic) the pack is for, its class set and
    model family. A pack for another deployment is refused before it can touch the rollback floor."""
    deployment = str(deployment).strip().rstrip("/")
    if not deployment or len(deployment) > 200:
        raise ValueError(f"deployment id {deployment!r} must be 1..200 characters")
    return {"id": deployment, "classes": [str(c) for c in classes], "model": model_config.arch}


def check_deployment(manifest: Mapping[str, Any], expected: Optional[str], where: str,
                     configured: bool = True) -> Optional[str]:
    """Refuse (PackError) a manifest whose signed deployment identity is not ``expected``, or is
    inconsistent with the manifest's own classes and model. Returns a warning for an older pack without an
    identity, which is accepted only when no deployment was configured (``configured=False``: ``expected``
    was derived, e.g. from the topic)."""
    dep = manifest.get("deployment")
    if dep is None:
        if expected is not None and configured:
            raise PackError(f"{where}: pack carries no deployment identity; this device serves deployment "
                            f"{expected!r} (rebuild the pack with --deployment)")
        return (f"{where}: pack carries no deployment identity (built before edge-ser signed one); accepted "
                "because no --deployment is configured")
    try:
        ok = (isinstance(dep, dict) and isinstance(dep.get("id"), str) and isinstance(dep.get("classes"), list)
              and [str(c) for c in dep["classes"]] == [str(c) for c in manifest.get("classes", [])]
              and dep.get("model") == (manifest.get("model_config") or {}).get("arch", "convnet"))
    except Exception:
        ok = False
    if not ok:
        raise PackError(f"{where}: deployment identity is malformed or disagrees with the pack's classes/model")
    if expected is not None and dep["id"] != str(expected).strip().rstrip("/"):
        raise PackError(f"{where}: pack is for deployment {dep['id'][:80]!r}, this device serves {expected!r}; "
                        "refused (the rollback floor is unchanged)")
    return None


def _read_container(source, where: str, limits: PackLimits = LIMITS, verify=None) -> _Container:
    """Open, bound-check, hash-check and parse every member. ``source`` is a path or bytes.

    ``verify(head)`` (a :class:`_Container` without arrays) runs right after the manifest and signature
    are read and *before* any other member is decompressed; it raises to refuse the pack."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        size = len(data)
        if size > limits.max_file_bytes:
            raise PackError(f"{where}: {size} bytes is over the {limits.max_file_bytes}-byte pack limit")
        fileobj = io.BytesIO(data)
    else:
        try:
            size = os.path.getsize(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"pack not found: {source}") from None
        if size > limits.max_file_bytes:
            raise PackError(f"{where}: {size} bytes is over the {limits.max_file_bytes}-byte pack limit")
        fileobj = open(source, "rb")
    try:
        try:
            zf = zipfile.ZipFile(fileobj)
        except Exception as exc:   # BadZipFile, struct.error, zip64 oddities...: all one clear line
            raise PackError(f"{where}: not an edge-ser pack or truncated ({' '.join(str(exc).split())[:120]})") from None
        with zf:
            try:
                return _read_members(zf, where, limits, size, verify)
            except PackError:
                raise
            except Exception as exc:
                raise PackError(f"{where}: damaged pack ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    finally:
        fileobj.close()


def _json_loads_bounded(data: bytes, what: str, where: str, max_depth: int = 32):
    """json.loads for untrusted bytes: nesting is bounded first (deep nesting is a RecursionError)."""
    if _json_depth(data, max_depth) > max_depth:
        raise PackError(f"{where}: {what} nests deeper than {max_depth} levels")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackError(f"{where}: {what} is not valid JSON ({exc.__class__.__name__})") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _json_depth(data: bytes, stop: Optional[int] = None) -> int:
    """Maximum bracket nesting of JSON text, strings ignored (linear, no recursion); returns as soon as it
    exceeds ``stop``, so a 100 KB run of brackets costs microseconds."""
    depth = best = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            best = max(best, depth)
            if stop is not None and best > stop:
                return best
        else:
            depth -= 1
    return best


def _check_manifest_bounds(manifest: dict, where: str, limits: PackLimits) -> None:
    """Every size a device will allocate or loop over, from the (already verified) manifest, capped
    before any member is read: member shapes vs bytes, config dimensions, stem expansion, schedule length."""
    table = manifest.get("members")
    if not isinstance(table, dict):
        raise PackError(f"{where}: manifest has no member table")
    for name, entry in table.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise PackError(f"{where}: manifest entry for {str(name)[:80]!r} is malformed")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 4 and all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)):
            raise PackError(f"{where}: manifest shape of {str(name)[:80]!r} is malformed")
    try:
        fc = manifest.get("feature_config") or {}
        mc = manifest.get("model_config") or {}
        dims = [int(fc.get("n_mels", 64)), int(mc.get("n_mels", 64)), int(mc.get("num_frames", 298)),
                int(mc.get("num_classes", 2)), *[int(c) for c in (mc.get("channels") or [])],
                *[int(p) for p in (mc.get("stem_pool") or [1, 1])]]
        if any(not 0 < d <= limits.max_dim for d in dims) or len(mc.get("channels") or []) > 64:
            raise PackError(f"{where}: a feature/model dimension is outside 1..{limits.max_dim}")
        x = table.get("data/X.npy") or {}
        m = int((x.get("shape") or [0])[0])
        frames = int(mc.get("num_frames", 298))
        n_mels = int(mc.get("n_mels", 64))
        for name in ("data/X.npy", "golden/inputs.npy", "calibration/X.npy"):
            n = int(((table.get(name) or {}).get("shape") or [0])[0])
            if n * n_mels * frames * 4 > limits.max_array_bytes:
                raise PackError(f"{where}: {name} expands to {n} x {n_mels} x {frames} float32 "
                                f"({n * n_mels * frames * 4 >> 20} MB), over the {limits.max_array_bytes >> 20} MB limit")
        sched = manifest.get("schedule") or {}
        epochs, batch = int(sched.get("epochs", 100)), int(sched.get("batch_size", 0))
        per_epoch = 1 if batch <= 0 or batch >= m else -(-m // batch)
        if not 0 < epochs <= limits.max_epochs or epochs * per_epoch > limits.max_train_steps:
            raise PackError(f"{where}: schedule of {epochs} epochs x {per_epoch} steps is over the limit "
                            f"({limits.max_epochs} epochs, {limits.max_train_steps} steps)")
    except PackError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError, IndexError):
        raise PackError(f"{where}: manifest feature/model/schedule fields are malformed") from None


def _read_members(zf: zipfile.ZipFile, where: str, limits: PackLimits, size: int, verify=None) -> _Container:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise PackError(f"{where}: {len(infos)} members is over the limit of {limits.max_members}")
    by_name: Dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        if not allowed_member(name):
            raise PackError(f"{where}: member name {name[:80]!r} not allowed (path traversal or unknown member)")
        if name in by_name:
            raise PackError(f"{where}: duplicate member {name!r}")
        if info.flag_bits & 0x1:
            raise PackError(f"{where}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise PackError(f"{where}: member {name!r} uses unsupported compression {info.compress_type}")
        if info.file_size > limits.max_member_bytes:
            raise PackError(f"{where}: member {name!r} declares {info.file_size} bytes, over the "
                            f"{limits.max_member_bytes}-byte member limit (decompression bomb?)")
        if info.file_size > limits.max_ratio * max(info.compress_size, 1) and info.file_size > limits.ratio_floor:
            raise PackError(f"{where}: member {name!r} expands {info.file_size // max(info.compress_size, 1)}x "
                            f"(over {limits.max_ratio}x: decompression bomb?)")
        total += info.file_size
        by_name[name] = info
    if total > limits.max_total_bytes:
        raise PackError(f"{where}: members declare {total} bytes in all, over the {limits.max_total_bytes}-byte limit")
    if MANIFEST not in by_name:
        raise PackError(f"{where}: no {MANIFEST}; not an edge-ser pack")
    if by_name[MANIFEST].file_size > limits.max_manifest_bytes:
        raise PackError(f"{where}: manifest declares {by_name[MANIFEST].file_size} bytes, over the limit")

    def read(name: str, expected: Optional[int] = None) -> bytes:
        info = by_name[name]
        try:
            with zf.open(info) as fh:
                data = fh.read(info.file_size + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise PackError(f"{where}: member {name!r} unreadable: corrupted or truncated ({exc})") from None

        if len(data) != info.file_size or (expected is not None and len(data) != expected):
            raise PackError(f"{where}: member {name!r} has {len(data)} bytes, expected "
                            f"{expected if expected is not None else info.file_size}")
        return data

    try:
        manifest_bytes = read(MANIFEST)
        manifest = _json_loads_bounded(manifest_bytes, "manifest", where)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise PackError(f"{where}: manifest does not describe an {FORMAT} (format={found!r})")
        signature = None
        if SIGNATURE in by_name:
            if by_name[SIGNATURE].file_size > 4096:
                raise PackError(f"{where}: signature member too large")
            signature = parse_signature(read(SIGNATURE), where)
        verdict = None
        if verify is not None:   # the signature is checked before any other member is decompressed
            verdict = verify(_Container(manifest_bytes, manifest, signature, {}, size))
        version = manifest.get("format_version")
        major = parse_version(version)[0]
        if major != SUPPORTED_MAJOR:
            raise PackError(f"{where}: pack format version {version} is not supported by this edge-ser "
                            f"(it reads {SUPPORTED_MAJOR}.x); {'upgrade edge-ser on this device' if major > SUPPORTED_MAJOR else 'rebuild the pack'}")
        _check_manifest_bounds(manifest, where, limits)
        table = manifest["members"]
        listed = set(table)
        present = set(by_name) - {MANIFEST, SIGNATURE}
        if listed != present:
            missing, extra = sorted(listed - present), sorted(present - listed)
            raise PackError(f"{where}: members differ from the manifest (missing {missing[:5]}, unlisted {extra[:5]})")
        arrays: Dict[str, np.ndarray] = {}
        for name in sorted(listed):
            entry = table[name]
            data = read(name, entry["bytes"])
            if sha256_bytes(data) != entry["sha256"]:
                raise PackError(f"{where}: member {name!r} fails its SHA-256 check (pack corrupted or tampered)")
            arr = parse_npy(data, f"{where}: {name}")
            if arr.dtype.str != entry.get("dtype") or list(arr.shape) != entry.get("shape"):
                raise PackError(f"{where}: member {name!r} dtype/shape differ from the manifest")
            arrays[name] = arr
    except PackError:
        raise
    except Exception as exc:  # zlib.error and friends from a damaged archive: still one clear line
        raise PackError(f"{where}: damaged pack ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    return _Container(manifest_bytes, manifest, signature, arrays, size, verdict)


def parse_signature(data: bytes, where: str) -> dict:
    """signature.json bytes -> dict with ``_raw`` (the 64 signature bytes); PackError when malformed."""
    try:
        if len(data) > 4096:
            raise ValueError
        signature = json.loads(data.decode("utf-8"))
        if not isinstance(signature, dict):
            raise ValueError
        signature["_raw"] = base64.b64decode(str(signature.get("signature", "")), validate=True)
    except Exception:
        raise PackError(f"{where}: signature.json is malformed") from None
    return signature


def resolve_public_key(public_key=None):
    """The key object to verify with: ``public_key`` (object, PEM path or bytes), else the installed
    default, else None."""
    from . import signing

    if public_key is not None:
        return public_key if hasattr(public_key, "verify") else signing.load_public_key(public_key)
    if signing.default_public_key().exists():
        return signing.load_public_key(signing.default_public_key())
    return None


def _check_signature(c: _Container, where: str, public_key, require_signature: Optional[bool]):
    """Apply the signature policy. Returns (signed_and_verified, key_id).

    ``$EDGE_SER_ALLOW_UNSIGNED`` only helps where no public key is configured: with a key, a pack must
    carry a signature that verifies under it, whatever the environment says."""
    from . import signing

    from_env = require_signature is None
    if require_signature is None:
        require_signature = not _allow_unsigned_env()
    pub = resolve_public_key(public_key)
    sig = c.signature
    if sig is None:
        if pub is not None and from_env:      # only an explicit require_signature=False (code) may skip a key
            raise PackError(f"{where}: pack is unsigned but a public key ({signing.key_id(pub)}) is configured; "
                            f"refused ({ALLOW_UNSIGNED_ENV} does not override a configured key)")
        if require_signature:
            raise PackError(f"{where}: pack is unsigned; devices refuse unsigned packs "
                            f"(set {ALLOW_UNSIGNED_ENV}=1 only for local experiments)")
        _warn(f"{where}: UNSIGNED pack accepted because {ALLOW_UNSIGNED_ENV} / require_signature=False; "
              "its origin is NOT verified")
        return False, None
    if sig.get("algorithm") != "ed25519":
        raise PackError(f"{where}: unsupported signature algorithm {str(sig.get('algorithm'))[:40]!r}")
    if pub is None:
        if require_signature:
            raise PackError(f"{where}: no public key to verify the signature with: pass --public-key "
                            f"or install one at {signing.default_public_key()}")
        _warn(f"{where}: signature NOT verified (no public key configured); accepted because unsigned packs are allowed")
        return False, str(sig.get("key_id"))[:64]
    if not signing.verify(c.manifest_bytes, sig["_raw"], pub):
        raise PackError(f"{where}: signature does not verify with public key {signing.key_id(pub)} "
                        f"(pack tampered, or signed by key {str(sig.get('key_id'))[:16]})")
    return True, signing.key_id(pub)


def verify_manifest(manifest_bytes: bytes, signature_bytes: Optional[bytes], where: str, public_key=None,
                    require_signature: Optional[bool] = None, limits: PackLimits = LIMITS):
    """Check a manifest on its own (as an announcement carries it): size, JSON, format, signature policy,
    and the derived-size caps. Returns ``(manifest, signed, key_id)``; PackError otherwise."""
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise PackError(f"{where}: manifest of {len(manifest_bytes)} bytes is over the limit")
    manifest = _json_loads_bounded(manifest_bytes, "manifest", where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{where}: not an {FORMAT} manifest")
    signature = parse_signature(signature_bytes, where) if signature_bytes is not None else None
    signed, kid = _check_signature(_Container(manifest_bytes, manifest, signature, {}, 0), where, public_key,
                                   require_signature)
    if parse_version(manifest.get("format_version"))[0] != SUPPORTED_MAJOR:
        raise PackError(f"{where}: pack format version {manifest.get('format_version')} is not supported")
    _check_manifest_bounds(manifest, where, limits)
    if not isinstance(manifest.get("sequence"), int) or not 0 <= manifest["sequence"] < 1 << 63:
        raise PackError(f"{where}: manifest sequence is not an integer in 0..2^63")
    return manifest, signed, kid


def load_pack(path, public_key=None, require_signature: Optional[bool] = None,
              limits: PackLimits = LIMITS) -> Pack:
    """Load and fully verify a pack: the manifest's signature first, then (only if it verifies) the
    members, each against its SHA-256 in the manifest, within caps derived from the signed manifest.

    ``public_key``: PEM path/bytes or key object; default ``$EDGE_SER_HOME/signing.pub`` if present.
    ``require_signature``: None (default) means required unless ``$EDGE_SER_ALLOW_UNSIGNED=1`` and no
    public key is configured; an unsigned or unverifiable pack accepted by that opt-in is announced
    loudly on stderr.

    >>> pack = load_pack("demo.pack", public_key="~/.config/edge-ser/signing.pub")   # doctest: +SKIP
    """
    where = str(path)
    c = _read_container(path, where, limits,
                        verify=lambda head: _check_signature(head, where, public_key, require_signature))
    signed, kid = c.verdict
    return _build(c, where, signed, kid)

def _build(c: _Container, where: str, signed: bool, kid: Optional[str]) -> Pack:
    m, a = c.manifest, c.arrays
    try:
        classes = tuple(str(x) for x in m["classes"])
        fc = FeatureConfig.from_dict(m["feature_config"])
        mc = ModelConfig.from_dict(m["model_config"])
        sched = Schedule.from_dict(m["schedule"])
        sequence = int(m["sequence"])
        tol = float(m["golden_tolerance"])
        theta_sha = str(m["theta0_sha256"])
        provenance = dict(m.get("provenance") or {})
        resolution = str(m.get("synthetic_resolution", "input"))
        if resolution not in ("input", "stem"):
            raise ValueError(f"synthetic_resolution {resolution!r} unknown")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise PackError(f"{where}: manifest field invalid or missing ({' '.join(str(exc).split())[:120]})") from None
    for name in ("data/X.npy", "data/y.npy", "golden/inputs.npy", "golden/logits.npy"):
        if name not in a:
            raise PackError(f"{where}: required member {name!r} missing")
    X, y = a["data/X.npy"], a["data/y.npy"]
    gi, gl = a["golden/inputs.npy"], a["golden/logits.npy"]
    C, shape = len(classes), (fc.n_mels, fc.num_frames)
    stored = shape if resolution == "input" else stem_shape(fc, mc)
    problems = []
    if C < 2 or mc.num_classes != C:
        problems.append(f"{C} classes but the model has {mc.num_classes} outputs")
    if X.dtype != np.float32 or X.ndim != 3 or X.shape[1:] != stored or len(X) < 1:
        problems.append(f"synthetic X has shape {X.shape}, expected (M, {stored[0]}, {stored[1]}) float32")
    if y.ndim == 1 and y.dtype == np.int64:
        if len(y) and (y.min() < 0 or y.max() >= C):
            problems.append("labels out of range")
    elif not (y.ndim == 2 and y.dtype == np.float32 and y.shape[1] == C):
        problems.append(f"labels have shape {y.shape} {y.dtype}")
    if len(y) != len(X):
        problems.append(f"{len(X)} samples but {len(y)} labels")
    if gi.ndim != 3 or gi.shape[1:] != stored or gl.shape != (len(gi), C):
        problems.append(f"golden vectors have shapes {gi.shape} / {gl.shape}")
    for label, arr in (("X", X), ("golden inputs", gi), ("golden logits", gl)):
        if not np.isfinite(arr).all():
            problems.append(f"{label} contain NaN/inf")
    if problems:
        raise PackError(f"{where}: invalid contents: {'; '.join(problems)}")
    theta = {}
    for name, arr in a.items():
        mm = _THETA_RE.match(name)
        if mm:
            theta[mm.group(1)] = arr
    if not theta:
        raise PackError(f"{where}: no θ0 tensors")
    if state_sha256(theta) != theta_sha:
        raise PackError(f"{where}: θ0 tensors do not match theta0_sha256")
    if resolution == "stem":
        if "input_norm.mean" not in theta or "input_norm.std" not in theta:
            raise PackError(f"{where}: a stem-resolution pack needs θ0's input_norm statistics")
        X, gi = (from_stem(v, theta, mc.stem_pool, shape) for v in (X, gi))
    deployment = m.get("deployment") if isinstance(m.get("deployment"), dict) else None
    return Pack(path=where, pack_id=sha256_bytes(c.manifest_bytes), sequence=sequence,
                format_version=str(m["format_version"]), classes=classes, feature_config=fc, model_config=mc,
                schedule=sched, theta0=theta, theta0_sha256=theta_sha, X=X, y=y, golden_inputs=gi,
                golden_logits=gl, golden_tolerance=tol, calibration=a.get("calibration/X.npy"),
                provenance=provenance, signed=signed, key_id=kid, created=str(m.get("created", "")), manifest=m,
                deployment=deployment)


def read_manifest(path, limits: PackLimits = LIMITS) -> Tuple[str, dict]:
    """(pack_id, manifest) after the full integrity check but *without* the signature policy."""
    c = _read_container(path, str(path), limits)
    return sha256_bytes(c.manifest_bytes), c.manifest
