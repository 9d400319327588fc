"""Coverage-guided fuzzing of the pack parser with atheris (libFuzzer): any input must end in a
PackError or a fully verified pack, never another exception, a hang or a huge allocation.

Not collected by pytest (the name does not start with ``test_``). Run it time-boxed:

    pip install atheris
    mkdir -p /tmp/pack-corpus && PYTHONPATH=.:tests python tests/fuzz_pack.py --seed-corpus /tmp/pack-corpus
    PYTHONPATH=.:tests python tests/fuzz_pack.py /tmp/pack-corpus -max_total_time=60 -rss_limit_mb=2048

``--seed-corpus DIR`` writes a few valid tiny packs (signed, unsigned, soft labels) as starting inputs.
Unsigned inputs are parsed with ``require_signature=False`` so the fuzzer reaches every check behind
the signature (a signature is proof of origin, not of sanity).
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np


def seed_corpus(folder: str) -> None:
    from packutil import make_pack

    from edge_ser.config import FeatureConfig
    from edge_ser.signing import keygen

    os.makedirs(folder, exist_ok=True)
    tiny = FeatureConfig(n_mels=8, clip_seconds=0.05, f_max=4000.0)
    kw = dict(fc=tiny, ipc=1, golden_inputs=np.zeros((1, 8, 3), np.float32),
              golden_logits=np.zeros((1, 4), np.float32), created_ms=0, sequence=1)
    keys = keygen(tempfile.mkdtemp(), force=True)
    make_pack(os.path.join(folder, "unsigned.pack"), **kw)
    make_pack(os.path.join(folder, "signed.pack"), private_key=keys["private_key"], **kw)
    make_pack(os.path.join(folder, "soft.pack"), soft=True, calibration=np.zeros((1, 8, 3), np.float32), **kw)
    print(f"wrote 3 seed packs to {folder}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        seed_corpus(sys.argv[2])
        return
    import atheris

    with atheris.instrument_imports():
        import edge_ser.packfile as P

    def one_input(data: bytes) -> None:
        try:
            c = P._read_container(data, "<fuzz>")
            P._build(c, "<fuzz>", False, None)
        except P.PackError:
            pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
