"""``edge-ser pack inspect``: everything in a pack, integrity always checked, as a dict and as text; and the
one line that says what a pack holds (real clips' features or not, DP or not) for inspect and the agent."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .packfile import LIMITS, PackError, _build, _check_signature, _read_container


def inspect_pack(path, public_key=None) -> dict:
    """Everything in a pack as a JSON-able dict; integrity is always checked, the signature is checked
    when a public key is given or installed (``ok`` is False if it does not verify).

    >>> print(format_inspect(inspect_pack("demo.pack")))     # doctest: +SKIP
    """
    from . import signing

    where = str(path)
    c = _read_container(path, where, LIMITS)
    kid_signed = (c.signature or {}).get("key_id")
    ok, error = True, None
    try:
        if c.signature is None:
            sig_state = "UNSIGNED (devices refuse it)"
        elif public_key is None and not signing.default_public_key().exists():
            sig_state = f"signed by key {kid_signed}; not verified (no public key given)"
        else:
            signed, kid = _check_signature(c, where, public_key, require_signature=True)
            sig_state = f"valid (key {kid})"
    except PackError as exc:
        ok, error, sig_state = False, str(exc), "INVALID"
    pack = _build(c, where, False, kid_signed)
    m = c.manifest
    counts = {cls: int((pack.hard_labels == i).sum()) for i, cls in enumerate(pack.classes)}
    n_params = int(sum(v.size for k, v in pack.theta0.items() if v.dtype == np.float32))
    out = {
        "ok": ok, "path": where, "bytes": c.size, "pack_id": pack.pack_id, "format_version": pack.format_version,
        "sequence": pack.sequence, "created": pack.created, "signature": sig_state,
        "classes": list(pack.classes), "synthetic": {"samples": int(len(pack.X)), "shape": list(pack.X.shape[1:]),
                                                     "per_class": counts, "soft_labels": bool(pack.y.ndim == 2),
                                                     "stored_resolution": m.get("synthetic_resolution", "input"),
                                                     "stored_shape": list((m["members"].get("data/X.npy") or {})
                                                                          .get("shape", [])[1:])},
        "model": pack.model_config.to_dict(), "theta0": {"tensors": len(pack.theta0), "values": n_params,
                                                          "sha256": pack.theta0_sha256},
        "schedule": pack.schedule.to_dict(), "features": pack.feature_config.to_dict(),
        "golden": {"inputs": int(len(pack.golden_inputs)), "tolerance": pack.golden_tolerance},
        "calibration": None if pack.calibration is None else int(len(pack.calibration)),
        "provenance": pack.provenance, "privacy": privacy_line(pack.provenance),
        "members": {k: {"bytes": v["bytes"], "sha256": v["sha256"][:16], "shape": v["shape"], "dtype": v["dtype"]}
                    for k, v in sorted(m["members"].items())},
    }
    if error:
        out["error"] = error
    return out


def _count(value) -> int:
    """Speakers recorded as a count (current packs) or as a list of ids (packs before 0.2)."""
    return int(value) if isinstance(value, (int, float)) else len(value or [])


def privacy_line(provenance: Mapping[str, Any]) -> str:
    """One line on what a pack holds: real clips' features or not, and its DP guarantee (if any)."""
    claim = (provenance or {}).get("privacy") or {}
    real = claim.get("real_clips")
    if real is None:
        method = (provenance or {}).get("method")
        from .distill.base import REAL_CLIP_METHODS

        real = True if method in REAL_CLIP_METHODS else None
    what = {True: f"HOLDS REAL CLIPS' FEATURES ({claim.get('init', 'real-sample method')})",
            False: f"no real clip ({claim.get('init', 'learned')})", None: "not recorded (pack made before 0.2)"}[real]
    dp = claim.get("epsilon")
    return what + ("; not differentially private" if dp is None else f"; (ε={dp}, δ={claim.get('delta')})-DP") + \
        "; measure it: edge-ser pack audit PACK CORPUS"


def format_inspect(info: dict) -> str:
    """Human-readable text for :func:`inspect_pack`'s result."""
    p = info.get("provenance", {}) or {}
    syn = info["synthetic"]
    lines = [
        f"pack      {info['path']}  ({info['bytes']:,} bytes)",
        f"id        {info['pack_id']}",
        f"format    {info['format_version']}   sequence {info['sequence']}   created {info['created']}",
        f"signature {info['signature']}",
        f"classes   {', '.join(info['classes'])}",
        f"synthetic {syn['samples']} x {syn['shape']} ({'soft' if syn['soft_labels'] else 'hard'} labels); "
        f"per class {syn['per_class']}",
        *([f"          stored at stem resolution as data/X.npy {syn['stored_shape']}: normalised and pooled the way "
           f"the model's stem sees {syn['shape']} (Mel bins x frames), expanded back when loaded"]
          if syn.get("stored_resolution") == "stem" else []),
        f"model     {info['model']['arch']} channels {info['model']['channels']}  "
        f"θ0 {info['theta0']['values']:,} values sha256 {info['theta0']['sha256'][:16]}",
        "schedule  " + ", ".join(f"{k}={v}" for k, v in info["schedule"].items()),
        f"golden    {info['golden']['inputs']} inputs, tolerance {info['golden']['tolerance']:.3g}",
    ]
    if p:
        lines.append(f"source    corpus {p.get('corpus')}  method {p.get('method')}  ipc {p.get('ipc')}  "
                     f"train speakers {_count(p.get('train_speakers'))}  test speakers {p.get('test_speakers')}")
        if p.get("versions"):
            lines.append("versions  " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()))
    lines.append(f"privacy   {info.get('privacy') or privacy_line(p)}")
    lines.append("members")
    for name, e in info["members"].items():
        lines.append(f"  {name:<38} {e['bytes']:>10,}  {e['dtype']} {e['shape']}  {e['sha256']}")
    return "\n".join(lines)   # an error (info["error"]) goes to stderr, from the CLI
