"""One MQTT client for every edge-ser command (paho-mqtt 2.x): broker URLs, TLS, credentials, retry.

The publisher and the device agent connect through :class:`Client`, and ``listen --broker`` can
(``publish_nowait`` / ``flush`` / ``max_queued`` for a stream of results):

* URLs: ``mqtts://HOST[:8883]`` (TLS), ``mqtt://HOST[:1883]`` (plain), ``wss://HOST[:443]/PATH`` and
  ``ws://HOST[:80]/PATH`` (MQTT over WebSockets); ``ssl://`` / ``tcp://`` are aliases. A bare ``HOST:PORT``
  means ``mqtts://``.
* Plain (unencrypted) connections are refused unless the broker is on this machine (loopback) or the caller
  passes ``insecure=True`` (CLI ``--insecure``): a password or a pack on a LAN in clear text is an attack.
* Credentials: arguments first, then ``EDGE_SER_MQTT_USERNAME`` / ``EDGE_SER_MQTT_PASSWORD`` (or
  ``EDGE_SER_MQTT_PASSWORD_FILE``) / ``EDGE_SER_MQTT_CAFILE``, so no password needs to be on a command line.
* :meth:`Client.open` retries an unreachable broker with backoff until its timeout; refused credentials and
  untrusted certificates fail at once with one line naming the cause.

>>> c = Client("mqtts://broker:8883", "my-id", cafile="ca.crt")        # doctest: +SKIP
>>> c.open(timeout=30); c.publish("t", b"x", retain=False, deadline=time.monotonic() + 10)  # doctest: +SKIP
"""
from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import unquote, urlparse

USERNAME_ENV = "EDGE_SER_MQTT_USERNAME"
PASSWORD_ENV = "EDGE_SER_MQTT_PASSWORD"
PASSWORD_FILE_ENV = "EDGE_SER_MQTT_PASSWORD_FILE"
CAFILE_ENV = "EDGE_SER_MQTT_CAFILE"

_SCHEMES = {"mqtt": (False, "tcp", 1883), "tcp": (False, "tcp", 1883), "mqtts": (True, "tcp", 8883),
            "ssl": (True, "tcp", 8883), "ws": (False, "websockets", 80), "wss": (True, "websockets", 443)}


class TransportError(RuntimeError):
    """A delivery problem stated in one line (broker unreachable, refused credentials, bad TLS, ...)."""


@dataclass(frozen=True)
class BrokerURL:
    url: str
    host: str
    port: int
    tls: bool
    transport: str = "tcp"          # "tcp" or "websockets"
    path: str = "/mqtt"             # WebSocket path
    username: Optional[str] = None  # from mqtt://user[:pass]@host (listen --broker accepts that)
    password: Optional[str] = None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_broker_url(url: str) -> BrokerURL:
    """``mqtts://host:port`` and friends -> :class:`BrokerURL`; ``ValueError`` with the reason otherwise."""
    text = str(url).strip()
    if "://" not in text:
        text = "mqtts://" + text        # secure unless said otherwise
    try:
        u = urlparse(text)
        port = u.port
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    scheme = u.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"broker URL {url!r}: scheme must be mqtts://, mqtt://, wss:// or ws://")
    if not u.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls, transport, default_port = _SCHEMES[scheme]
    return BrokerURL(url=str(url), host=u.hostname, port=port or default_port, tls=tls, transport=transport,
                     path=u.path or "/mqtt", username=unquote(u.username) if u.username else None,
                     password=unquote(u.password) if u.password else None)


def parse_broker(url: str) -> Tuple[str, int, bool]:
    """(host, port, tls) of a broker URL (kept for callers of the old transport module)."""
    b = parse_broker_url(url)
    return b.host, b.port, b.tls


def check_secure(b: BrokerURL, insecure: bool = False) -> None:
    """Refuse a plain-text connection to another machine unless the caller opted in."""
    if not b.tls and not b.loopback and not insecure:
        raise TransportError(f"refusing plain-text MQTT to {b.host}: use mqtts:// (TLS, with --cafile) or pass "
                             "--insecure on a trusted network only")


def topics(prefix: str) -> dict:
    prefix = str(prefix).strip().rstrip("/")
    if not prefix or any(c in prefix for c in "+#\0") or len(prefix) > 200:
        raise ValueError(f"invalid topic prefix {prefix!r} (no wildcards, not empty)")
    return {"announce": f"{prefix}/announce", "chunks": f"{prefix}/chunks", "status": f"{prefix}/status"}


def resolve_credentials(username=None, password=None, cafile=None, url: Optional[BrokerURL] = None):
    """(username, password, cafile) from the arguments, else the URL, else the environment."""
    username = username or (url.username if url else None) or os.environ.get(USERNAME_ENV) or None
    if password is None:
        password = (url.password if url else None) or os.environ.get(PASSWORD_ENV) or None
    if password is None and os.environ.get(PASSWORD_FILE_ENV):
        f = Path(os.environ[PASSWORD_FILE_ENV]).expanduser()
        try:
            password = f.read_text().strip("\r\n")
        except OSError as exc:
            raise TransportError(f"cannot read {PASSWORD_FILE_ENV} {f}: {exc.strerror or exc}") from None
    cafile = cafile or os.environ.get(CAFILE_ENV) or None
    return username, password, cafile


class Client:
    """A connected paho client running its network loop in a thread; reconnects with backoff.

    ``on_message(client, userdata, msg)`` runs on paho's thread: any exception it raises is caught and
    counted here (``callback_errors``) so one bad message never ends the network loop."""

    def __init__(self, broker: str, client_id: str, username=None, password=None, cafile=None,
                 on_message=None, on_connected=None, will: Optional[Tuple[str, bytes]] = None,
                 insecure: bool = False, keepalive: int = 30, max_queued: Optional[int] = None):
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.url = broker
        self.broker = parse_broker_url(broker)
        check_secure(self.broker, insecure)
        self.host, self.port, self.tls = self.broker.host, self.broker.port, self.broker.tls
        username, password, cafile = resolve_credentials(username, password, cafile, self.broker)
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: Optional[str] = None
        self.callback_errors = 0
        self._on_connected = on_connected
        self._user_on_message = on_message
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=True, transport=self.broker.transport)
        if self.broker.transport == "websockets":
            c.ws_set_options(path=self.broker.path)
        c.max_inflight_messages_set(20)
        if max_queued is not None:     # broker away: keep at most this many messages (listen's results) queued
            c.max_queued_messages_set(int(max_queued))
        self._pending = []
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        if username is not None:
            c.username_pw_set(username, password)
        if self.tls:
            if cafile and not os.path.exists(cafile):
                raise FileNotFoundError(f"CA file not found: {cafile}")
            c.tls_set(ca_certs=cafile, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        elif cafile and cafile != os.environ.get(CAFILE_ENV):
            raise ValueError("--cafile given for a plain mqtt:// broker; use mqtts:// for TLS")
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._connect_cb
        c.on_disconnect = self._disconnect_cb
        if on_message:
            c.on_message = self._message_cb
        self.client = c

    def _message_cb(self, client, userdata, msg):
        try:
            self._user_on_message(client, userdata, msg)
        except Exception:           # a handler bug or a hostile payload must not end paho's loop
            self.callback_errors += 1

    def _connect_cb(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.connack = str(reason_code)
            return
        self.connack = None
        self.connected.set()
        if self._on_connected:
            try:
                self._on_connected(self)
            except Exception:
                self.callback_errors += 1

    def _disconnect_cb(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.disconnected.set()

    def open(self, timeout: float, retry: bool = True) -> None:
        """Connect, retrying refused/unreachable brokers with backoff until ``timeout``; TLS and
        credential errors fail at once with a clear line."""
        deadline, delay, last = time.monotonic() + timeout, 0.5, None
        while True:
            try:
                self.client.connect(self.host, self.port, keepalive=self.keepalive)
                break
            except ssl.SSLCertVerificationError as exc:
                raise TransportError(f"TLS certificate of {self.host}:{self.port} not trusted "
                                     f"(wrong --cafile?): {exc.verify_message or exc}") from None
            except ssl.SSLError as exc:
                raise TransportError(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from None
            except (ConnectionError, socket.timeout, socket.gaierror, OSError) as exc:
                last = exc
                if not retry or time.monotonic() + delay > deadline:
                    raise TransportError(f"cannot reach MQTT broker {self.url}: "
                                         f"{getattr(exc, 'strerror', None) or exc} (is it running?)") from None
                time.sleep(delay)
                delay = min(delay * 2, 10)
        self.client.loop_start()
        while not self.connected.wait(0.1):
            if self.connack:
                self.close()
                low = self.connack.lower()
                hint = " (check --username/--password)" if "authori" in low or "password" in low else ""
                raise TransportError(f"MQTT broker {self.url} refused the connection: {self.connack}{hint}")
            if time.monotonic() > deadline:
                self.close()
                raise TransportError(f"no answer from MQTT broker {self.url} within {timeout:.0f}s "
                                     f"(last error: {last})")

    def publish(self, topic: str, payload: bytes, retain: bool, deadline: float, qos: int = 1) -> None:
        """Publish with QoS 1 and wait for the broker's ack, re-sending across reconnects until ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"timed out publishing to {self.url} (broker gone?)")
            if not self.connected.wait(min(remaining, 1.0)):
                continue
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            try:
                info.wait_for_publish(timeout=min(remaining, 10.0))
            except (RuntimeError, ValueError):
                time.sleep(0.2)
                continue
            if info.is_published():
                return

    def publish_many(self, items, deadline: float, window: int = 16) -> None:
        """Publish ``(topic, payload, retain)`` items with up to ``window`` QoS-1 messages in flight; any
        message not acknowledged (broker restart, ...) is re-sent by :meth:`publish`."""
        items = list(items)
        for start in range(0, len(items), window):
            batch = items[start:start + window]
            infos = []
            if self.connected.is_set():
                infos = [self.client.publish(t, p, qos=1, retain=r) for t, p, r in batch]
            for k, (t, p, r) in enumerate(batch):
                ok = False
                if k < len(infos):
                    try:
                        infos[k].wait_for_publish(timeout=max(0.0, min(deadline - time.monotonic(), 10.0)))
                        ok = infos[k].is_published()
                    except (RuntimeError, ValueError):
                        ok = False
                if not ok:
                    self.publish(t, p, r, deadline)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        """Queue a message without waiting (a stream of results); :meth:`flush` waits for the acks."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self._pending = [i for i in self._pending if not i.is_published()][-10_000:] + [info]
        return info

    def flush(self, timeout: float = 5.0) -> int:
        """Wait (bounded) until messages from :meth:`publish_nowait` are acknowledged; returns how many are not."""
        deadline = time.monotonic() + timeout
        for info in self._pending:
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self._pending = [i for i in self._pending if not i.is_published()]
        return len(self._pending)

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly: wait (up to ``timeout``) until DISCONNECT is on the wire, so the broker
        does not publish the last will of a client that left on purpose."""
        try:
            self.disconnected.clear()
            if self.connected.is_set() and self.client.disconnect() == 0:
                self.disconnected.wait(timeout)
        except Exception:
            pass
        self.client.loop_stop()
        try:    # paho keeps its wake-up socket pair until garbage collection; close it now
            self.client._reset_sockets()
        except Exception:
            pass
