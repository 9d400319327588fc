"""Progress on stderr for long phases that have no counter of their own (ONNX export, int8 calibration,
the TensorFlow converter): one line each, ``export: TFLite int8 ... 14 s``.

Off by default, so the library and its tests stay silent; the CLI turns it on unless ``--quiet`` (stdout,
which ``--json`` reserves for the result, is never written). Phases with a counter use tqdm bars instead.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

_enabled = False


def enable(on: bool = True) -> None:
    """Show phases from now on (the CLI calls this once)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """``with phase("export: ONNX int8"):`` writes ``what ...`` when the phase starts and its seconds when it ends
    (``failed`` when it raises), so a silent minute says what it is doing."""
    if not _enabled:
        yield
        return
    t0 = time.perf_counter()
    sys.stderr.write(f"{what} ...")
    sys.stderr.flush()
    ok = False
    try:
        yield
        ok = True
    finally:
        sys.stderr.write(f" {time.perf_counter() - t0:.0f} s\n" if ok else " failed\n")
        sys.stderr.flush()
