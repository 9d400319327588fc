"""Files: one way to write a file atomically, and one way to turn numpy values into JSON.

Every file edge-ser writes (packs, keys, the device store's state, models, caches, checkpoints, benchmark
results) goes through :func:`atomic_write`, so a crash or power loss leaves the old file or the new one,
never half of one, and a planted symlink is replaced, not followed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional


def fsync_dir(path) -> None:
    """Make a rename inside folder ``path`` durable (the folder's own entry table)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass    # some filesystems cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path, data: Optional[bytes] = None, *, write: Optional[Callable] = None, mode: Optional[int] = None,
                 durable: bool = True) -> Path:
    """Write ``path`` atomically: a fresh temp file in the same folder (created exclusively, never through a
    symlink), filled with ``data`` or by ``write(binary_file)``, fsynced, renamed over ``path``, and the folder
    fsynced (``durable=False`` skips both fsyncs: caches). ``mode``: the file's permission bits (default 0666
    less the umask, as ``open`` gives). A failure removes the temp file and leaves ``path`` as it was."""
    path = Path(path)
    if (data is None) == (write is None):
        raise TypeError("atomic_write takes data or write, not both")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if data is not None:
                fh.write(data)
            else:
                write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)     # exact bits, whatever the umask
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def json_default(obj):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays as numbers and lists, sets and tuples as
    lists, config objects by ``to_dict()``, anything else as its string."""
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)
