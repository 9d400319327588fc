"""Pack delivery over MQTT (paho-mqtt 2.x): the server's chunked publisher and the device agent.

Topics under a prefix ``T`` (e.g. ``ser/packs``)::

    T/announce                 retained JSON: pack_id, sequence, size, sha256, chunks, chunk_size,
                               chunk_sha256 (one hex digest per chunk)
    T/chunks/<pack_id>/<i>     retained raw bytes of chunk i (<= 64 KB), QoS 1
    T/status/<device-id>       retained JSON from each agent: online / stored / refused / trained / offline

The publisher sends every chunk, then the announcement, then clears the previous pack's retained
chunks, so a device that connects late finds the newest pack complete on the broker. The agent
subscribes to the announcement, then to that pack's chunks; it reassembles into a pre-sized file under
``store/incoming`` (memory stays at one chunk), drops duplicates and chunks whose hash is wrong,
re-subscribes when a transfer stalls, checks the whole-file SHA-256, verifies the pack (integrity,
signature, sequence newer than any stored) and only then commits it atomically (:mod:`edge_ser.store`).

>>> publish("demo.pack", "mqtts://broker:8883", "ser/packs", username="srv", password="...",
...         cafile="ca.crt")                                             # doctest: +SKIP
>>> run_agent("mqtts://broker:8883", "ser/packs", public_key="signing.pub", once=True, ...)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

MAX_CHUNK = 65536
MAX_ANNOUNCE_BYTES = 1 << 20
DEFAULT_MAX_PACK_BYTES = 256 << 20
STALL_SECONDS = 10.0
QUEUE_MAX = 512
QUEUE_MAX_BYTES = 16 << 20


class TransportError(RuntimeError):
    """A delivery problem stated in one line (broker unreachable, refused credentials, bad TLS, ...)."""


# ---------------------------------------------------------------- broker connection

def parse_broker(url: str) -> Tuple[str, int, bool]:
    """``mqtt://host:port`` / ``mqtts://host:port`` (or ``host:port``) -> (host, port, tls)."""
    if "://" not in url:
        url = "mqtt://" + url
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not u.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = u.scheme in ("mqtts", "ssl")
    return u.hostname, u.port or (8883 if tls else 1883), tls


def topics(prefix: str) -> dict:
    prefix = prefix.strip().rstrip("/")
    if not prefix or any(c in prefix for c in "+#\0"):
        raise ValueError(f"invalid topic prefix {prefix!r} (no wildcards, not empty)")
    return {"announce": f"{prefix}/announce", "chunks": f"{prefix}/chunks", "status": f"{prefix}/status"}


class _Connection:
    """A connected paho client running its network loop in a thread; reconnects with backoff."""

    def __init__(self, broker: str, client_id: str, username=None, password=None, cafile=None,
                 on_message=None, on_connected=None, will: Optional[Tuple[str, bytes]] = None):
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.url = broker
        self.host, self.port, self.tls = parse_broker(broker)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: Optional[str] = None
        self._on_connected = on_connected
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.max_inflight_messages_set(20)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        if username is not None:
            c.username_pw_set(username, password)
        if self.tls:
            if cafile and not os.path.exists(cafile):
                raise FileNotFoundError(f"CA file not found: {cafile}")
            c.tls_set(ca_certs=cafile, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        elif cafile:
            raise ValueError("--cafile given for a plain mqtt:// broker; use mqtts:// for TLS")
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._connect_cb
        c.on_disconnect = self._disconnect_cb
        if on_message:
            c.on_message = on_message
        self.client = c

    def _connect_cb(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.connack = str(reason_code)
            return
        self.connack = None
        self.connected.set()
        if self._on_connected:
            self._on_connected(self)

    def _disconnect_cb(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.disconnected.set()

    def open(self, timeout: float, retry: bool = True) -> None:
        """Connect, retrying refused/unreachable brokers with backoff until ``timeout``; TLS and
        credential errors fail at once with a clear line."""
        deadline, delay, last = time.monotonic() + timeout, 0.5, None
        while True:
            try:
                self.client.connect(self.host, self.port, keepalive=30)
                break
            except ssl.SSLCertVerificationError as exc:
                raise TransportError(f"TLS certificate of {self.host}:{self.port} not trusted "
                                     f"(wrong --cafile?): {exc.verify_message or exc}") from None
            except ssl.SSLError as exc:
                raise TransportError(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from None
            except (ConnectionError, socket.timeout, socket.gaierror, OSError) as exc:
                last = exc
                if not retry or time.monotonic() + delay > deadline:
                    raise TransportError(f"cannot reach MQTT broker {self.url}: "
                                         f"{exc.strerror or exc} (is it running?)") from None
                time.sleep(delay)
                delay = min(delay * 2, 10)
        self.client.loop_start()
        while not self.connected.wait(0.1):
            if self.connack:
                self.close()
                hint = " (check --username/--password)" if "authori" in self.connack.lower() or "password" in self.connack.lower() else ""
                raise TransportError(f"MQTT broker {self.url} refused the connection: {self.connack}{hint}")
            if time.monotonic() > deadline:
                self.close()
                raise TransportError(f"no answer from MQTT broker {self.url} within {timeout:.0f}s "
                                     f"(last error: {last})")

    def publish(self, topic: str, payload: bytes, retain: bool, deadline: float, qos: int = 1) -> None:
        """Publish with QoS 1 and wait for the broker's ack, re-sending across reconnects until ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"timed out publishing to {self.url} (broker gone?)")
            if not self.connected.wait(min(remaining, 1.0)):
                continue
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            try:
                info.wait_for_publish(timeout=min(remaining, 10.0))
            except (RuntimeError, ValueError):
                time.sleep(0.2)
                continue
            if info.is_published():
                return

    def publish_many(self, items, deadline: float, window: int = 16) -> None:
        """Publish ``(topic, payload, retain)`` items with up to ``window`` QoS-1 messages in flight; any
        message not acknowledged (broker restart, ...) is re-sent by :meth:`publish`."""
        items = list(items)
        for start in range(0, len(items), window):
            batch = items[start:start + window]
            infos = []
            if self.connected.is_set():
                infos = [self.client.publish(t, p, qos=1, retain=r) for t, p, r in batch]
            for k, (t, p, r) in enumerate(batch):
                ok = False
                if k < len(infos):
                    try:
                        infos[k].wait_for_publish(timeout=max(0.0, min(deadline - time.monotonic(), 10.0)))
                        ok = infos[k].is_published()
                    except (RuntimeError, ValueError):
                        ok = False
                if not ok:
                    self.publish(t, p, r, deadline)

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly: wait (up to ``timeout``) until DISCONNECT is on the wire, so the broker
        does not publish the last will of a client that left on purpose."""
        try:
            self.disconnected.clear()
            if self.connected.is_set() and self.client.disconnect() == 0:
                self.disconnected.wait(timeout)
        except Exception:
            pass
        self.client.loop_stop()
        try:    # paho keeps its wake-up socket pair until garbage collection; close it now
            self.client._reset_sockets()
        except Exception:
            pass


# ---------------------------------------------------------------- announcement and chunks

def make_announcement(data: bytes, pack_id: str, sequence: int, chunk_size: int) -> dict:
    chunks = max(1, math.ceil(len(data) / chunk_size))
    return {"type": "edge-ser-pack", "v": 1, "pack_id": pack_id, "sequence": int(sequence), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "chunks": chunks, "chunk_size": chunk_size,
            "chunk_sha256": [hashlib.sha256(data[i * chunk_size:(i + 1) * chunk_size]).hexdigest()
                             for i in range(chunks)],
            "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def parse_announcement(payload: bytes, max_pack_bytes: int = DEFAULT_MAX_PACK_BYTES) -> dict:
    """Validate an announcement; raises ValueError with the reason for junk."""
    if len(payload) > MAX_ANNOUNCE_BYTES:
        raise ValueError(f"announcement of {len(payload)} bytes is too large")
    try:
        a = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("announcement is not JSON") from None
    if not isinstance(a, dict) or a.get("type") != "edge-ser-pack":
        raise ValueError("not an edge-ser pack announcement")
    ints = ("sequence", "size", "chunks", "chunk_size")
    if not all(isinstance(a.get(k), int) and not isinstance(a.get(k), bool) for k in ints):
        raise ValueError("announcement lacks integer sequence/size/chunks/chunk_size")
    if not (isinstance(a.get("pack_id"), str) and _HEX64.match(a["pack_id"]) and isinstance(a.get("sha256"), str)
            and _HEX64.match(a["sha256"])):
        raise ValueError("announcement pack_id/sha256 are not SHA-256 hex digests")
    if not 0 < a["size"] <= max_pack_bytes:
        raise ValueError(f"announced size {a['size']} outside 1..{max_pack_bytes} bytes")
    if not 0 < a["chunk_size"] <= MAX_CHUNK:
        raise ValueError(f"announced chunk size {a['chunk_size']} outside 1..{MAX_CHUNK}")
    if a["chunks"] != math.ceil(a["size"] / a["chunk_size"]):
        raise ValueError("announced chunk count does not match size / chunk_size")
    hashes = a.get("chunk_sha256")
    if not (isinstance(hashes, list) and len(hashes) == a["chunks"]
            and all(isinstance(h, str) and _HEX64.match(h) for h in hashes)):
        raise ValueError("announcement has no valid per-chunk hashes")
    return a


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
        self.last_progress = time.monotonic()
        self._fh = open(self.path, "wb+")
        self._fh.truncate(announcement["size"])

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

def publish(pack, broker: str, topic: str, username=None, password=None, cafile=None, chunk_size: int = 60_000,
            timeout: float = 60) -> dict:
    """Publish a pack: retained chunks (QoS 1), then the retained announcement, then clear the previous
    pack's chunks. Refuses to announce a pack older than the one the broker already announces.

    >>> publish("demo.pack", "mqtt://127.0.0.1:1883", "ser/packs")["chunks"]    # doctest: +SKIP
    """
    from .packfile import read_manifest

    if not 1 <= int(chunk_size) <= MAX_CHUNK:
        raise ValueError(f"--chunk-size must be 1..{MAX_CHUNK} bytes, got {chunk_size}")
    t0 = time.monotonic()
    deadline = t0 + timeout
    pack_id, manifest = read_manifest(pack)   # a corrupt file never leaves the server
    signed = _is_signed(pack)
    if not signed:
        sys.stderr.write(f"edge-ser: WARNING: {pack} is unsigned; devices will refuse it\n")
    data = Path(pack).read_bytes()
    ann = make_announcement(data, pack_id, int(manifest["sequence"]), int(chunk_size))
    t = topics(topic)
    old = {}
    got_old = threading.Event()

    def on_message(client, userdata, msg):
        if msg.topic == t["announce"] and msg.payload:
            try:
                old.update(parse_announcement(msg.payload))
            except ValueError:
                pass
        got_old.set()

    conn = _Connection(broker, f"edge-ser-pub-{os.getpid()}-{int(t0 * 1000) % 100000}", username, password, cafile,
                       on_message=on_message)
    conn.open(timeout)
    try:
        conn.client.subscribe(t["announce"], qos=1)
        got_old.wait(1.0)               # a retained announcement arrives right after SUBACK
        conn.client.unsubscribe(t["announce"])
        if old and old.get("pack_id") != pack_id and old["sequence"] >= ann["sequence"]:
            raise ValueError(f"the broker already announces pack sequence {old['sequence']} "
                             f">= this pack's {ann['sequence']}; devices would refuse it")
        conn.publish_many(((f"{t['chunks']}/{pack_id}/{i}", data[i * chunk_size:(i + 1) * chunk_size], True)
                           for i in range(ann["chunks"])), deadline)
        conn.publish(t["announce"], json.dumps(ann).encode(), True, deadline)   # only after every chunk is acked
        cleared = 0
        if old and old.get("pack_id") != pack_id:
            n_old = min(int(old["chunks"]), 100_000)
            conn.publish_many(((f"{t['chunks']}/{old['pack_id']}/{i}", b"", True) for i in range(n_old)), deadline)
            cleared = n_old
    finally:
        conn.close()
    return {"ok": True, "pack": str(pack), "pack_id": pack_id, "sequence": ann["sequence"], "bytes": len(data),
            "sha256": ann["sha256"], "chunks": ann["chunks"], "chunk_size": chunk_size, "broker": broker,
            "topic": t["announce"], "signed": signed, "replaced": old.get("pack_id"), "cleared_chunks": cleared,
            "seconds": round(time.monotonic() - t0, 3)}


def _is_signed(path) -> bool:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return "signature.json" in zf.namelist()


# ---------------------------------------------------------------- device side

def device_id() -> str:
    raw = os.environ.get("EDGE_SER_DEVICE_ID") or socket.gethostname() or "device"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:64]


def _log(msg: str) -> None:
    sys.stderr.write(f"edge-ser agent: {msg}\n")
    sys.stderr.flush()


class Agent:
    """The device side: one transfer at a time, bounded queue, verified atomic commits."""

    def __init__(self, broker, topic, store=None, public_key=None, username=None, password=None, cafile=None,
                 train=False, memory_budget_mb=None, threads=None, max_pack_bytes=DEFAULT_MAX_PACK_BYTES,
                 device=None, verbose=True):
        from .packfile import ALLOW_UNSIGNED_ENV, _allow_unsigned_env
        from .signing import default_public_key, load_public_key
        from .store import PackStore

        self.t = topics(topic)
        self.store = PackStore(store)
        self.store.cleanup()
        self.public_key = public_key
        if public_key is not None:
            load_public_key(public_key)     # fail now, not on the first pack
        elif not _allow_unsigned_env() and not default_public_key().exists():
            raise ValueError(f"no public key to verify packs with: pass --public-key or install one at "
                             f"{default_public_key()} (or set {ALLOW_UNSIGNED_ENV}=1 for local experiments only)")
        self.train, self.memory_budget_mb, self.threads = train, memory_budget_mb, threads
        self.max_pack_bytes = max_pack_bytes
        self.device = device or device_id()
        self.status_topic = f"{self.t['status']}/{self.device}"
        self.verbose = verbose
        self.queue: "queue.Queue" = queue.Queue(maxsize=QUEUE_MAX)
        self.queued_bytes = 0
        self._qlock = threading.Lock()
        self.dropped = 0
        self.junk = 0
        self.transfer: Optional[Reassembler] = None
        self.refused = set()
        self.results = []
        cur = self.store.current() or {}
        will = (self.status_topic, json.dumps({"device": self.device, "state": "offline", "pack_id": cur.get("pack_id"),
                                               "sequence": cur.get("sequence")}).encode())
        self.conn = _Connection(broker, f"edge-ser-agent-{self.device}"[:64] + f"-{os.getpid()}", username, password,
                                cafile, on_message=self._on_message, on_connected=self._on_connected, will=will)

    # paho thread -------------------------------------------------
    def _on_connected(self, conn):
        conn.client.subscribe(self.t["announce"], qos=1)
        if self.transfer is not None:
            conn.client.subscribe(f"{self.t['chunks']}/{self.transfer.a['pack_id']}/+", qos=1)
        self.queue_put(("connected", None, None))

    def _on_message(self, client, userdata, msg):
        if len(msg.payload) > max(MAX_ANNOUNCE_BYTES, MAX_CHUNK):
            self.junk += 1
            return
        self.queue_put(("msg", msg.topic, bytes(msg.payload)))

    def queue_put(self, item):
        size = len(item[2] or b"")
        if self.queued_bytes + size > QUEUE_MAX_BYTES:
            self.dropped += 1
            return
        try:
            self.queue.put_nowait(item)
            with self._qlock:
                self.queued_bytes += size
        except queue.Full:
            self.dropped += 1     # retained chunks come back on the stall re-subscribe

    # main thread -------------------------------------------------
    def status(self, state: str, wait: float = 0.0, **extra) -> None:
        """Publish the retained status (QoS 1); ``wait`` seconds for the broker's ack (before a disconnect:
        mosquitto < 2.0.22 drops a client that closes with an unacknowledged publish and then fires its will)."""
        cur = self.store.current() or {}
        body = {"device": self.device, "state": state, "pack_id": cur.get("pack_id"), "sequence": cur.get("sequence"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        body.update(extra)
        if self.verbose:
            _log(f"{state} " + " ".join(f"{k}={v}" for k, v in extra.items()))
        if self.conn.connected.is_set():
            info = self.conn.client.publish(self.status_topic, json.dumps(body, default=str).encode(), qos=1, retain=True)
            if wait > 0:
                try:
                    info.wait_for_publish(timeout=wait)
                except (RuntimeError, ValueError):
                    pass

    def handle(self, topic: str, payload: bytes) -> Optional[dict]:
        """Process one message; returns a result dict when a pack was stored or refused."""
        if topic == self.t["announce"]:
            return self._announce(payload)
        prefix = self.t["chunks"] + "/"
        if topic.startswith(prefix) and self.transfer is not None:
            parts = topic[len(prefix):].split("/")
            if len(parts) != 2 or parts[0] != self.transfer.a["pack_id"] or not parts[1].isdigit():
                self.junk += 1
                return None
            if self.transfer.add(int(parts[1]), payload) == "ok" and self.transfer.complete:
                return self._complete()
        return None

    def _announce(self, payload: bytes) -> Optional[dict]:
        if not payload:
            return None
        try:
            a = parse_announcement(payload, self.max_pack_bytes)
        except ValueError as exc:
            self.junk += 1
            if self.verbose:
                _log(f"ignored announcement: {exc}")
            return None
        cur = self.store.current() or {}
        if a["pack_id"] == cur.get("pack_id"):
            return {"ok": True, "state": "up-to-date", "pack_id": a["pack_id"], "sequence": cur.get("sequence")}
        if a["pack_id"] in self.refused:
            return None
        if a["sequence"] <= self.store.max_sequence():
            self.status("refused", error=f"announced sequence {a['sequence']} is not newer than stored "
                                         f"{self.store.max_sequence()}", refused_pack=a["pack_id"])
            self.refused.add(a["pack_id"])
            return None
        if self.transfer is not None:
            if self.transfer.a["pack_id"] == a["pack_id"]:
                return None
            if self.transfer.a["sequence"] >= a["sequence"]:
                return None
            self._drop_transfer()
        self.transfer = Reassembler(a, self.store.incoming / f"{a['pack_id'][:16]}.part")
        self.status("receiving", incoming=a["pack_id"], incoming_sequence=a["sequence"], chunks=a["chunks"])
        self.conn.client.subscribe(f"{self.t['chunks']}/{a['pack_id']}/+", qos=1)
        return None

    def _drop_transfer(self) -> None:
        if self.transfer is not None:
            self.conn.client.unsubscribe(f"{self.t['chunks']}/{self.transfer.a['pack_id']}/+")
            self.transfer.abort()
            self.transfer = None

    def _complete(self) -> dict:
        from .packfile import load_pack

        r, a = self.transfer, self.transfer.a
        self.conn.client.unsubscribe(f"{self.t['chunks']}/{a['pack_id']}/+")
        self.transfer = None
        try:
            path = r.finish()
            pack = load_pack(path, public_key=self.public_key)
            if pack.pack_id != a["pack_id"]:
                raise ValueError("pack id differs from the announcement")
            if pack.sequence <= self.store.max_sequence():
                raise ValueError(f"pack sequence {pack.sequence} is not newer than stored {self.store.max_sequence()}")
            stored = self.store.commit(path, pack.pack_id, pack.sequence)
        except Exception as exc:
            r.abort()
            self.refused.add(a["pack_id"])
            msg = " ".join(str(exc).split())
            self.status("refused", error=msg, refused_pack=a["pack_id"])
            return {"ok": False, "state": "refused", "pack_id": a["pack_id"], "error": msg}
        result = {"ok": True, "state": "stored", "pack_id": pack.pack_id, "sequence": pack.sequence,
                  "path": str(stored), "bytes": a["size"], "signed": pack.signed, "key_id": pack.key_id,
                  "duplicates": r.duplicates, "rejected_chunks": r.rejected}
        self.status("stored")
        if self.train:
            result["train"] = self._train(stored, pack)
        return result

    def _train(self, path: Path, pack) -> dict:
        out = self.store.root / "models" / f"{pack.sequence}-{pack.pack_id[:16]}"
        try:
            from .local import train_local

            res = train_local(str(path), str(out), memory_budget_mb=self.memory_budget_mb, threads=self.threads,
                              public_key=self.public_key, export=True, progress=False)
        except Exception as exc:
            msg = " ".join(str(exc).split()) or type(exc).__name__
            self.status("train-failed", error=msg)
            return {"ok": False, "error": msg}
        link, tmp = self.store.root / "current-model", self.store.root / f".current-model.{os.getpid()}"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(out, tmp)
            os.replace(tmp, link)
        except OSError:
            pass
        self.status("trained", model=str(out))
        return res if isinstance(res, dict) else {"ok": True}

    def check_stall(self) -> None:
        r = self.transfer
        if r is not None and time.monotonic() - r.last_progress > STALL_SECONDS and self.conn.connected.is_set():
            sub = f"{self.t['chunks']}/{r.a['pack_id']}/+"
            self.conn.client.unsubscribe(sub)
            self.conn.client.subscribe(sub, qos=1)    # retained chunks are delivered again
            r.last_progress = time.monotonic()

    def run(self, once: bool = False, timeout: float = 60, stop: Optional[threading.Event] = None) -> dict:
        self.conn.open(timeout)
        self.status("online")
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                if once and time.monotonic() > deadline:
                    cur = self.store.current() or {}
                    raise TransportError(f"no new pack arrived within {timeout:.0f}s "
                                         f"(current: {cur.get('pack_id', 'none')})")
                try:
                    kind, topic, payload = self.queue.get(timeout=0.5)
                    with self._qlock:
                        self.queued_bytes -= len(payload or b"")
                except queue.Empty:
                    self.check_stall()
                    continue
                if kind != "msg":
                    continue
                result = self.handle(topic, payload)
                if result is None:
                    continue
                self.results.append(result)
                if once and result.get("state") in ("stored", "up-to-date"):
                    return result
        finally:
            if self.transfer is not None:
                self.transfer.abort()
                self.transfer = None
            self.status("offline", wait=2.0)
            self.conn.close()
        return {"ok": True, "state": "stopped", "results": self.results[-10:]}


def run_agent(broker: str, topic: str, store=None, public_key=None, username=None, password=None, cafile=None,
              train: bool = False, once: bool = False, timeout: float = 60, memory_budget_mb=None,
              threads=None) -> dict:
    """Device agent: receive, verify and store packs (and optionally train on each). With ``once`` it
    returns after the first pack is stored (or when the announced pack is already current), and fails
    after ``timeout`` seconds without one; otherwise it runs until SIGTERM / Ctrl-C. ``timeout`` also
    bounds the first connection to the broker.

    >>> run_agent("mqtt://127.0.0.1:1883", "ser/packs", public_key="signing.pub", once=True)  # doctest: +SKIP
    {'ok': True, 'state': 'stored', 'pack_id': '...', ...}
    """
    agent = Agent(broker, topic, store=store, public_key=public_key, username=username, password=password,
                  cafile=cafile, train=train, memory_budget_mb=memory_budget_mb, threads=threads)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        import signal

        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            return agent.run(once=once, timeout=timeout, stop=stop)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return agent.run(once=once, timeout=timeout, stop=stop)
