"""Test helper: a real Debian ``mosquitto`` on 127.0.0.1 with a generated CA, server certificate and
password file, on free ports (plain + TLS listeners). Reused by every MQTT test.

>>> with Broker(tmp_path) as b:                 # doctest: +SKIP
...     publish(pack, b.tls_url, "t", username=b.username, password=b.password, cafile=b.cafile)
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

requires_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None or MOSQUITTO_PASSWD is None,
    reason="mosquitto not installed (apt-get install mosquitto; .ci/run does this)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca(folder: Path, cn: str = "edge-ser test CA", host: str = "127.0.0.1"):
    """Write ca.crt, server.crt, server.key (signed by the CA, SAN 127.0.0.1 + localhost) to ``folder``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
    return folder / "ca.crt"


REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONF = REPO / "server" / "mosquitto.conf"
SHIPPED_ACL = REPO / "server" / "edge-ser.acl"
PUBLISHER = "edge-ser-server"         # the ACL's publishing account
MONITOR = "edge-ser-monitor"          # the ACL's read-only status account
FLOODER = "edge-ser-flooder"          # test-only second publishing account: a leaked credential used concurrently
DEVICES = ("dev1", "dev2", "faultdev", "soak", "demo-device")


def shipped_config(port: int, tls_port: int, folder: Path, pwfile: Path, aclfile: Path) -> str:
    """server/mosquitto.conf as shipped, with only machine paths and ports replaced (and ``user root``: the
    test runs as root in a container and its files are root's)."""
    out = ["user root", f"log_dest file {folder / 'mosquitto.log'}"]
    tls = folder / "tls"
    for line in SHIPPED_CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "password_file":
            line = f"password_file {pwfile}"
        elif key == "acl_file":
            line = f"acl_file {aclfile}"
        elif key == "persistence_location":
            line = f"persistence_location {folder / 'data'}/"
        elif key == "listener":
            line = f"listener {port} 127.0.0.1" if "127.0.0.1" in line else f"listener {tls_port} 127.0.0.1"
        elif key in ("cafile", "certfile", "keyfile"):
            line = f"{key} {tls / {'cafile': 'ca.crt', 'certfile': 'server.crt', 'keyfile': 'server.key'}[key]}"
        out.append(line)
    return "\n".join(out) + "\n"


class Broker:
    """mosquitto on 127.0.0.1 with a plain and a TLS listener, persistence on, no anonymous clients, a
    password per user: the publisher (``username``), the monitor, the devices in :data:`DEVICES`, and a
    test-only second publisher (:data:`FLOODER`).

    ``shipped=True`` (every pack-delivery test): the shipped ``server/mosquitto.conf`` and
    ``server/edge-ser.acl`` with only paths and ports replaced (ACL per user, client id = username; FLOODER
    is appended to the ACL). ``shipped=False``: no ACL, any client id (other uses such as ``listen
    --broker``'s result topic, which the pack ACL does not cover)."""

    def __init__(self, folder, username: str = PUBLISHER, password: str = "s3cret-pass", shipped: bool = False):
        if MOSQUITTO is None:
            pytest.skip("mosquitto not installed")
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.username, self.password = username, password
        self.port, self.tls_port = free_port(), free_port()
        self.cafile = str(make_ca(self.dir / "tls"))
        self.pwfile = self.dir / "passwd"
        self.pwfile.write_text("")
        self.passwords = {u: f"{u}-pw" for u in (MONITOR, FLOODER) + DEVICES}
        self.passwords[username] = password
        for user, pw in self.passwords.items():
            subprocess.run([MOSQUITTO_PASSWD, "-b", str(self.pwfile), user, pw], check=True, capture_output=True)
        os.chmod(self.pwfile, 0o600)
        (self.dir / "data").mkdir(exist_ok=True)
        self.acl = self.dir / "edge-ser.acl"
        self.acl.write_text(f"user {FLOODER}\ntopic readwrite ser/packs/#\n\n" + SHIPPED_ACL.read_text())
        self.conf = self.dir / "mosquitto.conf"
        self.shipped = shipped
        self._write_conf()
        self.proc = None
        self.started = False

    def _write_conf(self) -> None:
        if self.shipped:
            self.conf.write_text(shipped_config(self.port, self.tls_port, self.dir, self.pwfile, self.acl))
        else:
            self.conf.write_text(f"""\
user root
per_listener_settings false
allow_anonymous false
password_file {self.pwfile}
persistence true
persistence_location {self.dir / 'data'}/
autosave_interval 1
log_dest file {self.dir / 'mosquitto.log'}
message_size_limit 131072
max_queued_messages 10000
listener {self.port} 127.0.0.1
listener {self.tls_port} 127.0.0.1
cafile {self.dir / 'tls' / 'ca.crt'}
certfile {self.dir / 'tls' / 'server.crt'}
keyfile {self.dir / 'tls' / 'server.key'}
""")

    def device(self, name: str = "dev1", tls: bool = False) -> dict:
        """Credentials of device ``name`` (its MQTT username is its device id)."""
        d = {"username": name, "password": self.passwords[name]}
        if tls:
            d["cafile"] = self.cafile
        return d

    def user(self, name: str, tls: bool = False) -> dict:
        return self.device(name, tls)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def creds(self, tls: bool = False) -> dict:
        d = {"username": self.username, "password": self.password}
        if tls:
            d["cafile"] = self.cafile
        return d

    def start(self, timeout: float = 10) -> "Broker":
        for attempt in range(4):
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = f"{self.proc.stderr.read().decode()[-500:]} {self.log()[-500:]}"
                    self.proc.stderr.close()
                    self.proc = None
                    # another process took a port between free_port() and mosquitto's bind: new ports, first start only
                    if "Address already in use" in err and not self.started and attempt < 3:
                        self.port, self.tls_port = free_port(), free_port()
                        self._write_conf()
                        break
                    raise RuntimeError(f"mosquitto exited: {err}")
                if all(_listening(p) for p in (self.port, self.tls_port)):
                    self.started = True
                    return self
                time.sleep(0.05)
            else:
                raise RuntimeError("mosquitto did not start listening")
        raise RuntimeError("mosquitto could not bind free ports")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()        # SIGTERM: mosquitto saves its persistence db
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def log(self) -> str:
        try:
            return (self.dir / "mosquitto.log").read_text()
        except FileNotFoundError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False
