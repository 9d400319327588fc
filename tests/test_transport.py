"""Delivery over a real mosquitto on 127.0.0.1 (TLS + password): publish, agent, late joiners, duplicate
and reordered chunks, replayed old versions, tampering, broker restart, junk floods, SIGKILL mid-commit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from broker import Broker, free_port, requires_mosquitto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packutil import make_pack

import edge_ser.packfile as P
from edge_ser import transport
from edge_ser.store import PackStore, StoreError

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.mqtt]


@pytest.fixture
def device_id():
    return "dev1"


def build(tmp_path, home, name, sequence, ipc=4, **kw) -> Path:
    return Path(make_pack(tmp_path / name, private_key=home["private_key"], sequence=sequence, ipc=ipc, seed=sequence,
                          **kw)["path"])


class AgentThread:
    """An Agent running in a thread until stopped (or once)."""

    def __init__(self, b: Broker, store, tls=True, once=False, timeout=30, **kw):
        url = b.tls_url if tls else b.url
        self.agent = transport.Agent(url, "ser/packs", store=store, verbose=False, **b.device("dev1", tls), **kw)
        self.stop = threading.Event()
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(once, timeout), daemon=True)
        self.thread.start()

    def _run(self, once, timeout):
        try:
            self.result = self.agent.run(once=once, timeout=timeout, stop=self.stop)
        except Exception as exc:
            self.error = exc

    def wait_for(self, pred, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        raise AssertionError(f"condition not met in {timeout}s; results {self.agent.results} error {self.error}")

    def close(self):
        self.stop.set()
        self.thread.join(15)


def raw(b: Broker, items, tls=False, timeout=20):
    """Publish (topic, payload, retain) items in order with QoS 1, as an attacker or a test would."""
    conn = transport._Connection(b.tls_url if tls else b.url, f"raw-{time.monotonic_ns()}", **b.creds(tls))
    conn.open(timeout)
    try:
        for topic, payload, retain in items:
            conn.publish(topic, payload, retain, time.monotonic() + timeout)
    finally:
        conn.close()


def announcement_and_chunks(path: Path, chunk_size=20_000):
    data = path.read_bytes()
    pack_id, manifest = P.read_manifest(path)
    ann = transport.make_announcement(data, pack_id, manifest["sequence"], chunk_size)
    chunks = [(f"ser/packs/chunks/{pack_id}/{i}", data[i * chunk_size:(i + 1) * chunk_size], True)
              for i in range(ann["chunks"])]
    return ("ser/packs/announce", json.dumps(ann).encode(), True), chunks, ann


def retained(b: Broker, pattern: str, wait=1.0) -> dict:
    got = {}
    conn = transport._Connection(b.url, f"peek-{time.monotonic_ns()}", **b.user("edge-ser-monitor"),
                                 on_message=lambda c, u, m: got.__setitem__(m.topic, bytes(m.payload)))
    conn.open(10)
    conn.client.subscribe(pattern, qos=1)
    time.sleep(wait)
    conn.close()
    return got


# ---------------------------------------------------------------- the whole path

@requires_mosquitto
def test_server_broker_device_tls_password(tmp_path, home, broker):
    pack = build(tmp_path, home, "v1.pack", 100, ipc=30)          # ~1.5 MB: many chunks
    agent = AgentThread(broker, tmp_path / "store", once=True, public_key=home["public_key"])
    time.sleep(0.3)
    pub = transport.publish(pack, broker.tls_url, "ser/packs", chunk_size=60_000, timeout=30, **broker.creds(True))
    assert pub["ok"] and pub["chunks"] == -(-pack.stat().st_size // 60_000) and pub["signed"]
    agent.thread.join(30)
    assert agent.error is None and agent.result["state"] == "stored", (agent.result, agent.error)
    store = PackStore(tmp_path / "store")
    assert store.current()["pack_id"] == pub["pack_id"]
    assert store.current_path().read_bytes() == pack.read_bytes()
    assert (tmp_path / "store" / "current.pack").resolve() == store.current_path().resolve()
    assert P.load_pack(store.current_path(), public_key=home["public_key"]).signed
    status = json.loads(retained(broker, "ser/packs/status/#")["ser/packs/status/dev1"])
    assert status["pack_id"] == pub["pack_id"] and status["state"] in ("stored", "offline")


@requires_mosquitto
def test_cli_publish_and_agent_subprocess(tmp_path, home, broker):
    """The two commands a user types, as separate processes, over mqtts:// with a password."""
    pack = build(tmp_path, home, "v1.pack", 5)
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_SER_MQTT_CAFILE=broker.cafile)
    common = ["--broker", broker.tls_url, "--topic", "ser/packs", "--json", "--timeout", "30"]
    agent = subprocess.Popen([sys.executable, "-m", "edge_ser", "agent", "--once", "--store", str(tmp_path / "s"),
                              "--public-key", home["public_key"]] + common,
                             env=dict(env, EDGE_SER_MQTT_USERNAME="dev1", EDGE_SER_MQTT_PASSWORD=broker.passwords["dev1"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub = subprocess.run([sys.executable, "-m", "edge_ser", "publish", str(pack)] + common,
                         env=dict(env, EDGE_SER_MQTT_USERNAME=broker.username, EDGE_SER_MQTT_PASSWORD=broker.password),
                         capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0, pub.stderr
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["state"] == "stored" and res["pack_id"] == json.loads(pub.stdout.strip().splitlines()[-1])["pack_id"]


@requires_mosquitto
def test_late_joiner_gets_newest_and_old_chunks_cleared(tmp_path, home, broker):
    v1, v2 = build(tmp_path, home, "v1.pack", 100), build(tmp_path, home, "v2.pack", 200)
    creds = broker.creds(True)
    p1 = transport.publish(v1, broker.tls_url, "ser/packs", chunk_size=20_000, **creds)
    p2 = transport.publish(v2, broker.tls_url, "ser/packs", chunk_size=20_000, **creds)
    assert p2["replaced"] == p1["pack_id"] and p2["cleared_chunks"] == p1["chunks"]
    left = retained(broker, "ser/packs/chunks/#")
    assert left and all(p2["pack_id"] in t for t in left)
    with pytest.raises(ValueError, match="already announces pack sequence 200"):
        transport.publish(v1, broker.tls_url, "ser/packs", **creds)
    res = transport.Agent(broker.tls_url, "ser/packs", store=tmp_path / "late", public_key=home["public_key"],
                          verbose=False, **broker.device("dev1", True)).run(once=True, timeout=20)
    assert res["state"] == "stored" and res["pack_id"] == p2["pack_id"] and res["sequence"] == 200
    again = transport.Agent(broker.tls_url, "ser/packs", store=tmp_path / "late", public_key=home["public_key"],
                            verbose=False, **broker.device("dev1", True)).run(once=True, timeout=20)
    assert again["state"] == "up-to-date"


# ---------------------------------------------------------------- faults on the wire

@requires_mosquitto
@pytest.mark.faults
def test_duplicate_reordered_and_bad_chunks(tmp_path, home, broker):
    pack = build(tmp_path, home, "v1.pack", 100)
    ann, chunks, a = announcement_and_chunks(pack, 10_000)
    assert a["chunks"] >= 5
    agent = AgentThread(broker, tmp_path / "store", tls=False, public_key=home["public_key"])
    bad = [(chunks[0][0], b"\0" * len(chunks[0][1]), False), (chunks[1][0], b"short", False)]
    time.sleep(0.3)
    raw(broker, [ann])
    agent.wait_for(lambda: agent.agent.transfer is not None)
    time.sleep(0.5)                                   # the agent's chunk subscription is acknowledged
    raw(broker, bad + chunks[::-1] + chunks[::2] + chunks[:2])
    agent.wait_for(lambda: any(r.get("state") == "stored" for r in agent.agent.results))
    agent.close()
    res = agent.agent.results[-1]
    assert res["pack_id"] == a["pack_id"] and res["rejected_chunks"] >= 1
    assert PackStore(tmp_path / "store").current_path().read_bytes() == pack.read_bytes()


@requires_mosquitto
@pytest.mark.faults
def test_replayed_older_version_and_tampered_pack_refused(tmp_path, home, broker):
    new, old = build(tmp_path, home, "new.pack", 500), build(tmp_path, home, "old.pack", 400)
    agent = AgentThread(broker, tmp_path / "store", tls=False, public_key=home["public_key"])
    transport.publish(new, broker.url, "ser/packs", **broker.creds())
    agent.wait_for(lambda: PackStore(tmp_path / "store").current() is not None)
    # an attacker replays the old (validly signed) pack with a *forged* high announcement sequence:
    # the announcement's signed manifest says 400, so it is junk before a byte is downloaded
    ann, chunks, a = announcement_and_chunks(old)
    forged = json.loads(ann[1])
    forged["sequence"] = 10 ** 15
    junk_before = agent.agent.junk
    raw(broker, chunks + [("ser/packs/announce", json.dumps(forged).encode(), True)])
    agent.wait_for(lambda: agent.agent.junk > junk_before)
    assert agent.agent.transfer is None
    # the honest replay (sequence 400 as signed) is refused as not newer, also before any download
    raw(broker, [ann])
    agent.wait_for(lambda: "not newer" in _status(broker))
    assert agent.agent.transfer is None
    # a tampered pack in transit with consistent transfer hashes: the pack check refuses it
    newer = build(tmp_path, home, "newer.pack", 600)
    bad = bytearray(newer.read_bytes())
    bad[len(bad) // 2] ^= 0x40
    pack_id = P.read_manifest(newer)[0]
    ann2 = transport.make_announcement(bytes(bad), pack_id, 600, 20_000)
    raw(broker, [(f"ser/packs/chunks/{pack_id}/{i}", bytes(bad[i * 20_000:(i + 1) * 20_000]), True)
                 for i in range(ann2["chunks"])] + [("ser/packs/announce", json.dumps(ann2).encode(), True)])
    agent.wait_for(lambda: any(r.get("pack_id") == pack_id for r in agent.agent.results))
    res = [r for r in agent.agent.results if r.get("pack_id") == pack_id][-1]
    assert res["state"] == "refused" and ("SHA-256" in res["error"] or "damaged" in res["error"]
                                          or "corrupt" in res["error"]), res
    # ... and the genuine pack under the same id is not refused for it (refusals are keyed by content)
    transport.publish(newer, broker.url, "ser/packs", **broker.creds())
    agent.wait_for(lambda: (PackStore(tmp_path / "store").current() or {}).get("sequence") == 600)
    agent.close()
    store = PackStore(tmp_path / "store")
    assert P.load_pack(store.current_path(), public_key=home["public_key"]).sequence == 600
    assert list(store.incoming.iterdir()) == []


def _status(b, device="dev1") -> str:
    return retained(b, f"ser/packs/status/{device}", wait=0.3).get(f"ser/packs/status/{device}", b"").decode()


@requires_mosquitto
@pytest.mark.faults
def test_broker_restart_mid_transfer(tmp_path, home, broker):
    pack = build(tmp_path, home, "v1.pack", 100, ipc=10)
    ann, chunks, a = announcement_and_chunks(pack, 10_000)
    half = len(chunks) // 2
    agent = AgentThread(broker, tmp_path / "store", tls=False, public_key=home["public_key"])
    time.sleep(0.3)
    raw(broker, [ann] + chunks[:half])
    agent.wait_for(lambda: agent.agent.transfer is not None and len(agent.agent.transfer.have) >= half)
    broker.restart(down_seconds=1.0)
    raw(broker, chunks[half:], timeout=30)
    agent.wait_for(lambda: any(r.get("state") == "stored" for r in agent.agent.results), timeout=40)
    agent.close()
    assert PackStore(tmp_path / "store").current()["pack_id"] == a["pack_id"]


@requires_mosquitto
@pytest.mark.faults
def test_junk_flood_does_not_stop_delivery(tmp_path, home, broker):
    pack = build(tmp_path, home, "v1.pack", 100)
    agent = AgentThread(broker, tmp_path / "store", tls=False, public_key=home["public_key"])
    time.sleep(0.3)
    junk = [("ser/packs/announce", os.urandom(200), False) for _ in range(300)]
    junk += [("ser/packs/announce", json.dumps({"type": "edge-ser-pack", "size": 10 ** 12}).encode(), False)]
    junk += [(f"ser/packs/chunks/{'ab' * 32}/{i}", os.urandom(1000), False) for i in range(300)]
    raw(broker, junk)
    transport.publish(pack, broker.url, "ser/packs", **broker.creds())
    agent.wait_for(lambda: any(r.get("state") == "stored" for r in agent.agent.results), timeout=40)
    agent.close()
    assert agent.agent.junk >= 300


@requires_mosquitto
@pytest.mark.faults
def test_wrong_credentials_wrong_ca_broker_down(tmp_path, home, broker):
    pack = build(tmp_path, home, "v1.pack", 1)
    with pytest.raises(transport.TransportError, match="refused the connection.*(authori|password)"):
        transport.publish(pack, broker.url, "ser/packs", username=broker.username, password="wrong", timeout=10)
    other_ca = str(__import__("broker").make_ca(tmp_path / "otherca"))
    with pytest.raises(transport.TransportError, match="not trusted"):
        transport.publish(pack, broker.tls_url, "ser/packs", username=broker.username, password=broker.password,
                          cafile=other_ca, timeout=10)
    with pytest.raises(transport.TransportError, match="cannot reach MQTT broker"):
        transport.publish(pack, f"mqtt://127.0.0.1:{free_port()}", "ser/packs", timeout=2)
    with pytest.raises(transport.TransportError, match="cannot reach"):
        transport.run_agent(f"mqtt://127.0.0.1:{free_port()}", "ser/packs", store=tmp_path / "s",
                            public_key=home["public_key"], once=True, timeout=2)


def test_agent_needs_a_public_key(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SER_HOME", str(tmp_path / "nokeys"))
    monkeypatch.delenv(P.ALLOW_UNSIGNED_ENV, raising=False)
    with pytest.raises(ValueError, match="no public key"):
        transport.Agent("mqtt://127.0.0.1:1", "ser/packs", store=tmp_path / "s")


# ---------------------------------------------------------------- atomic store

_KILLER = r"""
import sys, os
sys.path.insert(0, sys.argv[1])
from edge_ser.store import PackStore
store = PackStore(sys.argv[2])
src, seq = sys.argv[3], int(sys.argv[4])
import shutil
while True:
    tmp = store.incoming / "x.part"
    shutil.copyfile(src, tmp)
    store.commit(tmp, "%064x" % seq, seq)
    print(seq, flush=True)
    seq += 1
"""


@pytest.mark.faults
def test_sigkill_mid_commit_keeps_a_good_pack(tmp_path, home):
    """Kill a process that commits packs in a loop at random instants: the store always names a
    complete, verifiable pack afterwards, never a half-written one."""
    good = build(tmp_path, home, "good.pack", 1, ipc=40)          # ~2 MB: a commit takes milliseconds
    store_dir = tmp_path / "store"
    PackStore(store_dir).commit(good, P.read_manifest(good)[0], 1, move=False)
    rng = np.random.default_rng(0)
    seq = 2
    for trial in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _KILLER, str(REPO), str(store_dir), str(good), str(seq)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.4 + float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        seq += len(out.split()) + 2
        store = PackStore(store_dir)
        path = store.current_path()
        assert path.exists() and path.read_bytes() == good.read_bytes(), trial
        assert P.load_pack(path, public_key=home["public_key"]).signed
        store.cleanup()
        assert list(store.incoming.iterdir()) == [] and len(list(store.packs.iterdir())) <= 2


def test_store_rollback_and_sequence_floor(tmp_path, home):
    a, b = build(tmp_path, home, "a.pack", 10), build(tmp_path, home, "b.pack", 20)
    store = PackStore(tmp_path / "store")
    store.commit(a, P.read_manifest(a)[0], 10, move=False)
    store.commit(b, P.read_manifest(b)[0], 20, move=False)
    assert store.current()["sequence"] == 20 and store.previous()["sequence"] == 10
    with pytest.raises(StoreError, match="not newer"):
        store.commit(a, P.read_manifest(a)[0], 10, move=False)
    store.rollback()
    assert store.current()["sequence"] == 10 and store.current_path().read_bytes() == a.read_bytes()
    with pytest.raises(StoreError, match="no previous"):
        store.rollback()
    with pytest.raises(StoreError, match="not newer"):          # the floor stays at the highest ever seen
        store.commit(b, P.read_manifest(b)[0], 20, move=False)


# ---------------------------------------------------------------- reassembler property

@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=1, max_size=3000), chunk=st.integers(1, 700), seed=st.integers(0, 2 ** 32 - 1),
       dups=st.integers(0, 10), junk=st.lists(st.tuples(st.integers(-3, 20), st.binary(max_size=800)), max_size=8))
def test_property_reassembler(tmp_path_factory, data, chunk, seed, dups, junk):
    """Any order, any duplicates, any junk in between: the reassembled file is exactly the original."""
    import hashlib

    ann = transport.make_announcement(data, hashlib.sha256(b"id").hexdigest(), 1, chunk)
    ann = transport.parse_announcement(json.dumps(ann).encode())
    pieces = [(i, data[i * chunk:(i + 1) * chunk]) for i in range(ann["chunks"])]
    rng = np.random.default_rng(seed)
    stream = pieces + [pieces[int(rng.integers(len(pieces)))] for _ in range(dups)] + list(junk)
    order = rng.permutation(len(stream))
    r = transport.Reassembler(ann, tmp_path_factory.mktemp("r") / "x.part")
    for k in order:
        i, payload = stream[k]
        r.add(i, payload)
    assert r.complete
    assert r.finish().read_bytes() == data


@pytest.mark.parametrize("junk", [b"", b"{", b"[]", json.dumps({"type": "edge-ser-pack"}).encode(),
                                  json.dumps({"type": "edge-ser-pack", "pack_id": "a" * 64, "sha256": "b" * 64,
                                              "sequence": 1, "size": 10, "chunks": 1, "chunk_size": 10 ** 6,
                                              "chunk_sha256": ["c" * 64]}).encode()])
def test_parse_announcement_rejects_junk(junk):
    with pytest.raises(ValueError):
        transport.parse_announcement(junk)


@requires_mosquitto
@pytest.mark.faults
def test_agent_sigkilled_mid_transfer_then_recovers(tmp_path, home, broker):
    """SIGKILL the agent process while it receives/commits v2: v1 (or a complete v2) stays in use, no
    half-written pack is ever current, and a restarted agent ends on v2."""
    v1, v2 = build(tmp_path, home, "v1.pack", 100), build(tmp_path, home, "v2.pack", 200, ipc=60)
    store_dir = tmp_path / "store"
    PackStore(store_dir).commit(v1, P.read_manifest(v1)[0], 100, move=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "edge_ser", "agent", "--broker", broker.url, "--topic", "ser/packs",
           "--username", "dev1", "--password", broker.passwords["dev1"], "--store", str(store_dir),
           "--public-key", home["public_key"], "--timeout", "30"]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "online" not in retained(broker, "ser/packs/status/#", wait=0.3).get("ser/packs/status/dev1", b"").decode():
            assert time.monotonic() < deadline and agent.poll() is None
        transport.publish(v2, broker.url, "ser/packs", chunk_size=20_000, **broker.creds())
        time.sleep(0.05)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.communicate()
    store = PackStore(store_dir)
    assert store.current()["sequence"] in (100, 200)
    assert P.load_pack(store.current_path(), public_key=home["public_key"]).sequence == store.current()["sequence"]
    res = transport.Agent(broker.url, "ser/packs", store=store_dir, public_key=home["public_key"], verbose=False,
                          **broker.device("dev1")).run(once=True, timeout=20)
    assert res["state"] in ("stored", "up-to-date") and PackStore(store_dir).current()["sequence"] == 200
    assert list(PackStore(store_dir).incoming.iterdir()) == []



@requires_mosquitto
def test_mqtt_client_streams_results_for_listen(tmp_path, broker):
    """The one MQTT client also serves a stream of results (what `listen --broker` needs): queued without
    waiting, flushed with a bound, over TLS with a CA file and credentials from the environment."""
    got = []
    sub = transport.Client(broker.url, "sub", **broker.user("edge-ser-monitor"),
                           on_message=lambda c, u, m: got.append(bytes(m.payload)))
    sub.open(10)
    sub.client.subscribe("ser/packs/status/#", qos=1)
    time.sleep(0.3)
    env = {"EDGE_SER_MQTT_USERNAME": "dev2", "EDGE_SER_MQTT_PASSWORD": broker.passwords["dev2"],
           "EDGE_SER_MQTT_CAFILE": broker.cafile}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        c = transport.Client(broker.tls_url, "ignored", max_queued=100)
        c.open(10)
        for i in range(25):
            c.publish_nowait("ser/packs/status/dev2", json.dumps({"i": i}).encode())
        assert c.flush(10) == 0
        c.close()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    deadline = time.monotonic() + 5
    while len(got) < 25 and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.close()
    assert [json.loads(g)["i"] for g in got] == list(range(25))
