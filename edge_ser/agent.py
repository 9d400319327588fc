"""The device agent (``edge-ser agent``): receive packs over MQTT, verify, store atomically, train.

Nothing on the wire can stop a device from updating:

* every message handler survives any payload (bounded parsing, junk is counted and logged, nothing raises
  out of the loop);
* an announcement is a hint: its signed manifest is verified (signature, sequence above the rollback floor,
  deployment identity) before a transfer starts; a transfer that makes no progress times out; a newer signed
  announcement pre-empts, an equal one only replaces a transfer that is stuck; refusals are keyed by the
  announced *content* (whole-file SHA-256) and expire, so junk announced under a real pack's id never gets the
  real pack refused;
* a pack is committed only after the whole file verifies; with ``train`` the store records which pack the
  installed model was trained from, and an agent that died while training resumes on start.

>>> run_agent("mqtts://broker:8883", "ser/packs", public_key="signing.pub", once=True)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import queue
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from .chunks import DEFAULT_MAX_PACK_BYTES, MAX_ANNOUNCE_BYTES, MAX_CHUNK, Reassembler, chunk_index, parse_announcement
from .mqtt import Client, TransportError, topics

STALL_SECONDS = 5.0          # no chunk for this long: re-subscribe (retained chunks come again)
TRANSFER_TIMEOUT = 30.0      # no chunk for this long while connected: give the transfer up
SWITCH_SECONDS = 2.0         # a transfer this long without progress yields to another announcement of the same pack
REFUSE_TTL = 600.0           # a refused content hash is ignored this long, then tried again if announced
TIMEOUT_TTL = 60.0           # ... and a timed-out one this long
MAX_PENDING = 8              # announcements kept as fallbacks while a transfer runs
MAX_REFUSED = 1024
MAX_TRAIN_ATTEMPTS = 3       # a pack whose training kills the agent this often is not retried at start
QUEUE_MAX = 512
QUEUE_MAX_BYTES = 16 << 20


def device_id() -> str:
    raw = os.environ.get("EDGE_SER_DEVICE_ID") or socket.gethostname() or "device"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:64]


def _log(msg: str) -> None:
    sys.stderr.write(f"edge-ser agent: {msg}\n")
    sys.stderr.flush()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]


class Agent:
    """The device side: one transfer at a time, bounded queue, verified atomic commits."""

    def __init__(self, broker, topic, store=None, public_key=None, username=None, password=None, cafile=None,
                 train=False, memory_budget_mb=None, threads=None, max_pack_bytes=DEFAULT_MAX_PACK_BYTES,
                 device=None, verbose=True, insecure=False, deployment=None, transfer_timeout=TRANSFER_TIMEOUT,
                 stall_seconds=STALL_SECONDS, tflite=True):
        from .packfile import ALLOW_UNSIGNED_ENV, _allow_unsigned_env, resolve_public_key
        from .signing import default_public_key
        from .store import PackStore

        self.t = topics(topic)
        self.topic = topic.strip().rstrip("/")
        self.store = PackStore(store)
        self.store.cleanup()
        self.key = resolve_public_key(public_key)     # fail now, not on the first pack
        self.public_key = self.key
        if self.key is None and not _allow_unsigned_env():
            raise ValueError(f"no public key to verify packs with: pass --public-key or install one at "
                             f"{default_public_key()} (or set {ALLOW_UNSIGNED_ENV}=1 for local experiments only)")
        # the signed deployment id a pack must carry: --deployment, else the topic prefix
        self.deployment_configured = deployment is not None
        self.deployment = str(deployment).strip().rstrip("/") if deployment is not None else self.topic
        self.train, self.memory_budget_mb, self.threads, self.tflite = train, memory_budget_mb, threads, tflite
        self.max_pack_bytes = max_pack_bytes
        self.transfer_timeout, self.stall_seconds = float(transfer_timeout), float(stall_seconds)
        self.device = device or device_id()
        self.status_topic = f"{self.t['status']}/{self.device}"
        self.verbose = verbose
        self.queue: "queue.Queue" = queue.Queue(maxsize=QUEUE_MAX)
        self.queued_bytes = 0
        self._qlock = threading.Lock()
        self.dropped = 0
        self.junk = 0
        self.errors = 0
        self.local_errors = 0          # OSErrors of this device (disk full, ...), not of the messages
        self.last_error: Optional[str] = None
        self.transfer: Optional[Reassembler] = None
        self._resubscribed = 0.0
        self.pending: "OrderedDict[str, dict]" = OrderedDict()
        self._tried: dict = {}                                        # transfer key -> when it last started
        self._verified: "OrderedDict[tuple, tuple]" = OrderedDict()   # (pack id, signature) -> (manifest, signed)
        self.refused: "OrderedDict[str, float]" = OrderedDict()      # transfer key / "file:"sha256 -> expiry
        self._said_refused: "OrderedDict[str, bool]" = OrderedDict()  # pack ids whose refusal is already on status
        self.results = []
        cur = self.store.current() or {}
        will = (self.status_topic, json.dumps({"device": self.device, "state": "offline", "pack_id": cur.get("pack_id"),
                                               "sequence": cur.get("sequence")}).encode())
        self.conn = Client(broker, f"edge-ser-agent-{self.device}"[:64] + f"-{os.getpid()}", username, password,
                           cafile, on_message=self._on_message, on_connected=self._on_connected, will=will,
                           insecure=insecure)

    # paho thread -------------------------------------------------
    def _on_connected(self, conn):
        conn.client.subscribe(self.t["announce"], qos=1)
        if self.transfer is not None:
            conn.client.subscribe(f"{self.t['chunks']}/{self.transfer.a['pack_id']}/+", qos=1)
        self.queue_put(("connected", None, None))

    def _on_message(self, client, userdata, msg):
        if len(msg.payload) > max(MAX_ANNOUNCE_BYTES, MAX_CHUNK) or len(msg.topic) > 512:
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
        try:
            st = self.store.state()
        except Exception:
            st = {}
        cur = st.get("current") or {}
        trained = st.get("trained") or {}
        body = {"device": self.device, "state": state, "pack_id": cur.get("pack_id"), "sequence": cur.get("sequence"),
                "model_pack_id": trained.get("pack_id"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        extra = {k: v for k, v in extra.items() if v is not None}
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

    def _junk(self, what: str) -> None:
        self.junk += 1
        if self.verbose:
            _log(what[:300])

    def handle(self, topic: str, payload: bytes) -> Optional[dict]:
        """Process one message; returns a result dict when a pack was stored or refused. Never raises:
        whatever a message does to the handler is counted and logged, and the loop goes on."""
        try:
            return self._handle(topic, payload)
        except OSError as exc:     # the device's own trouble (disk full, ...): said once, the agent goes on
            self.errors += 1
            self.local_errors += 1
            self.last_error = _one_line(exc, 200)
            self.status("error", error=self.last_error)
            return None
        except Exception as exc:   # noqa: BLE001  (a hostile payload must not end the agent)
            self.errors += 1
            self._junk(f"ignored message on {str(topic)[:80]}: {type(exc).__name__}: {_one_line(exc, 160)}")
            return None

    def _handle(self, topic: str, payload: bytes) -> Optional[dict]:
        if topic == self.t["announce"]:
            return self._announce(payload)
        prefix = self.t["chunks"] + "/"
        if topic.startswith(prefix) and self.transfer is not None:
            parts = topic[len(prefix):].split("/")
            index = chunk_index(parts[1]) if len(parts) == 2 else None
            if len(parts) != 2 or parts[0] != self.transfer.a["pack_id"] or index is None:
                self.junk += 1
                return None
            if self.transfer.add(index, payload) == "ok" and self.transfer.complete:
                return self._complete()
        return None

    # refusals are keyed by content and expire --------------------
    def _refuse(self, key: str, ttl: float = REFUSE_TTL) -> None:
        self.refused.pop(key, None)
        self.refused[key] = time.monotonic() + ttl
        while len(self.refused) > MAX_REFUSED:
            self.refused.popitem(last=False)

    def is_refused(self, key: str) -> bool:
        until = self.refused.get(key)
        if until is None:
            return False
        if time.monotonic() > until:
            del self.refused[key]
            return False
        return True

    def _say_refused_once(self, a: dict, error: str) -> None:
        """A refusal of a *signed* announcement goes to the status topic once per pack id."""
        if a["pack_id"] in self._said_refused:
            return
        self._said_refused[a["pack_id"]] = True
        while len(self._said_refused) > MAX_REFUSED:
            self._said_refused.popitem(last=False)
        self.status("refused", error=error, refused_pack=a["pack_id"])

    def _check_announcement(self, a: dict) -> bool:
        """Signature, deployment and sequence of an announcement, from its signed manifest, before any
        download. True when a transfer may start."""
        from .packfile import PackError, check_deployment, verify_manifest

        if a["manifest"] is None:
            if self.key is not None:
                self._junk("ignored announcement: it carries no signed manifest (publisher older than this agent?)")
                return False
            manifest, signed = None, False          # unsigned packs allowed and no key: a bare hint
        else:
            cache = (a["pack_id"], a["signature"])        # replays of one announcement are verified once
            try:
                if cache in self._verified:
                    manifest, signed = self._verified[cache]
                else:
                    manifest, signed, _ = verify_manifest(a["manifest"], a["signature"],
                                                          f"announced pack {a['pack_id'][:16]}", public_key=self.key)
                    self._verified[cache] = (manifest, signed)
                    while len(self._verified) > 32:
                        self._verified.popitem(last=False)
            except (PackError, ValueError, OSError) as exc:
                self._junk(f"ignored announcement: {_one_line(exc, 200)}")
                return False
            if manifest["sequence"] != a["sequence"]:
                self._junk("ignored announcement: its sequence differs from its signed manifest's")
                return False
            try:
                warning = check_deployment(manifest, self.deployment, f"announced pack {a['pack_id'][:16]}",
                                           configured=self.deployment_configured)
            except PackError as exc:
                if signed:
                    self._say_refused_once(a, _one_line(exc))
                else:
                    self._junk(f"ignored announcement: {_one_line(exc, 200)}")
                return False
            if warning and self.verbose:
                _log(f"warning: {warning}")
        floor = self.store.max_sequence()
        if a["sequence"] <= floor:
            if signed:
                self._say_refused_once(a, f"announced sequence {a['sequence']} is not newer than stored {floor}")
            return False
        return True

    def _announce(self, payload: bytes) -> Optional[dict]:
        if not payload:
            return None            # a cleared retained announcement
        try:
            a = parse_announcement(payload, self.max_pack_bytes)
        except ValueError as exc:
            self._junk(f"ignored announcement: {exc}")
            return None
        cur = self.store.current() or {}
        if a["pack_id"] == cur.get("pack_id"):
            if self.train and not self.model_is_current():
                return self._resume_training()
            return {"ok": True, "state": "up-to-date", "pack_id": a["pack_id"], "sequence": cur.get("sequence")}
        if self.is_refused(a["key"]) or self.is_refused("file:" + a["sha256"]):
            return None
        if self.transfer is not None and self.transfer.key == a["key"]:
            return None            # the same transfer again
        if a["key"] in self.pending:
            if a["sequence"] <= self.store.max_sequence():
                del self.pending[a["key"]]
            else:
                self._offer(self.pending[a["key"]])    # announced again (the publisher, after a copy): judged anew
            return None
        if not self._check_announcement(a):
            return None
        self._offer(a)
        return None

    def _offer(self, a: dict) -> None:
        """Start ``a`` now or keep it as a fallback: a signed newer sequence pre-empts the running transfer;
        the same sequence with other content replaces it only when it is stuck; anything else waits."""
        r = self.transfer
        now = time.monotonic()
        if r is None:
            self._start(a)
        elif a["sequence"] > r.a["sequence"]:
            self._keep_pending(r.a)
            self._drop_transfer()
            self._start(a)
        elif a["sequence"] == r.a["sequence"] and now - r.last_progress > SWITCH_SECONDS:
            # (a transfer only just started is given SWITCH_SECONDS to show progress: a junk copy arriving
            # right after the genuine announcement must not knock it out)
            self._keep_pending(r.a)
            self._drop_transfer()
            self._start(a)
        else:
            self._keep_pending(a)

    def _keep_pending(self, a: dict) -> None:
        self.pending.pop(a["key"], None)
        self.pending[a["key"]] = a
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)

    def _start(self, a: dict) -> None:
        self.pending.pop(a["key"], None)
        self._tried[a["key"]] = time.monotonic()
        self.transfer = Reassembler(a, self.store.incoming / f"{a['key'][:16]}.part")
        self._resubscribed = time.monotonic()
        self.status("receiving", incoming=a["pack_id"], incoming_sequence=a["sequence"], chunks=a["chunks"])
        self.conn.client.subscribe(f"{self.t['chunks']}/{a['pack_id']}/+", qos=1)

    def _next(self) -> None:
        """After a transfer ends: the best fallback still worth trying (newest sequence, latest announced)."""
        floor = self.store.max_sequence()
        cur = (self.store.current() or {}).get("pack_id")
        live = [a for k, a in self.pending.items()
                if a["sequence"] > floor and a["pack_id"] != cur and not self.is_refused(k)
                and not self.is_refused("file:" + a["sha256"])]
        self.pending = OrderedDict((a["key"], a) for a in live)
        running = self.transfer.key if self.transfer is not None else None
        for k in [k for k in self._tried if k not in self.pending and k != running]:
            del self._tried[k]
        if live and self.transfer is None:
            # newest sequence first; among equals the one tried least recently (never tried: first), so a
            # stuck junk candidate and the genuine one take turns instead of the junk winning every time
            best = max(enumerate(live), key=lambda ia: (ia[1]["sequence"], -self._tried.get(ia[1]["key"], 0.0), ia[0]))[1]
            self._start(best)

    def _drop_transfer(self) -> None:
        if self.transfer is not None:
            try:
                self.conn.client.unsubscribe(f"{self.t['chunks']}/{self.transfer.a['pack_id']}/+")
            finally:
                self.transfer.abort()
                self.transfer = None

    def _complete(self) -> dict:
        from .inspection import privacy_line
        from .packfile import check_deployment, load_pack

        r, a = self.transfer, self.transfer.a
        self.conn.client.unsubscribe(f"{self.t['chunks']}/{a['pack_id']}/+")
        self.transfer = None
        whole = False
        try:
            path = r.finish()
            whole = True            # the bytes are exactly the announced file: judging them judges that file
            pack = load_pack(path, public_key=self.key)
            if pack.pack_id != a["pack_id"]:
                raise ValueError("pack id differs from the announcement")
            check_deployment(pack.manifest, self.deployment, "pack", configured=self.deployment_configured)
            if pack.sequence <= self.store.max_sequence():
                raise ValueError(f"pack sequence {pack.sequence} is not newer than stored {self.store.max_sequence()}")
            stored = self.store.commit(path, pack.pack_id, pack.sequence)
        except Exception as exc:
            r.abort()
            self._refuse(r.key)
            if whole:
                self._refuse("file:" + a["sha256"])  # these bytes are bad however they are chunked
            msg = _one_line(exc)
            self.status("refused", error=msg, refused_pack=a["pack_id"])
            self._next()
            return {"ok": False, "state": "refused", "pack_id": a["pack_id"], "error": msg}
        result = {"ok": True, "state": "stored", "pack_id": pack.pack_id, "sequence": pack.sequence,
                  "path": str(stored), "bytes": a["size"], "signed": pack.signed, "key_id": pack.key_id,
                  "duplicates": r.duplicates, "rejected_chunks": r.rejected,
                  "privacy": privacy_line(pack.provenance)}
        if self.verbose:
            _log(f"privacy: {result['privacy']}")
        self.status("stored", trained=False if self.train else None, privacy=result["privacy"])
        if self.train:
            result["train"] = self._train(pack)
        self._next()
        return result

    # training: the store records which pack the model was built from -----------
    def model_is_current(self) -> bool:
        st = self.store.state()
        cur, trained = st.get("current") or {}, st.get("trained") or {}
        return bool(cur) and trained.get("pack_id") == cur.get("pack_id") and Path(trained.get("model", "")).is_dir()

    def _resume_training(self) -> Optional[dict]:
        """The current pack has no model (the agent died while training, or training was just enabled)."""
        from .packfile import load_pack

        st = self.store.state()
        cur = st.get("current") or {}
        attempt = st.get("training") or {}
        if attempt.get("pack_id") == cur.get("pack_id") and int(attempt.get("attempts", 0)) >= MAX_TRAIN_ATTEMPTS:
            return {"ok": False, "state": "train-failed", "pack_id": cur.get("pack_id"),
                    "error": f"training this pack was interrupted {attempt.get('attempts')} times; not retried "
                             "until a new pack arrives"}
        try:
            pack = load_pack(self.store.current_path(), public_key=self.key)
        except Exception as exc:
            msg = _one_line(exc)
            self.status("train-failed", error=msg)
            return {"ok": False, "state": "train-failed", "pack_id": cur.get("pack_id"), "error": msg}
        if self.verbose:
            _log(f"resuming training of the current pack {pack.pack_id[:16]} (no model was built from it)")
        res = self._train(pack)
        return {"ok": bool(res.get("ok")), "state": "trained" if res.get("ok") else "train-failed",
                "pack_id": pack.pack_id, "sequence": pack.sequence, "train": res}

    def _train(self, pack) -> dict:
        out = self.store.root / "models" / f"{pack.sequence}-{pack.pack_id[:16]}"
        self.store.note_training(pack.pack_id)        # counted before: a kill during training is remembered
        self.status("training", incoming=pack.pack_id)
        try:
            from .local import train_from_pack

            res = train_from_pack(pack, str(out), memory_budget_mb=self.memory_budget_mb, threads=self.threads,
                                  export=True, progress=False, tflite=self.tflite)
        except Exception as exc:
            msg = _one_line(exc)
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
        self.store.mark_trained(pack.pack_id, out)
        self.status("trained", model=str(out), int8=res.get("int8") if isinstance(res, dict) else None)
        return res if isinstance(res, dict) else {"ok": True}

    def check_stall(self) -> None:
        """Re-subscribe a transfer that stalls; give it up (and try a fallback) when it stays stuck."""
        r = self.transfer
        if r is None or not self.conn.connected.is_set():
            return
        now = time.monotonic()
        idle = now - max(r.last_progress, self._connected_at)
        if idle > self.transfer_timeout:
            self._refuse(r.key, TIMEOUT_TTL)
            a = r.a
            self._drop_transfer()
            self.status("refused", error=f"transfer of {a['pack_id'][:16]} made no progress for "
                                         f"{self.transfer_timeout:.0f}s; given up", refused_pack=a["pack_id"])
            self._next()
        elif (self.pending and max(a["sequence"] for a in self.pending.values()) >= r.a["sequence"]
              and ((not r.have and now - r.started > SWITCH_SECONDS) or idle > self.stall_seconds)):
            # stuck (from the start, or part-way) while other announcements of this pack or a newer one wait:
            # let them take turns (least recently tried first)
            self._keep_pending(r.a)
            self._drop_transfer()
            self._next()
        elif idle > self.stall_seconds and now - self._resubscribed > self.stall_seconds:
            sub = f"{self.t['chunks']}/{r.a['pack_id']}/+"
            self.conn.client.unsubscribe(sub)
            self.conn.client.subscribe(sub, qos=1)    # retained chunks are delivered again
            self._resubscribed = now

    _connected_at = 0.0

    def run(self, once: bool = False, timeout: float = 60, stop: Optional[threading.Event] = None) -> dict:
        self.conn.open(timeout)
        self._connected_at = time.monotonic()
        self.status("online")
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        try:
            if self.train and self.store.current() and not self.model_is_current():
                result = self._resume_training()
                if result is not None:
                    self.results.append(result)
                    if once and result.get("state") == "trained":
                        return result
            while not stop.is_set():
                if once and time.monotonic() > deadline:
                    cur = self.store.current() or {}
                    last = f"; last error: {self.last_error}" if self.last_error else ""
                    raise TransportError(f"no new pack arrived within {timeout:.0f}s "
                                         f"(current: {cur.get('pack_id', 'none')}){last}")
                try:
                    kind, topic, payload = self.queue.get(timeout=0.5)
                    with self._qlock:
                        self.queued_bytes -= len(payload or b"")
                except queue.Empty:
                    self._safe(self.check_stall)
                    continue
                if kind == "connected":
                    self._connected_at = time.monotonic()
                    continue
                if kind != "msg":
                    continue
                local = self.local_errors
                result = self.handle(topic, payload)
                if once and self.local_errors > local:
                    # --once: the device's own failure (disk full, ...) ends the run with its cause, now
                    raise TransportError(f"could not take the pack: {self.last_error}")
                self._safe(self.check_stall)
                if result is None:
                    continue
                self.results.append(result)
                del self.results[:-100]
                if once and result.get("state") in ("stored", "up-to-date", "trained"):
                    return result
        finally:
            if self.transfer is not None:
                self.transfer.abort()
                self.transfer = None
            self.status("offline", wait=2.0)
            self.conn.close()
        return {"ok": True, "state": "stopped", "results": self.results[-10:], "junk": self.junk}

    def _safe(self, fn) -> None:
        try:
            fn()
        except Exception as exc:   # noqa: BLE001  (the loop outlives any single failure)
            self.errors += 1
            if self.verbose:
                _log(f"error: {type(exc).__name__}: {_one_line(exc, 200)}")


def run_agent(broker: str, topic: str, store=None, public_key=None, username=None, password=None, cafile=None,
              train: bool = False, once: bool = False, timeout: float = 60, memory_budget_mb=None,
              threads=None, insecure: bool = False, deployment=None) -> dict:
    """Device agent: receive, verify and store packs (and optionally train on each). With ``once`` it
    returns after the first pack is stored (or when the announced pack is already current), and fails
    after ``timeout`` seconds without one; otherwise it runs until SIGTERM / Ctrl-C. ``timeout`` also
    bounds the first connection to the broker.

    >>> run_agent("mqtt://127.0.0.1:1883", "ser/packs", public_key="signing.pub", once=True)  # doctest: +SKIP
    {'ok': True, 'state': 'stored', 'pack_id': '...', ...}
    """
    agent = Agent(broker, topic, store=store, public_key=public_key, username=username, password=password,
                  cafile=cafile, train=train, memory_budget_mb=memory_budget_mb, threads=threads, insecure=insecure,
                  deployment=deployment)
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
