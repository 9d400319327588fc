"""``--config FILE`` for ``edge-ser agent`` and ``edge-ser publish``: TOML (tomllib), command-line flags win.

The file holds what a deployment fixes once (broker, topic, CA file, user, key, store, deployment); the
password never goes in it or on a command line: ``password_file`` names a file (mode 0600), or the unit's
environment sets ``EDGE_SER_MQTT_PASSWORD``. See ``device/device.toml`` and ``server/server.toml``.

>>> load("device/device.toml", "agent")["topic"]     # doctest: +SKIP
'ser/packs'
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

# section -> key -> type; an unknown key is an error naming the known ones (a typo must not pass silently)
KEYS = {
    "mqtt": {"broker": str, "topic": str, "username": str, "cafile": str, "password_file": str, "insecure": bool,
             "timeout": (int, float)},
    "agent": {"store": str, "public_key": str, "deployment": str, "train": bool, "memory_budget_mb": (int, float),
              "threads": int},
    "publish": {"pack": str, "chunk_size": int, "public_key": str},
}
IGNORED = {"pack", "train", "listen"}     # sections other commands read


def load(path, command: str) -> dict:
    """The ``[mqtt]`` and ``[COMMAND]`` settings of a TOML file, flat, validated."""
    import tomllib

    p = Path(path).expanduser()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {p}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid TOML ({' '.join(str(exc).split())})") from None
    out = {}
    for section, table in data.items():
        if section in IGNORED or (section in KEYS and section not in ("mqtt", command)):
            continue
        if section not in KEYS or not isinstance(table, dict):
            raise ValueError(f"{p}: unknown section [{section}] (known: {', '.join(sorted(KEYS) + sorted(IGNORED))})")
        for key, value in table.items():
            want = KEYS[section].get(key)
            if want is None:
                raise ValueError(f"{p}: unknown key {key!r} in [{section}] (known: {', '.join(sorted(KEYS[section]))})")
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"{p}: [{section}] {key} has the wrong type ({type(value).__name__})")
            out[key] = value
    if "password_file" in out:
        out["password_file"] = str(Path(out["password_file"]).expanduser())
    return out


def read_password_file(path) -> str:
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read password file {p}: {exc.strerror or exc}") from None
    if mode & 0o077 and os.name == "posix":
        logging.getLogger("edge_ser.runconfig").warning(f"password file {p} is readable by others (chmod 600 it)")
    return text.strip("\r\n")
