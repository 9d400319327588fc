"""Pack delivery over MQTT: what used to live here is now split by concern, and re-exported for callers
of the old module.

* :mod:`edge_ser.mqtt`: the one MQTT client (URLs, TLS, credentials, retry)
* :mod:`edge_ser.chunks`: the wire protocol (announcement, chunks, reassembly) and the publisher
* :mod:`edge_ser.agent`: the device agent
"""
from __future__ import annotations

from .agent import QUEUE_MAX, QUEUE_MAX_BYTES, STALL_SECONDS, TRANSFER_TIMEOUT, Agent, device_id, run_agent  # noqa: F401
from .chunks import (  # noqa: F401
                    DEFAULT_MAX_PACK_BYTES,
                    MAX_ANNOUNCE_BYTES,
                    MAX_CHUNK,
                    Reassembler,
                    chunk_index,
                    make_announcement,
                    parse_announcement,
                    publish,
)
from .mqtt import Client, TransportError, parse_broker, parse_broker_url, topics  # noqa: F401

_Connection = Client     # the old private name, still used by tests and tools

__all__ = ["Agent", "Client", "Reassembler", "TransportError", "make_announcement", "parse_announcement",
           "parse_broker", "publish", "run_agent", "topics"]
