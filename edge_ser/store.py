"""The device's pack store: verified packs committed atomically, the previous one kept for rollback.

Layout under the store folder (default ``$EDGE_SER_HOME/store`` if set, else ``~/.local/share/edge-ser``)::

    packs/<sequence>-<pack_id[:16]>.pack   at most two: current and previous
    state.json                             the single source of truth: current, previous, max_sequence
    current.pack                           convenience symlink to the current pack (rebuilt from state.json)
    incoming/                              transfers in progress (never used, cleared at start)

A commit writes the pack to a temp file, fsyncs it, renames it into ``packs/``, fsyncs the folder, then
replaces ``state.json`` the same way. Killing the process at any instant leaves ``state.json`` naming
either the old or the new pack, both complete on disk.

>>> store = PackStore("/tmp/store")                     # doctest: +SKIP
>>> store.commit("incoming.pack", pack_id, sequence)    # doctest: +SKIP
>>> store.current_path()                                # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional


def default_store_dir() -> Path:
    env = os.environ.get("EDGE_SER_HOME")
    if env:
        return Path(env).expanduser() / "store"
    return Path.home() / ".local" / "share" / "edge-ser"


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class StoreError(RuntimeError):
    """The store refuses an operation (older sequence, nothing to roll back to, ...)."""


class PackStore:
    """Atomic pack storage with one level of rollback."""

    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root else default_store_dir()
        self.packs = self.root / "packs"
        self.incoming = self.root / "incoming"
        for d in (self.root, self.packs, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "state.json"

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text())
            return state if isinstance(state, dict) else {}
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            # state.json is only ever replaced atomically, so this means outside damage
            raise StoreError(f"{self.state_file} is unreadable; fix or remove it") from None

    def current(self) -> Optional[dict]:
        """``{"file", "pack_id", "sequence"}`` of the current pack, or None."""
        return self.state().get("current")

    def previous(self) -> Optional[dict]:
        return self.state().get("previous")

    def current_path(self) -> Optional[Path]:
        cur = self.current()
        return self.packs / cur["file"] if cur else None

    def max_sequence(self) -> int:
        return int(self.state().get("max_sequence", -1))

    # ------------------------------------------------------------ operations
    def cleanup(self) -> int:
        """Remove leftovers of interrupted transfers/commits and packs no longer referenced."""
        removed = 0
        keep = {e["file"] for e in (self.current(), self.previous()) if e}
        for f in list(self.incoming.iterdir()):
            _remove(f)
            removed += 1
        for f in list(self.packs.iterdir()):
            if f.name not in keep:
                _remove(f)
                removed += 1
        for f in self.root.glob(".*.tmp"):
            _remove(f)
            removed += 1
        self._link()
        return removed

    def commit(self, src, pack_id: str, sequence: int, move: bool = True) -> Path:
        """Store the (already verified) pack at ``src`` as current; the old current becomes previous.

        Refuses a sequence not above every sequence accepted so far."""
        sequence = int(sequence)
        state = self.state()
        if sequence <= int(state.get("max_sequence", -1)):
            raise StoreError(f"pack sequence {sequence} is not newer than the stored {state.get('max_sequence')}; "
                             "an old version never replaces a newer one")
        name = f"{sequence}-{pack_id[:16]}.pack"
        final = self.packs / name
        tmp = self.packs / f".{name}.tmp"
        try:
            if move and Path(src).parent.resolve() == self.incoming.resolve():
                with open(src, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(src, tmp)
            else:
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                    fout.flush()
                    os.fsync(fout.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.packs)
        new_state = {"current": {"file": name, "pack_id": pack_id, "sequence": sequence},
                     "previous": state.get("current"), "max_sequence": sequence}
        atomic_write_bytes(self.state_file, json.dumps(new_state, indent=1).encode())
        self.cleanup()
        return final

    def rollback(self) -> dict:
        """Make the previous pack current again (the rolled-back one is dropped). Returns the new state."""
        state = self.state()
        if not state.get("previous"):
            raise StoreError("no previous pack to roll back to")
        new_state = {"current": state["previous"], "previous": None,
                     "max_sequence": state.get("max_sequence", -1)}
        atomic_write_bytes(self.state_file, json.dumps(new_state, indent=1).encode())
        self.cleanup()
        return new_state

    def _link(self) -> None:
        """Point ``current.pack`` at the current pack (best effort; state.json is the truth)."""
        link = self.root / "current.pack"
        cur = self.current()
        try:
            if cur is None:
                if link.is_symlink():
                    link.unlink()
                return
            target = Path("packs") / cur["file"]
            if link.is_symlink() and os.readlink(link) == str(target):
                return
            tmp = self.root / f".current.{os.getpid()}.lnk"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError:
            pass


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
