"""The pack wire protocol over MQTT and the server's publisher.

Topics under a prefix ``T`` (e.g. ``ser/packs``)::

    T/announce                 retained JSON: pack_id, sequence, size, sha256, chunks, chunk_size,
                               chunk_sha256 (one hex digest per chunk), and (v2) the pack's signed
                               manifest and signature, base64
    T/chunks/<pack_id>/<i>     retained raw bytes of chunk i (<= 64 KB), QoS 1
    T/status/<device-id>       retained JSON from each agent: online / stored / refused / trained / offline

The publisher sends every chunk, then the announcement, then clears the previous pack's retained
chunks, so a device that connects late finds the newest pack complete on the broker.

Everything on these topics is untrusted input: :func:`parse_announcement` bounds the size, the JSON
nesting and every number before using any of it, and raises ``ValueError`` (never anything else) for junk.
The signed manifest inside an announcement lets a device check signature, sequence and deployment
*before* downloading anything; the file-level hashes (size, sha256, chunk_sha256) are not signed and
only steer the transfer.

>>> publish("demo.pack", "mqtts://broker:8883", "ser/packs", username="srv", cafile="ca.crt")  # doctest: +SKIP
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Optional

from .mqtt import Client, TransportError, topics

log = logging.getLogger("edge_ser.chunks")

MAX_CHUNK = 65536
MAX_ANNOUNCE_BYTES = 1 << 20
MAX_JSON_DEPTH = 8
MAX_SEQUENCE = (1 << 63) - 1
DEFAULT_MAX_PACK_BYTES = 256 << 20
ANNOUNCE_TYPE = "edge-ser-pack"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INDEX = re.compile(r"^(?:0|[1-9][0-9]{0,8})$")     # ASCII digits only: '²'.isdigit() is True, int('²') fails


def make_announcement(data: bytes, pack_id: str, sequence: int, chunk_size: int,
                      manifest: Optional[bytes] = None, signature: Optional[bytes] = None) -> dict:
    """The announcement of pack bytes ``data``. The signed manifest (and signature) are taken from
    ``data`` unless given, so a device can verify the pack's identity before it downloads a byte."""
    if manifest is None:
        manifest, signature = _manifest_members(data)
    chunks = max(1, math.ceil(len(data) / chunk_size))
    a = {"type": ANNOUNCE_TYPE, "v": 2, "pack_id": pack_id, "sequence": int(sequence), "size": len(data),
         "sha256": hashlib.sha256(data).hexdigest(), "chunks": chunks, "chunk_size": chunk_size,
         "chunk_sha256": [hashlib.sha256(data[i * chunk_size:(i + 1) * chunk_size]).hexdigest()
                          for i in range(chunks)],
         "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if manifest is not None:
        a["manifest"] = base64.b64encode(manifest).decode()
        if signature is not None:
            a["signature"] = base64.b64encode(signature).decode()
    return a


def _manifest_members(data: bytes):
    """(manifest.json bytes, signature.json bytes or None) of a pack, or (None, None)."""
    try:
        with zipfile.ZipFile(BytesIO(data)) as zf:
            names = zf.namelist()
            manifest = zf.read("manifest.json") if "manifest.json" in names else None
            signature = zf.read("signature.json") if "signature.json" in names else None
        return manifest, signature
    except Exception:
        return None, None


def json_depth(payload: bytes, stop: Optional[int] = MAX_JSON_DEPTH) -> int:
    """Bracket nesting of JSON text, strings skipped; linear, without recursion, stops past ``stop``."""
    from .packfile import _json_depth

    return _json_depth(payload, stop)


def _bounded_int(a: dict, key: str, lo: int, hi: int) -> int:
    v = a.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"announced {key} is not an integer in {lo}..{hi}")
    return v


def parse_announcement(payload: bytes, max_pack_bytes: int = DEFAULT_MAX_PACK_BYTES) -> dict:
    """Validate an announcement; raises ValueError with a short reason for any junk (and nothing else)."""
    try:
        return _parse_announcement(bytes(payload), max_pack_bytes)
    except ValueError as exc:
        raise ValueError(" ".join(str(exc).split())[:200]) from None
    except Exception as exc:     # RecursionError, MemoryError, ...: still junk, never a crash
        raise ValueError(f"announcement unparseable ({type(exc).__name__})") from None


def _parse_announcement(payload: bytes, max_pack_bytes: int) -> dict:
    if len(payload) > MAX_ANNOUNCE_BYTES:
        raise ValueError(f"announcement of {len(payload)} bytes is too large")
    try:
        text = payload.decode("utf-8")            # random bytes stop here, cheaply
    except UnicodeDecodeError:
        raise ValueError("announcement is not JSON") from None
    # a genuine announcement has 2 brackets; only a payload with many is scanned for its nesting depth
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH and json_depth(payload) > MAX_JSON_DEPTH:
        raise ValueError(f"announcement nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        a = json.loads(text)
    except ValueError:                            # includes ints over Python's 4300-digit limit
        raise ValueError("announcement is not JSON") from None
    if not isinstance(a, dict) or a.get("type") != ANNOUNCE_TYPE:
        raise ValueError("not an edge-ser pack announcement")
    seq = _bounded_int(a, "sequence", 0, MAX_SEQUENCE)
    size = _bounded_int(a, "size", 1, max_pack_bytes)
    chunk_size = _bounded_int(a, "chunk_size", 1, MAX_CHUNK)
    chunks = _bounded_int(a, "chunks", 1, max_pack_bytes)
    if not (isinstance(a.get("pack_id"), str) and _HEX64.match(a["pack_id"]) and isinstance(a.get("sha256"), str)
            and _HEX64.match(a["sha256"])):
        raise ValueError("announcement pack_id/sha256 are not SHA-256 hex digests")
    if chunks != math.ceil(size / chunk_size):
        raise ValueError("announced chunk count does not match size / chunk_size")
    hashes = a.get("chunk_sha256")
    if not (isinstance(hashes, list) and len(hashes) == chunks
            and all(isinstance(h, str) and _HEX64.match(h) for h in hashes)):
        raise ValueError("announcement has no valid per-chunk hashes")
    out = {"type": ANNOUNCE_TYPE, "v": a.get("v") if isinstance(a.get("v"), int) else 1, "pack_id": a["pack_id"],
           "sequence": seq, "size": size, "sha256": a["sha256"], "chunks": chunks, "chunk_size": chunk_size,
           "chunk_sha256": list(hashes), "manifest": None, "signature": None}
    for key in ("manifest", "signature"):
        v = a.get(key)
        if v is None:
            continue
        if not isinstance(v, str):
            raise ValueError(f"announced {key} is not base64 text")
        try:
            out[key] = base64.b64decode(v, validate=True)
        except ValueError:
            raise ValueError(f"announced {key} is not base64") from None
    if out["manifest"] is not None and hashlib.sha256(out["manifest"]).hexdigest() != out["pack_id"]:
        raise ValueError("announced manifest does not hash to the pack id")
    out["key"] = transfer_key(out)
    return out


def transfer_key(a: dict) -> str:
    """What a transfer is keyed by: every unsigned field that steers it (file hash, size, chunking and
    chunk hashes), so junk that copies some of them never shadows the genuine announcement."""
    h = hashlib.sha256(f"{a['sha256']}|{a['size']}|{a['chunk_size']}|".encode())
    h.update(",".join(a["chunk_sha256"]).encode())
    return h.hexdigest()


def chunk_index(text: str) -> Optional[int]:
    """The chunk number in a topic's last level, or None: ASCII digits only, at most 9 of them."""
    return int(text) if _INDEX.match(text) else None


class Reassembler:
    """Collect chunks of one announced pack into a pre-sized file; order and duplicates do not matter.

    >>> r = Reassembler(announcement, "/tmp/incoming.part")        # doctest: +SKIP
    >>> r.add(3, payload)   # -> "ok" | "duplicate" | "rejected"      # doctest: +SKIP
    """

    def __init__(self, announcement: dict, path):
        self.a = announcement
        self.path = Path(path)
        self.have = set()
        self.rejected = 0
        self.duplicates = 0
        self.started = self.last_progress = time.monotonic()
        self._fh = open(self.path, "wb+")
        self._fh.truncate(announcement["size"])

    @property
    def key(self) -> str:
        """What this transfer is keyed by: the announced content, not the (copyable) pack id."""
        return self.a.get("key") or transfer_key(self.a)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.a["chunks"]

    def expected_length(self, index: int) -> int:
        a = self.a
        return a["chunk_size"] if index < a["chunks"] - 1 else a["size"] - a["chunk_size"] * (a["chunks"] - 1)

    def add(self, index: int, payload: bytes) -> str:
        if not (0 <= index < self.a["chunks"]) or len(payload) != self.expected_length(index):
            self.rejected += 1
            return "rejected"
        if index in self.have:
            self.duplicates += 1
            return "duplicate"
        if hashlib.sha256(payload).hexdigest() != self.a["chunk_sha256"][index]:
            self.rejected += 1
            return "rejected"
        self._fh.seek(index * self.a["chunk_size"])
        self._fh.write(payload)
        self.have.add(index)
        self.last_progress = time.monotonic()
        return "ok"

    def finish(self) -> Path:
        """Flush, fsync and check the whole-file SHA-256; returns the file's path."""
        if not self.complete:
            raise ValueError(f"{self.a['chunks'] - len(self.have)} chunks missing")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.seek(0)
        h = hashlib.sha256()
        for block in iter(lambda: self._fh.read(1 << 20), b""):
            h.update(block)
        self._fh.close()
        if h.hexdigest() != self.a["sha256"]:
            raise ValueError("reassembled pack fails the announced whole-file SHA-256")
        return self.path

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- server side

def _verified_sequence(old: dict, public_key, topic: str) -> Optional[int]:
    """The sequence of a retained announcement if its manifest is signed by ``public_key`` (and is not for
    another deployment), else None."""
    from .packfile import PackError, verify_manifest

    if public_key is None or old.get("manifest") is None:
        return None
    try:
        manifest, signed, _ = verify_manifest(old["manifest"], old.get("signature"), "retained announcement",
                                              public_key=public_key, require_signature=True)
    except (PackError, ValueError, OSError):
        return None
    dep = manifest.get("deployment")
    if isinstance(dep, dict) and dep.get("id") != topic.strip().rstrip("/"):
        return None
    return int(manifest["sequence"]) if signed and manifest["sequence"] == old["sequence"] else None


def _publisher_key(public_key):
    """The key that tells a genuine retained announcement from junk: ``public_key``, else the default
    public key, else the public half of the default signing key; None when there is none."""
    from . import signing

    try:
        if public_key is not None:
            return signing.load_public_key(public_key)
        for path in (signing.default_public_key(), signing.default_private_key()):
            if path.exists():
                return signing.load_public_key(path)
    except (ValueError, OSError, RuntimeError):
        return None
    return None


def publish(pack, broker: str, topic: str, username=None, password=None, cafile=None, chunk_size: int = 60_000,
            timeout: float = 60, insecure: bool = False, public_key=None) -> dict:
    """Publish a pack: retained chunks (QoS 1), then the retained announcement, then clear the previous
    pack's chunks. Refuses to announce a pack older than the one the broker already announces *when that
    announcement is signed by our key*; a junk or unverifiable retained announcement is replaced (with a
    warning), never obeyed.

    >>> publish("demo.pack", "mqtt://127.0.0.1:1883", "ser/packs")["chunks"]    # doctest: +SKIP
    """
    from .packfile import read_manifest

    if not 1 <= int(chunk_size) <= MAX_CHUNK:
        raise ValueError(f"--chunk-size must be 1..{MAX_CHUNK} bytes, got {chunk_size}")
    t0 = time.monotonic()
    deadline = t0 + timeout
    t = topics(topic)
    pack_id, manifest = read_manifest(pack)   # a corrupt file never leaves the server
    dep = manifest.get("deployment")
    if isinstance(dep, dict) and dep.get("id") != topic.strip().rstrip("/"):
        raise ValueError(f"{pack} is signed for deployment {str(dep.get('id'))[:80]!r} but would be published on "
                         f"topic {topic!r}: devices there refuse it (rebuild with --deployment {topic})")
    data = Path(pack).read_bytes()
    man_bytes, sig_bytes = _manifest_members(data)
    signed = sig_bytes is not None
    if not signed:
        log.warning(f"{pack} is unsigned; devices will refuse it")
    ann = make_announcement(data, pack_id, int(manifest["sequence"]), int(chunk_size), man_bytes, sig_bytes)
    old = {}
    got_old = threading.Event()
    junk = []

    def on_message(client, userdata, msg):
        if msg.topic == t["announce"] and msg.payload:
            try:
                old.update(parse_announcement(msg.payload))
            except ValueError as exc:
                junk.append(str(exc))
        got_old.set()

    conn = Client(broker, f"edge-ser-pub-{os.getpid()}-{int(t0 * 1000) % 100000}", username, password, cafile,
                  on_message=on_message, insecure=insecure)
    conn.open(timeout)
    notes = []
    try:
        conn.client.subscribe(t["announce"], qos=1)
        got_old.wait(1.0)               # a retained announcement arrives right after SUBACK
        conn.client.unsubscribe(t["announce"])
        verified = None
        if junk:
            notes.append(f"replaced a junk retained announcement ({junk[-1]})")
        elif old and old.get("pack_id") != pack_id:
            verified = _verified_sequence(old, _publisher_key(public_key), topic)
            if verified is None:
                notes.append(f"the retained announcement (sequence {old['sequence']}) is not signed by our key "
                             "for this topic; replaced")
            elif verified >= ann["sequence"]:
                raise ValueError(f"the broker already announces pack sequence {verified} "
                                 f">= this pack's {ann['sequence']}; devices would refuse it")
        conn.publish_many(((f"{t['chunks']}/{pack_id}/{i}", data[i * chunk_size:(i + 1) * chunk_size], True)
                           for i in range(ann["chunks"])), deadline)
        conn.publish(t["announce"], json.dumps(ann).encode(), True, deadline)   # only after every chunk is acked
        cleared = 0
        if old and old.get("pack_id") != pack_id:
            # a genuine old pack's chunks all go; for an unverified one only a bounded number (junk can claim millions)
            n_old = min(int(old["chunks"]), 100_000 if verified is not None else 256)
            conn.publish_many(((f"{t['chunks']}/{old['pack_id']}/{i}", b"", True) for i in range(n_old)), deadline)
            cleared = n_old
    finally:
        conn.close()
    for note in notes:
        log.info(note)
    return {"ok": True, "pack": str(pack), "pack_id": pack_id, "sequence": ann["sequence"], "bytes": len(data),
            "sha256": ann["sha256"], "chunks": ann["chunks"], "chunk_size": chunk_size, "broker": broker,
            "topic": t["announce"], "signed": signed, "replaced": old.get("pack_id"), "cleared_chunks": cleared,
            "deployment": dep.get("id") if isinstance(dep, dict) else None, "notes": notes,
            "seconds": round(time.monotonic() - t0, 3)}


__all__ = ["MAX_CHUNK", "MAX_ANNOUNCE_BYTES", "DEFAULT_MAX_PACK_BYTES", "Reassembler", "TransportError",
           "chunk_index", "make_announcement", "parse_announcement", "publish"]
