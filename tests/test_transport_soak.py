"""Soak test of pack delivery (issue 8): 200 versions in a row over a real mosquitto with random
restarts; the agent must end on the newest verified pack with no leaked files or descriptors.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import edge_ser.packfile as P
from edge_ser import transport
from edge_ser.store import PackStore
from broker import requires_mosquitto
from packutil import make_pack
from test_transport import AgentThread, broker, home  # noqa: F401  (fixtures)

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
    for i, pack in enumerate(packs):
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
