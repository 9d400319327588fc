"""Soak (issue 8): the agent process (``python -m edge_ser agent``) receives 200 pack versions over a real
mosquitto with random broker restarts; it must end on the newest, verified, leaking no files or fds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from broker import Broker, requires_mosquitto

REPO = Path(__file__).resolve().parents[1]
VERSIONS = 200
RESTARTS = 6
pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.faults]


def fds(pid) -> dict:
    """Open file descriptors of process ``pid``: fd -> what it points at."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def settled_fds(pid, samples=5) -> dict:
    """The smallest of a few samples 0.1 s apart: a file the agent has open for a moment is not a leak."""
    tables = []
    for _ in range(samples):
        tables.append(fds(pid))
        time.sleep(0.1)
    return min(tables, key=len)


def kinds(table: dict) -> dict:
    """Descriptor counts by kind (socket, pipe, anon_inode, file) so a reconnect's new socket number
    does not look like a leak, but an extra socket or file does."""
    out = {}
    for target in table.values():
        kind = target.split(":")[0] if ":" in target and not target.startswith("/") else "file"
        out[kind] = out.get(kind, 0) + 1
    return out


def store_tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@requires_mosquitto
def test_agent_process_soaks_200_versions_with_broker_restarts(tmp_path, monkeypatch):
    from packutil import make_pack

    from edge_ser import signing, transport
    from edge_ser.config import FeatureConfig
    from edge_ser.packfile import ALLOW_UNSIGNED_ENV, load_pack, read_manifest
    from edge_ser.store import PackStore

    monkeypatch.setenv("EDGE_SER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ALLOW_UNSIGNED_ENV, raising=False)
    keys = signing.keygen()
    tiny = FeatureConfig(n_mels=8, clip_seconds=0.05, f_max=4000.0)          # (8, 3) features: ~5 KB packs
    packs = [Path(make_pack(tmp_path / "packs" / f"{i:03d}.pack", private_key=keys["private_key"], sequence=1000 + i,
                            seed=i, fc=tiny, ipc=1, golden_inputs=np.zeros((1, 8, 3), np.float32),
                            golden_logits=np.zeros((1, 4), np.float32))["path"]) for i in range(VERSIONS)]
    rng = np.random.default_rng(8)
    restart_at = set(rng.choice(np.arange(10, VERSIONS - 5), size=RESTARTS, replace=False).tolist())

    broker = Broker(tmp_path / "broker", shipped=True).start()
    store_dir = tmp_path / "store"
    log = open(tmp_path / "agent.log", "w+")
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_SER_DEVICE_ID="soak")
    agent = subprocess.Popen([sys.executable, "-m", "edge_ser", "agent", "--broker", broker.url, "--topic", "ser/packs",
                              "--username", "soak", "--password", broker.passwords["soak"], "--store", str(store_dir),
                              "--public-key", keys["public_key"], "--timeout", "30"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)

    def current_seq():
        try:
            return (PackStore(store_dir).current() or {}).get("sequence")
        except Exception:
            return None

    def wait_for(pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            assert agent.poll() is None, f"agent exited {agent.returncode}: {_tail(log)}"
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s; current {current_seq()}; agent log: {_tail(log)}")

    try:
        wait_for(lambda: "online" in _tail(log), 30)
        transport.publish(packs[0], broker.url, "ser/packs", timeout=30, **broker.creds())
        wait_for(lambda: current_seq() == 1000, 30)
        agent_fds_before = settled_fds(agent.pid)
        my_fds_before = len(fds(os.getpid()))
        for i, pack in enumerate(packs[1:], start=1):
            if i in restart_at:
                broker.restart(down_seconds=float(rng.uniform(0.1, 1.0)))
            transport.publish(pack, broker.url, "ser/packs", timeout=30, **broker.creds())
        newest = read_manifest(packs[-1])[0]
        wait_for(lambda: (PackStore(store_dir).current() or {}).get("pack_id") == newest, 60)
        agent_fds_after = settled_fds(agent.pid)
        my_fds_after = len(fds(os.getpid()))
        assert agent.poll() is None
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        broker.stop()
    text = _tail(log, 10 ** 7)
    log.close()
    assert agent.returncode == 0, text[-2000:]           # SIGTERM: clean stop
    assert "Traceback" not in text
    stored = text.count("edge-ser agent: stored")
    print(f"\nsoak: {VERSIONS} versions, restarts at {sorted(restart_at)}, agent stored {stored}, "
          f"fds {kinds(agent_fds_before)} -> {kinds(agent_fds_after)}")
    assert stored >= VERSIONS * 3 // 4, f"the agent stored only {stored} of {VERSIONS} versions"

    store = PackStore(store_dir)
    cur, prev = store.current(), store.previous()
    assert cur["sequence"] == 1000 + VERSIONS - 1 and prev and prev["sequence"] < cur["sequence"]
    assert load_pack(store.current_path(), public_key=keys["public_key"]).sequence == cur["sequence"]
    assert load_pack(store.packs / prev["file"], public_key=keys["public_key"]).sequence == prev["sequence"]
    assert store_tree(store_dir) == sorted(["current.pack", "incoming", "packs", "state.json", "state.backup.json",
                                            f"packs/{cur['file']}", f"packs/{prev['file']}"]), store_tree(store_dir)
    assert os.readlink(store_dir / "current.pack") == f"packs/{cur['file']}"

    assert kinds(agent_fds_after) == kinds(agent_fds_before), (agent_fds_before, agent_fds_after)
    assert my_fds_after <= my_fds_before, "the publisher side leaked descriptors"


def _tail(fh, n=3000) -> str:
    fh.flush()
    with open(fh.name) as f:
        return f.read()[-n:]
