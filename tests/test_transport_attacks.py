"""Issue 18: nothing on the wire can stop a device from updating. Each attack class is tried, as an
attacker with the publisher's (leaked) password would, against mosquitto running the *shipped* config and
ACL and the real CLI agent; after each one the agent is still running, still on the previous pack, and
stores the next good pack within seconds. Plus the attacks that need no network (forged packs, signed
packs of another deployment or with huge derived sizes, a crash while training, a damaged store, ...).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from broker import Broker, requires_mosquitto
from packutil import make_pack, make_trainable_pack

import edge_ser.packfile as P
from edge_ser import signing, transport
from edge_ser.store import PackStore

REPO = Path(__file__).resolve().parents[1]
NEXT_PACK_SECONDS = 15.0      # "within seconds": the good pack after an attack is stored within this
pytestmark = [pytest.mark.mqtt, pytest.mark.faults]


@pytest.fixture
def device_id():
    return "dev1"


def build(tmp_path, home, name, sequence, deployment="ser/packs", **kw) -> Path:
    return Path(make_pack(tmp_path / name, private_key=home["private_key"], sequence=sequence, seed=sequence % 1000,
                          ipc=3, deployment=deployment, **kw)["path"])


def raw(b: Broker, items, user="edge-ser-server", timeout=20):
    """Publish (topic, payload, retain) items in order, QoS 1, as the attacker (leaked publisher password)."""
    creds = {"username": user, "password": b.passwords[user]}
    conn = transport.Client(b.url, f"attacker-{time.monotonic_ns()}", **creds)
    conn.open(timeout)
    try:
        for topic, payload, retain in items:
            conn.publish(topic, payload, retain, time.monotonic() + timeout)
    finally:
        conn.close()


def status(b: Broker, device="dev1") -> dict:
    got = {}
    conn = transport.Client(b.url, f"peek-{time.monotonic_ns()}", username="edge-ser-monitor",
                            password=b.passwords["edge-ser-monitor"],
                            on_message=lambda c, u, m: got.__setitem__(m.topic, bytes(m.payload)))
    conn.open(10)
    try:
        conn.client.subscribe(f"ser/packs/status/{device}", qos=1)
        time.sleep(0.3)
    finally:
        conn.close()
    try:
        return json.loads(got.get(f"ser/packs/status/{device}", b"{}"))
    except ValueError:
        return {}


def announcement(path: Path, chunk_size=20_000):
    data = path.read_bytes()
    pack_id, manifest = P.read_manifest(path)
    a = transport.make_announcement(data, pack_id, manifest["sequence"], chunk_size)
    chunks = [(f"ser/packs/chunks/{pack_id}/{i}", data[i * chunk_size:(i + 1) * chunk_size], True)
              for i in range(a["chunks"])]
    return a, chunks


def junk_announcement(sequence=10 ** 300, pack_id=None, size=1000, chunk=500, n=None, **extra) -> bytes:
    pack_id = pack_id or hashlib.sha256(os.urandom(8)).hexdigest()
    n = min(-(-size // chunk), 1000) if n is None else n      # the claim may be huge, the test's list is not
    a = {"type": "edge-ser-pack", "v": 1, "pack_id": pack_id, "sequence": sequence, "size": size,
         "sha256": hashlib.sha256(os.urandom(8)).hexdigest(), "chunks": n, "chunk_size": chunk,
         "chunk_sha256": [hashlib.sha256(os.urandom(8)).hexdigest() for _ in range(n)]}
    a.update(extra)
    return json.dumps(a).encode()


class CliAgent:
    """``python -m edge_ser agent`` as a device runs it (user dev1, password from the environment)."""

    def __init__(self, b: Broker, store, public_key, *extra, device="dev1"):
        self.log_path = Path(store).parent / f"agent-{device}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_SER_DEVICE_ID=device, EDGE_SER_MQTT_USERNAME=device,
                   EDGE_SER_MQTT_PASSWORD=b.passwords[device])
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_ser", "agent", "--broker", b.url, "--topic",
                                      "ser/packs", "--store", str(store), "--public-key", str(public_key),
                                      "--timeout", "30", *extra], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.b, self.device = b, device
        self.wait(lambda: "online" in self.text(), 30, "agent online")

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, pred, timeout, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return time.monotonic() - (deadline - timeout)
            assert self.alive(), f"agent exited {self.proc.returncode}: {self.text()[-1500:]}"
            time.sleep(0.05)
        raise AssertionError(f"{what} not met within {timeout}s; agent log: {self.text()[-1500:]}")

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return self.proc.returncode


def current_seq(store_dir):
    try:
        return (PackStore(store_dir).current() or {}).get("sequence")
    except Exception:
        return None


# ---------------------------------------------------------------- the wire attacks

def _nested_json(b, ctx):
    raw(b, [("ser/packs/announce", b"[" * 100_000, True)])          # retained: every (re)start sees it
    raw(b, [("ser/packs/announce", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, False)])


def _active_transfer(b, ctx):
    """The genuine announcement of v2 without its chunks: the agent has a transfer open for v2's id."""
    a, _ = announcement(ctx["v2"])
    raw(b, [("ser/packs/announce", json.dumps(a).encode(), False)])
    time.sleep(0.5)
    return a


def _superscript_index(b, ctx):
    a = _active_transfer(b, ctx)
    raw(b, [(f"ser/packs/chunks/{a['pack_id']}/\u00b2", b"x" * 10, False),     # '²'.isdigit() is True
            (f"ser/packs/chunks/{a['pack_id']}/\u0663", b"x" * 10, False)])    # Arabic-Indic three


def _thousand_digit_index(b, ctx):
    a = _active_transfer(b, ctx)
    raw(b, [(f"ser/packs/chunks/{a['pack_id']}/{'9' * 5000}", b"x" * 10, False),   # int() refuses > 4300 digits
            (f"ser/packs/chunks/{a['pack_id']}/{'1' * 1000}", b"x" * 10, False)])


def _huge_sequence_unsigned(b, ctx):
    raw(b, [("ser/packs/announce", junk_announcement(sequence=10 ** 300), True)])   # pins, and retained


def _huge_numbers(b, ctx):
    raw(b, [("ser/packs/announce", junk_announcement(sequence=int("9" * 4000)), False),
            ("ser/packs/announce", b'{"type": "edge-ser-pack", "sequence": ' + b"9" * 5000 + b"}", False),
            ("ser/packs/announce", junk_announcement(size=10 ** 12, chunk=1, chunks=10 ** 12), False),
            ("ser/packs/announce", json.dumps({"type": "edge-ser-pack", "chunk_sha256": ["0" * 64] * 1500}).encode(), False)])


def _next_id_junk_content(b, ctx):
    """The next pack's id (seen in its chunk topics) with its genuine signed manifest, announced first with
    junk content that reassembles completely: the junk fails verification, the real pack must not."""
    a, _ = announcement(ctx["v2"])
    junk = os.urandom(3000)
    forged = dict(transport.make_announcement(junk, a["pack_id"], a["sequence"], 1000,
                                              manifest=_member(ctx["v2"], "manifest.json"),
                                              signature=_member(ctx["v2"], "signature.json")))
    raw(b, [("ser/packs/announce", json.dumps(forged).encode(), False)])
    time.sleep(0.5)
    raw(b, [(f"ser/packs/chunks/{a['pack_id']}/{i}", junk[i * 1000:(i + 1) * 1000], False) for i in range(3)])
    time.sleep(0.5)


def _next_id_stalled(b, ctx):
    """The next pack's genuine signed manifest with junk file hashes and no chunks: a transfer that can
    never finish. Retained, so the real announcement must pre-empt it."""
    a, _ = announcement(ctx["v2"])
    forged = dict(a, size=10 ** 8, chunk_size=65536, chunks=-(-10 ** 8 // 65536),
                  sha256=hashlib.sha256(b"junk").hexdigest())
    forged["chunk_sha256"] = [forged["sha256"]] * forged["chunks"]
    raw(b, [("ser/packs/announce", json.dumps(forged).encode(), True)])


def _replayed_old_signed(b, ctx):
    a, chunks = announcement(ctx["v0"])                   # a genuine, validly signed, older pack
    raw(b, chunks + [("ser/packs/announce", json.dumps(a).encode(), True)])


def _oversized_and_binary(b, ctx):
    raw(b, [("ser/packs/announce", os.urandom(120_000), False), ("ser/packs/announce", b"\xff\xfe" * 1000, False),
            ("ser/packs/chunks/../../x/0", b"x", False), ("ser/packs/chunks/" + "a" * 64, b"x", False),
            ("ser/packs/announce", b"null", False), ("ser/packs/announce", b'"edge-ser-pack"', False)])


WIRE_ATTACKS = {
    "nested-json": _nested_json,
    "non-ascii-digit-chunk-index": _superscript_index,
    "thousand-digit-chunk-index": _thousand_digit_index,
    "huge-sequence-unsigned-retained": _huge_sequence_unsigned,
    "huge-numbers": _huge_numbers,
    "next-pack-id-with-junk-content": _next_id_junk_content,
    "next-pack-id-stalled-transfer-retained": _next_id_stalled,
    "replayed-older-signed-pack": _replayed_old_signed,
    "oversized-binary-traversal": _oversized_and_binary,
}


def _member(path, name) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


@requires_mosquitto
@pytest.mark.parametrize("attack", list(WIRE_ATTACKS))
def test_wire_attack_agent_survives_and_takes_the_next_pack(tmp_path, home, broker, attack):
    v0, v1, v2 = (build(tmp_path, home, f"v{i}.pack", s) for i, s in enumerate((50, 100, 200)))
    store_dir = tmp_path / "store"
    PackStore(store_dir).commit(v1, P.read_manifest(v1)[0], 100, move=False)
    agent = CliAgent(broker, store_dir, home["public_key"])
    try:
        WIRE_ATTACKS[attack](broker, {"v0": v0, "v1": v1, "v2": v2})
        time.sleep(1.0)
        assert agent.alive(), agent.text()[-1500:]
        assert current_seq(store_dir) == 100                  # still serving the previous pack
        t0 = time.monotonic()
        pub = transport.publish(v2, broker.url, "ser/packs", timeout=30, **broker.creds())   # the publisher survives too
        assert pub["ok"]
        agent.wait(lambda: current_seq(store_dir) == 200, NEXT_PACK_SECONDS, "next good pack stored")
        took = time.monotonic() - t0
        assert agent.alive()
        print(f"\n{attack}: next good pack stored {took:.1f}s after publishing; junk lines "
              f"{agent.text().count('ignored')}")
    finally:
        rc = agent.stop()
    text = agent.text() if not agent.log.closed else agent.log_path.read_text()
    assert rc == 0 and "Traceback" not in text, text[-2000:]
    assert P.load_pack(PackStore(store_dir).current_path(), public_key=home["public_key"]).sequence == 200


@requires_mosquitto
def test_publisher_survives_and_replaces_a_junk_retained_announcement(tmp_path, home, broker):
    """A retained junk announcement (deep JSON; a huge unsigned sequence) neither kills `edge-ser publish`
    nor makes it refuse; a *genuine* newer announcement still makes it refuse an older pack."""
    v1, v2 = build(tmp_path, home, "v1.pack", 100), build(tmp_path, home, "v2.pack", 200)
    raw(broker, [("ser/packs/announce", b"[" * 100_000, True)])
    assert transport.publish(v1, broker.url, "ser/packs", timeout=20, **broker.creds())["ok"]
    raw(broker, [("ser/packs/announce", junk_announcement(sequence=10 ** 300), True)])
    r = transport.publish(v2, broker.url, "ser/packs", timeout=20, **broker.creds())
    assert r["ok"] and any("replaced" in n for n in r["notes"])
    raw(broker, [("ser/packs/announce", junk_announcement(sequence=2 ** 62), True)])   # in range, but unsigned
    r = transport.publish(v2, broker.url, "ser/packs", timeout=20, **broker.creds())
    assert r["ok"] and any("not signed by our key" in n for n in r["notes"])
    with pytest.raises(ValueError, match="already announces pack sequence 200"):
        transport.publish(v1, broker.url, "ser/packs", timeout=20, **broker.creds())


# ---------------------------------------------------------------- packs: signature first, derived sizes capped

def _forged_bomb(path: Path, members: int = 8, member_mb: int = 15) -> Path:
    """A pack whose manifest lists many just-under-cap members of zeros (deflate: ~15 KB each) and whose
    signature is forged."""
    zeros = np.zeros(member_mb * (1 << 20) // 4, np.float32)
    payload = P.npy_bytes(zeros)
    table = {f"theta0/t{i}.npy": {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
                                  "dtype": "<f4", "shape": [len(zeros)]} for i in range(members)}
    manifest = json.dumps({"format": P.FORMAT, "format_version": P.FORMAT_VERSION, "sequence": 10 ** 12,
                           "members": table}).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(P.MANIFEST, manifest)
        zf.writestr(P.SIGNATURE, json.dumps({"algorithm": "ed25519", "key_id": "x",
                                             "signature": base64.b64encode(b"\0" * 64).decode()}))
        for name in table:
            zf.writestr(name, payload)
    return path


def test_forged_pack_is_refused_before_any_member_is_decompressed(tmp_path, home):
    bomb = _forged_bomb(tmp_path / "bomb.pack")
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(P.PackError, match="signature does not verify"):
        P.load_pack(bomb, public_key=home["public_key"])
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20, f"{peak >> 20} MB allocated before the signature was refused"
    assert seconds < 1.0


def test_signed_pack_with_huge_derived_sizes_is_refused_before_allocating(tmp_path, home):
    from edge_ser.schedule import Schedule

    long = make_pack(tmp_path / "epochs.pack", private_key=home["private_key"], sequence=5,
                     schedule=Schedule(lr=0.05, epochs=10 ** 9))
    with pytest.raises(P.PackError, match="epochs"):
        P.load_pack(long["path"], public_key=home["public_key"])
    # stem expansion: (4000, 8, 37) stored floats would expand to (4000, 64, 298): ~305 MB
    from edge_ser.config import FeatureConfig, ModelConfig

    fc = FeatureConfig()
    mc = ModelConfig(num_classes=4, n_mels=fc.n_mels, num_frames=fc.num_frames, channels=(8,), stem_pool=(8, 8))
    Z = np.zeros((4000, fc.n_mels // 8, fc.num_frames // 8), np.float32)
    theta = {"input_norm.mean": np.zeros(fc.n_mels, np.float32), "input_norm.std": np.ones(fc.n_mels, np.float32)}
    stem = P.write_pack(tmp_path / "stem.pack", X=Z, y=np.arange(4000) % 4, classes=("a", "b", "c", "d"),
                        feature_config=fc, model_config=mc, schedule=Schedule(), theta0=theta, golden_inputs=Z[:2],
                        golden_logits=np.zeros((2, 4), np.float32), golden_tolerance=0.1, sequence=6,
                        private_key=home["private_key"], resolution="stem")
    tracemalloc.start()
    with pytest.raises(P.PackError, match="expands to"):
        P.load_pack(stem["path"], public_key=home["public_key"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 << 20


# ---------------------------------------------------------------- deployment identity

@requires_mosquitto
def test_pack_of_another_deployment_is_refused_and_the_floor_stays(tmp_path, home, broker):
    v1 = build(tmp_path, home, "v1.pack", 100)
    other = build(tmp_path, home, "other.pack", 300, deployment="factory/packs")   # signed, newer, elsewhere
    v2 = build(tmp_path, home, "v2.pack", 200)
    store_dir = tmp_path / "store"
    PackStore(store_dir).commit(v1, P.read_manifest(v1)[0], 100, move=False)
    agent = CliAgent(broker, store_dir, home["public_key"])
    try:
        a, chunks = announcement(other)            # published by hand: `publish` itself refuses the wrong topic
        raw(broker, chunks + [("ser/packs/announce", json.dumps(a).encode(), True)])
        agent.wait(lambda: "factory/packs" in json.dumps(status(broker)), 10, "refusal on status")
        store = PackStore(store_dir)
        assert store.current()["sequence"] == 100 and store.max_sequence() == 100
        transport.publish(v2, broker.url, "ser/packs", timeout=30, **broker.creds())
        agent.wait(lambda: current_seq(store_dir) == 200, NEXT_PACK_SECONDS, "next good pack")
    finally:
        assert agent.stop() == 0
    with pytest.raises(ValueError, match="deployment"):
        transport.publish(other, broker.url, "ser/packs", timeout=10, **broker.creds())


def test_deployment_check_rules(tmp_path, home):
    old = P.load_pack(make_pack(tmp_path / "old.pack", private_key=home["private_key"], sequence=1)["path"])
    assert old.deployment is None
    assert "no deployment identity" in P.check_deployment(old.manifest, "ser/packs", "p", configured=False)
    with pytest.raises(P.PackError, match="no deployment identity"):
        P.check_deployment(old.manifest, "ser/packs", "p", configured=True)
    new = P.load_pack(build(tmp_path, home, "new.pack", 2))
    assert new.deployment == {"id": "ser/packs", "classes": list(new.classes), "model": "convnet"}
    assert P.check_deployment(new.manifest, "ser/packs", "p") is None
    with pytest.raises(P.PackError, match="this device serves 'other'"):
        P.check_deployment(new.manifest, "other", "p")


# ---------------------------------------------------------------- training: commit only what was trained

@requires_mosquitto
def test_agent_killed_while_training_resumes_and_builds_the_model(tmp_path, home, broker):
    pack = Path(make_trainable_pack(tmp_path / "t.pack", private_key=home["private_key"], sequence=100)["path"])
    store_dir = tmp_path / "store"
    agent = CliAgent(broker, store_dir, home["public_key"], "--train", "--threads", "1")
    try:
        transport.publish(pack, broker.url, "ser/packs", timeout=30, **broker.creds())
        agent.wait(lambda: "edge-ser agent: training" in agent.text(), 30, "training started")
        agent.proc.send_signal(signal.SIGKILL)          # OOM killer / power loss mid-training
        agent.proc.wait(10)
    finally:
        agent.stop()
    store = PackStore(store_dir)
    assert store.current()["sequence"] == 100
    st = store.state()
    assert st.get("trained") is None and st["training"]["attempts"] == 1   # the truth: stored, not trained
    res = transport.Agent(broker.url, "ser/packs", store=store_dir, public_key=home["public_key"], train=True,
                          threads=1, tflite=False, verbose=False, **broker.device("dev1")).run(once=True, timeout=120)
    assert res["state"] == "trained" and res["train"]["ok"], res
    st = PackStore(store_dir).state()
    assert st["trained"]["pack_id"] == st["current"]["pack_id"] and "training" not in st
    assert (Path(st["trained"]["model"]) / "model.onnx").is_file()
    assert (store_dir / "current-model").resolve() == Path(st["trained"]["model"]).resolve()
    assert status(broker)["model_pack_id"] == st["current"]["pack_id"]


def test_int8_that_disagrees_with_fp32_is_refused_and_listen_uses_fp32(tmp_path):
    from _packlike import make_pack as packlike

    from edge_ser.local import train_from_pack
    from edge_ser.runtime import load_runtime

    out = tmp_path / "model"
    r = train_from_pack(packlike(), out, threads=1, tflite=False, int8_min_agreement=1.01)   # no int8 can pass
    assert r["ok"] and r["int8"] == "refused"
    assert not (out / "model.int8.onnx").exists() and (out / "model.onnx").is_file()
    assert any("model.int8.onnx refused" in w for w in r["warnings"])
    info = json.loads((out / "model.json").read_text())
    assert info["files"]["onnx-int8"]["refused"] is True
    assert load_runtime(out).name == "onnx"          # what `listen model/` runs


# ---------------------------------------------------------------- secure defaults

def test_plain_mqtt_to_another_machine_needs_insecure(tmp_path, home):
    pack = build(tmp_path, home, "p.pack", 1)
    with pytest.raises(transport.TransportError, match="refusing plain-text MQTT"):
        transport.publish(pack, "mqtt://192.0.2.1:1883", "ser/packs", timeout=2)
    with pytest.raises(transport.TransportError, match="refusing plain-text MQTT"):
        transport.Agent("ws://192.0.2.1/mqtt", "ser/packs", store=tmp_path / "s", public_key=home["public_key"])
    with pytest.raises(transport.TransportError, match="cannot reach"):     # opted in: it only tries to connect
        transport.publish(pack, "mqtt://127.0.0.2:9", "ser/packs", timeout=1, insecure=True)
    assert transport.parse_broker_url("broker.example.org:8883").tls          # bare HOST:PORT is TLS
    b = transport.parse_broker_url("wss://h.example/ws")
    assert (b.tls, b.transport, b.port, b.path) == (True, "websockets", 443, "/ws")
    proc = subprocess.run([sys.executable, "-m", "edge_ser", "agent", "--broker", "mqtt://192.0.2.1", "--topic", "t",
                           "--public-key", home["public_key"], "--store", str(tmp_path / "s"), "--json", "--once"],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--insecure" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@requires_mosquitto
def test_a_device_cannot_take_over_another_devices_session(tmp_path, home, broker):
    agent = transport.Agent(broker.url, "ser/packs", store=tmp_path / "s", public_key=home["public_key"],
                            verbose=False, **broker.device("dev1"))
    agent.conn.open(10)
    try:
        agent.conn.disconnected.clear()
        stolen = agent.conn.client._client_id.decode()          # the id the agent asked for (visible on the LAN)
        thief = transport.Client(broker.url, stolen, **broker.device("dev2"))   # dev1's client id, dev2's password
        thief.open(10)
        time.sleep(1.5)
        thief.close()
        assert not agent.conn.disconnected.is_set(), "dev2 kicked dev1 off the broker"
    finally:
        agent.conn.close()


@requires_mosquitto
def test_unsigned_override_cannot_weaken_a_configured_key(tmp_path, home, broker, monkeypatch):
    monkeypatch.setenv(P.ALLOW_UNSIGNED_ENV, "1")
    unsigned = Path(make_pack(tmp_path / "u.pack", sequence=500, deployment="ser/packs")["path"])
    a, chunks = announcement(unsigned)
    agent = transport.Agent(broker.url, "ser/packs", store=tmp_path / "s", public_key=home["public_key"],
                            verbose=False, **broker.device("dev1"))
    raw(broker, chunks + [("ser/packs/announce", json.dumps(a).encode(), True)])
    with pytest.raises(transport.TransportError, match="no new pack"):
        agent.run(once=True, timeout=4)
    assert agent.junk >= 1 and PackStore(tmp_path / "s").current() is None
    with pytest.raises(P.PackError, match="does not override"):
        P.load_pack(unsigned, public_key=home["public_key"])


def test_damaged_state_json_is_recovered_without_lowering_the_floor(tmp_path, home):
    a, b = build(tmp_path, home, "a.pack", 10), build(tmp_path, home, "b.pack", 20)
    store = PackStore(tmp_path / "store")
    store.commit(a, P.read_manifest(a)[0], 10, move=False)
    store.commit(b, P.read_manifest(b)[0], 20, move=False)
    store.rollback()                                  # floor 20, current 10
    store.state_file.write_bytes(b"\0\0garbage{")
    again = PackStore(tmp_path / "store")
    assert again.current()["sequence"] == 10 and again.max_sequence() == 20
    again.state_file.write_bytes(b"[" * 100_000)      # and with the backup damaged too: rebuilt from pack files
    again.backup_file.write_text("{}")
    again.backup_file.write_bytes(b"nope")
    third = PackStore(tmp_path / "store")
    assert third.current()["sequence"] == 10 and third.max_sequence() >= 10
    assert third.current()["pack_id"] == P.read_manifest(a)[0]
    with pytest.raises(Exception, match="not newer"):
        third.commit(a, P.read_manifest(a)[0], 10, move=False)
    # the agent starts on a damaged store instead of stopping
    third.state_file.write_bytes(b"\xff")
    transport.Agent("mqtt://127.0.0.1:1", "ser/packs", store=tmp_path / "store", public_key=home["public_key"])


def test_keygen_force_does_not_follow_planted_symlinks(tmp_path):
    keys = tmp_path / "keys"
    signing.keygen(keys)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("signing.pub", "signing.key", "signing.key.tmp"):
        target = keys / name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(victim)
    signing.keygen(keys, force=True)
    assert victim.read_text() == "precious"
    assert not (keys / "signing.key").is_symlink() and (keys / "signing.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    assert keys.stat().st_mode & 0o777 == 0o700
    fresh = tmp_path / "fresh"
    (fresh).mkdir()
    (fresh / "signing.key").symlink_to(tmp_path / "dangling")       # lexists: refused without --force
    with pytest.raises(ValueError, match="already exists"):
        signing.keygen(fresh)


def test_shipped_units_and_configs_are_tls_and_keep_passwords_off_argv():
    conf = (REPO / "server" / "mosquitto.conf").read_text()
    assert "use_username_as_clientid true" in conf and "allow_anonymous false" in conf
    for f in ("device/edge-ser-agent.service", "server/edge-ser-publish.service", "device/device.toml",
              "server/server.toml", "README.md", "device/README.md", "server/README.md"):
        text = (REPO / f).read_text()
        assert "--password " not in text and "--password=" not in text, f
    for f in ("device/device.toml", "server/server.toml"):
        text = (REPO / f).read_text()
        assert 'broker = "mqtts://' in text and "cafile" in text, f
        from edge_ser.runconfig import load

        assert load(REPO / f, "agent" if f.startswith("device") else "publish")["broker"].startswith("mqtts://")
    for f in ("device/edge-ser-agent.service", "server/edge-ser-publish.service"):
        assert "--config" in (REPO / f).read_text(), f


@requires_mosquitto
def test_agent_and_publish_read_a_config_file_and_password_file(tmp_path, home, broker):
    pw = tmp_path / "pw"
    pw.write_text(broker.passwords["dev1"] + "\n")
    pw.chmod(0o600)
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'[mqtt]\nbroker = "{broker.tls_url}"\ntopic = "ser/packs"\nusername = "dev1"\n'
                   f'cafile = "{broker.cafile}"\npassword_file = "{pw}"\ntimeout = 30\n\n'
                   f'[agent]\nstore = "{tmp_path / "store"}"\npublic_key = "{home["public_key"]}"\n'
                   f'deployment = "ser/packs"\n')
    pcfg = tmp_path / "server.toml"
    ppw = tmp_path / "ppw"
    ppw.write_text(broker.password)
    ppw.chmod(0o600)
    pack = build(tmp_path, home, "p.pack", 7)
    pcfg.write_text(f'[mqtt]\nbroker = "{broker.tls_url}"\ntopic = "ser/packs"\nusername = "{broker.username}"\n'
                    f'cafile = "{broker.cafile}"\npassword_file = "{ppw}"\n\n[publish]\npack = "{pack}"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EDGE_SER_MQTT_PASSWORD", None)
    agent = subprocess.Popen([sys.executable, "-m", "edge_ser", "agent", "--config", str(cfg), "--once", "--json"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pub = subprocess.run([sys.executable, "-m", "edge_ser", "publish", "--config", str(pcfg), "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0, pub.stderr
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["state"] == "stored"
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nbrokr = "x"\n')
    proc = subprocess.run([sys.executable, "-m", "edge_ser", "agent", "--config", str(bad)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown key 'brokr'" in proc.stderr and "broker" in proc.stderr


# ---------------------------------------------------------------- the handler itself, fuzzed (no broker needed)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NASTY = [b"[" * 100_000, b'{"a":' * 20_000 + b"}" * 20_000, b"9" * 5000, b'{"type": "edge-ser-pack", "sequence": 1e999}',
          b'{"type": "edge-ser-pack", "sequence": ' + b"9" * 4000 + b"}", b"\xff" * 100, b"", b"null", b"[]",
          junk_announcement(sequence=10 ** 300), junk_announcement(sequence=-1), junk_announcement(size=10 ** 12, chunk=1),
          junk_announcement(manifest="!!!"), junk_announcement(manifest=base64.b64encode(b"{}").decode()),
          junk_announcement(manifest=123), junk_announcement(v=[[[[]]]])]
_TOPICS = st.sampled_from(["ser/packs/announce", "ser/packs/chunks/" + "a" * 64 + "/0", "ser/packs/chunks/x/\u00b2",
                           "ser/packs/chunks/" + "a" * 64 + "/" + "9" * 5000, "ser/packs/status/dev2", "other/topic",
                           "ser/packs/chunks//", "ser/packs/chunks/" + "a" * 64 + "/\u0663"])


@pytest.fixture(scope="module")
def offline_agent(tmp_path_factory):
    """An Agent that is never connected (status publishes are skipped), for feeding messages directly."""
    home = tmp_path_factory.mktemp("home")
    keys = signing.keygen(home)
    return transport.Agent("mqtt://127.0.0.1:1", "ser/packs", store=home / "store", public_key=keys["public_key"],
                           verbose=False)


@pytest.mark.parametrize("payload", _NASTY, ids=range(len(_NASTY)))
def test_handler_survives_each_nasty_payload(offline_agent, payload):
    errors = offline_agent.errors
    for topic in ("ser/packs/announce", "ser/packs/chunks/" + "a" * 64 + "/\u00b2"):
        assert offline_agent.handle(topic, payload) is None
    assert offline_agent.transfer is None              # nothing unsigned starts a transfer
    assert offline_agent.errors == errors              # parsed as junk, not caught by the last-resort handler


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(topic=_TOPICS, payload=st.one_of(st.binary(max_size=2000), st.sampled_from(_NASTY),
                                        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                                     max_leaves=30).map(lambda v: json.dumps({"type": "edge-ser-pack", "x": v}).encode())))
def test_property_handler_never_raises(offline_agent, topic, payload):
    errors = offline_agent.errors
    offline_agent.handle(topic, payload)
    assert offline_agent.errors == errors               # every payload is judged by the parser, none by accident
