"""Soak test of pack delivery (issue 8): 200 versions in a row over a real mosquitto with random
restarts; the agent must end on the newest verified pack with no leaked files or descriptors.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from broker import requires_mosquitto
from packutil import make_pack
from test_transport import AgentThread, device_id  # noqa: F401  (its device id fixture)

import edge_ser.packfile as P
from edge_ser import transport
from edge_ser.store import PackStore

pytestmark = [pytest.mark.mqtt]

@requires_mosquitto
@pytest.mark.faults
@pytest.mark.slow
def test_soak_200_versions_with_broker_restarts(tmp_path, home, broker):
    """200 pack versions in a row over loopback with random broker restarts: the agent ends on the
    newest, verified, with no leaked files or file descriptors."""
    from edge_ser.config import FeatureConfig

    tiny = FeatureConfig(n_mels=8, clip_seconds=0.05, f_max=4000.0)
    packs = [Path(make_pack(tmp_path / "packs" / f"{i}.pack", private_key=home["private_key"], sequence=1000 + i,
                            seed=i, fc=tiny, ipc=1, provenance={}, golden_inputs=np.zeros((1, 8, 3), np.float32),
                            golden_logits=np.zeros((1, 4), np.float32))["path"]) for i in range(200)]
    fds_before = len(os.listdir("/proc/self/fd"))
    agent = AgentThread(broker, tmp_path / "store", tls=False, public_key=home["public_key"])
    rng = np.random.default_rng(1)
    restarts = 0
    for pack in packs:
        if rng.random() < 0.03:
            broker.restart()
            restarts += 1
        transport.publish(pack, broker.url, "ser/packs", timeout=30, **broker.creds())
    newest = P.read_manifest(packs[-1])[0]
    agent.wait_for(lambda: (PackStore(tmp_path / "store").current() or {}).get("pack_id") == newest, timeout=60)
    agent.close()
    assert restarts >= 1
    store = PackStore(tmp_path / "store")
    assert P.load_pack(store.current_path(), public_key=home["public_key"]).sequence == 1199
    assert list(store.incoming.iterdir()) == [] and len(list(store.packs.iterdir())) <= 2
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    stored = [r for r in agent.agent.results if r.get("state") == "stored"]
    assert stored and all(a["sequence"] < b["sequence"] for a, b in zip(stored, stored[1:]))


@requires_mosquitto
@pytest.mark.faults
def test_soak_good_packs_interleaved_with_every_junk_class(tmp_path, home, broker):
    """Issue 18: >= 200 messages on the pack topics, good packs interleaved with every junk class (as an
    attacker with a leaked publishing password sends them), against the real CLI agent: it ends on the
    newest good pack, stores every good pack within seconds, never dies, and its peak RSS stays bounded."""
    import hashlib
    import json
    import time
    import zipfile

    from test_transport_attacks import CliAgent, _forged_bomb, announcement, junk_announcement

    from edge_ser.config import FeatureConfig

    tiny = FeatureConfig(n_mels=8, clip_seconds=0.05, f_max=4000.0)
    rounds = 15

    def member(path, name):
        with zipfile.ZipFile(path) as zf:
            return zf.read(name)

    def tiny_pack(name, seq, deployment="ser/packs"):
        return Path(make_pack(tmp_path / "packs" / name, private_key=home["private_key"], sequence=seq, seed=seq % 97,
                              fc=tiny, ipc=1, deployment=deployment, golden_inputs=np.zeros((1, 8, 3), np.float32),
                              golden_logits=np.zeros((1, 4), np.float32))["path"])

    good = [tiny_pack(f"g{i}.pack", 1000 + 10 * i) for i in range(rounds)]
    other = [tiny_pack(f"o{i}.pack", 10 ** 9 + i, deployment="factory/packs") for i in range(3)]
    bomb = _forged_bomb(tmp_path / "bomb.pack")                       # forged signature, 120 MB of members
    bomb_ann = transport.make_announcement(bomb.read_bytes(), hashlib.sha256(member(bomb, "manifest.json")).hexdigest(),
                                           10 ** 12, 60_000)
    unsigned = Path(make_pack(tmp_path / "packs" / "unsigned.pack", sequence=10 ** 10, fc=tiny, ipc=1,
                              deployment="ser/packs", golden_inputs=np.zeros((1, 8, 3), np.float32),
                              golden_logits=np.zeros((1, 4), np.float32))["path"])
    unsigned_ann, _ = announcement(unsigned, chunk_size=2000)
    store_dir = tmp_path / "store"
    agent = CliAgent(broker, store_dir, home["public_key"])
    attacker = transport.Client(broker.url, "attacker", username="edge-ser-flooder",
                                password=broker.passwords["edge-ser-flooder"])
    attacker.open(10)
    sent = {"junk": 0, "good": 0}

    def junk(topic, payload, retain=False):
        attacker.publish(topic, payload, retain, time.monotonic() + 10)
        sent["junk"] += 1

    took = []
    try:
        for k, pack in enumerate(good):
            a, chunks = announcement(pack, chunk_size=2000)
            pid = a["pack_id"]
            junk("ser/packs/announce", b"[" * 100_000, retain=(k % 3 == 0))
            junk("ser/packs/announce", b'{"a":' * 20_000 + b"1" + b"}" * 20_000)
            junk("ser/packs/announce", junk_announcement(sequence=10 ** 300), retain=(k % 3 == 1))
            junk("ser/packs/announce", junk_announcement(sequence=2 ** 62))
            junk("ser/packs/announce", b'{"type": "edge-ser-pack", "sequence": ' + b"9" * 5000 + b"}")
            junk("ser/packs/announce", junk_announcement(size=10 ** 12, chunk=1, chunks=10 ** 12))
            junk("ser/packs/announce", np.random.default_rng(k).bytes(120_000))
            junk("ser/packs/chunks/../../x/0", b"x")
            # the genuine announcement without chunks, then chunk indices that str.isdigit() accepts
            genuine = [("ser/packs/announce", json.dumps(dict(a, manifest=a["manifest"], signature=a["signature"])).encode(), False),
                       (f"ser/packs/chunks/{pid}/\u00b2", b"x", False),
                       (f"ser/packs/chunks/{pid}/{'9' * 5000}", b"x", False)]
            # this pack's id and signed manifest with junk content (completes, fails) and with a stalled layout
            data = os.urandom(3000)
            forged = transport.make_announcement(data, pid, a["sequence"], 1000, manifest=member(pack, "manifest.json"),
                                                 signature=member(pack, "signature.json"))
            stalled = dict(a, size=10 ** 7, chunk_size=65536, chunks=-(-10 ** 7 // 65536),
                           sha256=hashlib.sha256(b"junk%d" % k).hexdigest())
            stalled["chunk_sha256"] = [stalled["sha256"]] * stalled["chunks"]
            copies = [("ser/packs/announce", json.dumps(stalled).encode(), k % 3 == 2),
                      ("ser/packs/announce", json.dumps(forged).encode(), False)]
            copies += [(f"ser/packs/chunks/{pid}/{i}", data[i * 1000:(i + 1) * 1000], False) for i in range(3)]
            # even rounds: the genuine copy first; odd rounds: the junk copies first (the worst case)
            for topic, payload, retain in (genuine + copies if k % 2 == 0 else copies + genuine):
                junk(topic, payload, retain)
            if k >= 2:      # a replayed, validly signed older pack
                old, _ = announcement(good[k - 2], chunk_size=2000)
                junk("ser/packs/announce", json.dumps(old).encode())
            o, _ = announcement(other[k % len(other)], chunk_size=2000)   # signed, newer, another deployment
            junk("ser/packs/announce", json.dumps(o).encode())
            junk("ser/packs/announce", json.dumps(bomb_ann).encode())          # forged signature
            junk("ser/packs/announce", json.dumps(unsigned_ann).encode())      # unsigned pack
            t0 = time.monotonic()
            transport.publish(pack, broker.url, "ser/packs", chunk_size=2000, timeout=30, **broker.creds())
            sent["good"] += 1
            agent.wait(lambda a=a: (PackStore(store_dir).current() or {}).get("sequence") == a["sequence"], 15,
                       f"good pack {k} stored")
            took.append(time.monotonic() - t0)
        assert agent.alive()
        peak_kb = _status_kb(agent.proc.pid, "VmHWM")
    finally:
        attacker.close()
        rc = agent.stop()
    text = agent.log_path.read_text()
    assert rc == 0 and "Traceback" not in text, text[-2000:]
    total = sent["junk"] + sent["good"]
    print(f"\nsoak: {total} messages ({sent['junk']} junk, {sent['good']} good packs); each good pack stored "
          f"{min(took):.1f}-{max(took):.1f}s after publishing; agent peak RSS {peak_kb / 1024:.0f} MB; "
          f"junk lines {text.count('ignored')}")
    assert total >= 200
    store = PackStore(store_dir)
    assert store.current()["sequence"] == 1000 + 10 * (rounds - 1) == store.max_sequence()
    assert P.load_pack(store.current_path(), public_key=home["public_key"]).sequence == store.current()["sequence"]
    assert peak_kb < 200 * 1024, f"agent peak RSS {peak_kb / 1024:.0f} MB"
    assert list(store.incoming.iterdir()) == []


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)
