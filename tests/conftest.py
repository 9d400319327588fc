"""Shared test fixtures: the real corpora (skipped cleanly when absent) and cached features, a private signing home,
a private feature cache, a real mosquitto broker.

Tiers: ``bash tests/run.sh`` runs the tests not marked ``slow`` (a few minutes, still real mosquitto, ONNX Runtime
and a RAVDESS slice when present); ``bash tests/run.sh --full`` runs all. Mark a test ``@pytest.mark.slow`` when it
takes more than ~10 s on a 2-core CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPORA = Path(os.environ.get("EDGE_SER_CORPORA", REPO.parent / "shared" / "corpora"))
RAVDESS = SHARED_CORPORA / "ravdess"
RAVDESS_TEST = [str(i) for i in range(19, 25)]


def pytest_configure(config):
    # tests share 2 cores with each other and with the broker; one torch thread keeps them predictable
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def ravdess_path() -> Path:
    if not (RAVDESS / "Actor_01").is_dir():
        pytest.skip(f"RAVDESS not found at {RAVDESS} (see ../shared/corpora/README.md); real-corpus test skipped")
    return RAVDESS


@pytest.fixture(scope="session")
def ravdess_features(ravdess_path):
    """(train, test) FeatureSets, speaker-independent: actors 01-18 / 19-24."""
    from edge_ser.corpora import load_features

    fs, _ = load_features(ravdess_path)
    return fs.split_speakers(RAVDESS_TEST)


@pytest.fixture
def device_id():
    """The device id ``home`` sets (status topics end in it); a test module overrides this fixture for another
    of the shipped broker's device users (tests/broker.py DEVICES)."""
    return "testdev"


@pytest.fixture
def home(tmp_path, monkeypatch, device_id):
    """A signing key pair in a private ``EDGE_SER_HOME``, a fixed device id, unsigned packs not allowed."""
    from edge_ser import signing
    from edge_ser.packfile import ALLOW_UNSIGNED_ENV

    monkeypatch.setenv("EDGE_SER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_SER_DEVICE_ID", device_id)
    monkeypatch.delenv(ALLOW_UNSIGNED_ENV, raising=False)
    return signing.keygen()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Features, experts and checkpoints cached under this test's own folder."""
    monkeypatch.setenv("EDGE_SER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto broker on 127.0.0.1 with the shipped config and ACL (tests/broker.py), stopped after the
    test."""
    from broker import Broker

    b = Broker(tmp_path / "broker", shipped=True)
    b.start()
    yield b
    b.stop()
