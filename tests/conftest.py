"""Shared test fixtures: paths to the real corpora (skipped cleanly when absent) and cached features."""
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
