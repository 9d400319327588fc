"""The device's pack store: verified packs committed atomically, the previous one kept for rollback.

Layout under the store folder (default ``$EDGE_SER_HOME/store`` if set, else ``~/.local/share/edge-ser``)::

    packs/<sequence>-<pack_id[:16]>.pack   at most two: current and previous
    state.json                             the single source of truth: current, previous, max_sequence,
                                           trained (which pack the installed model was built from)
    state.backup.json                      the same, written second: a damaged state.json is recovered from it
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
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .files import atomic_write, fsync_dir

log = logging.getLogger("edge_ser.store")


def default_store_dir() -> Path:
    env = os.environ.get("EDGE_SER_HOME")
    if env:
        return Path(env).expanduser() / "store"
    return Path.home() / ".local" / "share" / "edge-ser"


class StoreError(RuntimeError):
    """The store refuses an operation (older sequence, nothing to roll back to, ...)."""


class PackStore:
    """Atomic pack storage with one level of rollback.

    A damaged ``state.json`` (outside damage: it is only ever replaced atomically) is recovered from
    ``state.backup.json``, else rebuilt from the pack files; the rollback floor never goes down in either
    case (it is the highest of what the copies and the pack file names say)."""

    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root else default_store_dir()
        self.packs = self.root / "packs"
        self.incoming = self.root / "incoming"
        for d in (self.root, self.packs, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "state.json"

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        state = _read_json(self.state_file)
        if state is not None:
            return state
        if not self.state_file.exists() and not self.backup_file.exists():
            return {}
        return self._recover()

    @property
    def backup_file(self) -> Path:
        return self.root / "state.backup.json"

    def _recover(self) -> dict:
        """Rebuild state.json from the backup copy and the pack files, keeping the highest floor seen."""
        backup = _read_json(self.backup_file) or {}
        on_disk = []
        for f in self.packs.glob("*.pack"):
            seq, _, short = f.stem.partition("-")
            if seq.isascii() and seq.isdigit() and short:
                on_disk.append((int(seq), f.name))
        on_disk.sort()
        state = dict(backup)
        names = {n for _, n in on_disk}
        if (state.get("current") or {}).get("file") not in names:
            state["current"] = None
            for seq, name in reversed(on_disk):   # the newest whole pack file (the agent verifies it again)
                try:
                    from .packfile import read_manifest

                    state["current"] = {"file": name, "pack_id": read_manifest(self.packs / name)[0], "sequence": seq}
                    break
                except Exception:
                    continue
        if (state.get("previous") or {}).get("file") not in names:
            state["previous"] = None
        floor = max([int(state.get("max_sequence", -1))] + [s for s, _ in on_disk])
        state["max_sequence"] = floor
        state["recovered"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            os.replace(self.state_file, self.root / f"state.damaged.{int(time.time())}.json")
        except OSError:
            pass
        self._write_state(state)
        log.warning(f"{self.state_file} was damaged; recovered (current {(state.get('current') or {}).get('file')}, "
                    f"rollback floor {floor})")
        return state

    def _write_state(self, state: dict) -> None:
        data = json.dumps(state, indent=1).encode()
        atomic_write(self.state_file, data)
        atomic_write(self.backup_file, data)    # second: one copy is whole at any instant

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
        if state.get("trained"):
            new_state["trained"] = state["trained"]       # the model in use stays recorded until a new one is built
        self._write_state(new_state)
        self.cleanup()
        return final

    def rollback(self) -> dict:
        """Make the previous pack current again (the rolled-back one is dropped). Returns the new state."""
        state = self.state()
        if not state.get("previous"):
            raise StoreError("no previous pack to roll back to")
        new_state = {"current": state["previous"], "previous": None,
                     "max_sequence": state.get("max_sequence", -1)}
        if state.get("trained"):
            new_state["trained"] = state["trained"]
        self._write_state(new_state)
        self.cleanup()
        return new_state

    def note_training(self, pack_id: str) -> int:
        """Record that training of ``pack_id`` starts (counted, so a pack that kills the agent every time
        is not retried forever). Returns the attempt number."""
        state = self.state()
        t = state.get("training") or {}
        attempts = int(t.get("attempts", 0)) + 1 if t.get("pack_id") == pack_id else 1
        state["training"] = {"pack_id": pack_id, "attempts": attempts}
        self._write_state(state)
        return attempts

    def mark_trained(self, pack_id: str, model) -> None:
        """Record that the model at ``model`` was built from ``pack_id`` (after it is complete on disk)."""
        state = self.state()
        state["trained"] = {"pack_id": pack_id, "model": str(model),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        state.pop("training", None)
        self._write_state(state)

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


def _read_json(path: Path) -> Optional[dict]:
    """The dict in ``path``; None when missing, unreadable or not a JSON object."""
    try:
        data = path.read_bytes()
        if len(data) > 1 << 20:
            return None
        state = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("max_sequence", -1), int):
        return None
    return state


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
