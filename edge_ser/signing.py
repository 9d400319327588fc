"""Ed25519 signing of pack manifests: key generation, loading, signing and verification.

Keys are PEM files (private: PKCS#8, mode 0600, stays on the server; public: SubjectPublicKeyInfo, copied
to devices). A key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key.

>>> info = keygen("/tmp/keys", force=True)                      # doctest: +SKIP
>>> sig = sign(b"manifest", load_private_key(info["private_key"]))  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

KeyLike = Union[str, os.PathLike, bytes, None]


def home_dir() -> Path:
    """``$EDGE_SER_HOME`` or ``~/.config/edge-ser``: where keys live by default."""
    env = os.environ.get("EDGE_SER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".config" / "edge-ser"


def default_private_key() -> Path:
    return home_dir() / "signing.key"


def default_public_key() -> Path:
    return home_dir() / "signing.pub"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("signing needs the 'cryptography' package: pip install 'edge-ser[server]'") from exc
    return serialization, ed25519


def key_id(public_key) -> str:
    """First 16 hex digits of SHA-256 over the raw public key bytes."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(out_dir: Optional[str] = None, name: str = "signing", force: bool = False) -> dict:
    """Make an Ed25519 key pair ``NAME.key`` (private, 0600) and ``NAME.pub`` in ``out_dir``.

    >>> keygen("/tmp/edge-ser-keys", force=True)["key_id"]       # doctest: +SKIP
    '3f2a...'
    """
    serialization, ed25519 = _crypto()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}")
    folder = Path(out_dir).expanduser() if out_dir else home_dir()
    _private_folder(folder)
    priv_path, pub_path = folder / f"{name}.key", folder / f"{name}.pub"
    if not force and (os.path.lexists(priv_path) or os.path.lexists(pub_path)):   # a dangling symlink counts
        raise ValueError(f"key pair already exists at {priv_path}; use --force to overwrite it")
    private = ed25519.Ed25519PrivateKey.generate()
    priv_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(priv_path, priv_pem, 0o600)
    _write_new(pub_path, pub_pem, 0o644)
    return {"ok": True, "private_key": str(priv_path), "public_key": str(pub_path),
            "key_id": key_id(private.public_key()),
            "note": f"keep {priv_path.name} on the server; copy {pub_path.name} to devices (--public-key)"}


def _private_folder(folder: Path) -> None:
    """Create ``folder`` mode 0700; an existing one that others may write to (where a symlink could be
    planted) is tightened to 0700 when we own it, else refused."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_mode & 0o022:
        if st.st_uid != os.getuid():
            raise ValueError(f"{folder} is writable by others and not ours; refusing to write keys there")
        os.chmod(folder, 0o700)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a key file without following symlinks: the rename replaces a planted symlink itself."""
    from .files import atomic_write

    atomic_write(path, data, mode=mode)


def load_private_key(path: KeyLike = None):
    """Load an Ed25519 private key from a PEM file (default :func:`default_private_key`)."""
    serialization, ed25519 = _crypto()
    path = Path(path).expanduser() if path else default_private_key()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"signing key not found: {path} (make one with `edge-ser keygen`)") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(key: KeyLike = None):
    """Load an Ed25519 public key: a PEM file path, PEM bytes, or (default) :func:`default_public_key`.

    A private-key file is accepted too (its public half is used)."""
    serialization, ed25519 = _crypto()
    if isinstance(key, (bytes, bytearray)):
        data, where = bytes(key), "public key bytes"
    else:
        path = Path(key).expanduser() if key else default_public_key()
        where = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"public key not found: {path}") from None
    try:
        if b"PRIVATE KEY" in data:
            pub = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            pub = serialization.load_pem_public_key(data)
    except Exception as exc:
        raise ValueError(f"{where}: not a readable PEM public key ({type(exc).__name__})") from None
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise ValueError(f"{where}: not an Ed25519 public key")
    return pub


def sign(message: bytes, private_key) -> bytes:
    """64-byte Ed25519 signature of ``message``."""
    return private_key.sign(message)


def verify(message: bytes, signature: bytes, public_key) -> bool:
    """True when ``signature`` is valid for ``message`` under ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False
