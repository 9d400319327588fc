"""``edge-ser listen``: one line per hop (or one JSON object per hop), a summary, and an optional MQTT feed
of the results. The streaming itself is :func:`edge_ser.stream.listen`."""
from __future__ import annotations

import json
import time
from typing import Dict, List

import numpy as np

from .capture import list_input_devices
from .stream import Result, listen


def format_result(r: Result, top: int = 3) -> str:
    span = f"{f'{r.t_start:.2f}-{r.t_end:.2f}s':>15}"
    if r.silent:
        return f"{span}  {'(silence)':<10} {r.level_db:.1f} dBFS"
    best = sorted(r.probabilities.items(), key=lambda kv: -kv[1])[:top]
    probs = "  ".join(f"{k} {v:.2f}" for k, v in best)
    return f"{span}  {r.emotion:<10} {probs:<40} {r.latency_ms:6.1f} ms"


class _Publisher:
    """Publishes each result as JSON to an MQTT topic through the one MQTT client (:class:`edge_ser.mqtt.Client`:
    the same URL schemes, TLS, CA file, credentials from the environment and retry at start as publish and agent),
    QoS 1 without waiting; a broker that goes away keeps at most 1000 results queued."""

    def __init__(self, broker: str, topic: str, cafile=None, insecure: bool = False):
        try:
            from .mqtt import Client
        except ImportError:
            raise RuntimeError("--mqtt-topic needs paho-mqtt: pip install paho-mqtt") from None
        self.topic = topic
        self.conn = Client(broker, f"edge-ser-listen-{time.time_ns()}", cafile=cafile, insecure=insecure,
                           max_queued=1000)
        self.conn.open(timeout=15.0)
        self.published = 0

    def publish(self, r: Result) -> None:
        self.conn.publish_nowait(self.topic, json.dumps(r.to_dict(), sort_keys=True).encode(), qos=1)
        self.published += 1

    def close(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for queued results to reach the broker, then disconnect."""
        self.conn.flush(timeout)
        self.conn.close()


def listen_cli(args) -> Dict:
    """``edge-ser listen``: print one line per hop (``--json``: one JSON object per line) and return the
    summary dict (hops, skipped_silent, overflows, latency p50/p95, emotion counts, runtime)."""
    as_json = bool(getattr(args, "json", False))
    if getattr(args, "list_devices", False):
        devices = list_input_devices()
        if not as_json:
            if not devices:
                print("no audio input devices (PortAudio sees none); use --file FILE.wav")
            for d in devices:
                print(f"[{d['index']:>2}] {d['name']}  ({d['hostapi']}, {d['channels']} ch, "
                      f"{d['default_samplerate']:.0f} Hz)")
        return {"devices": devices, "count": len(devices)}
    if args.mqtt_topic and not args.broker:
        raise ValueError("--mqtt-topic needs --broker mqtt://HOST:PORT")
    if args.realtime and not args.file:
        raise ValueError("--realtime only applies with --file (a microphone is real time already)")
    stream = listen(args.model, file=args.file, device=args.device, runtime=args.runtime, window=args.window,
                    hop=args.hop, smooth=args.smooth, vad_db=args.vad_db, duration=args.duration,
                    realtime=args.realtime, samplerate=getattr(args, "samplerate", None))
    publisher = (_Publisher(args.broker, args.mqtt_topic, cafile=getattr(args, "cafile", None),
                            insecure=bool(getattr(args, "insecure", False))) if args.mqtt_topic else None)
    latencies: List[float] = []
    counts: Dict[str, int] = {}
    interrupted = False
    t0 = time.monotonic()
    if not as_json:
        print(f"listening: {stream.stats['device']} at {stream.source.rate} Hz -> 16 kHz, window "
              f"{stream.scfg.window:g} s, hop {stream.scfg.hop:g} s, runtime {stream.stats['runtime']} "
              "(Ctrl-C stops)", flush=True)
        print(f"{'window':>15}  {'emotion':<10} {'top probabilities':<40} {'latency':>9}", flush=True)
    try:
        for r in stream:
            if as_json:
                print(json.dumps(r.to_dict(), sort_keys=True), flush=True)
            else:
                print(format_result(r), flush=True)
            if not r.silent:
                latencies.append(r.latency_ms)
                counts[r.emotion] = counts.get(r.emotion, 0) + 1
            if publisher:
                publisher.publish(r)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
        if publisher:
            publisher.close()
    st = stream.stats
    lat = np.asarray(latencies, dtype=np.float64)
    summary = {"hops": st["hops"], "skipped_silent": st["skipped_silent"], "overflows": st["overflows"],
               "dropped_samples": st["dropped_samples"], "reconnects": st["reconnects"],
               "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
               "latency_ms_p95": float(np.percentile(lat, 95)) if len(lat) else None,
               "emotions": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
               "runtime": st["runtime"], "device": st["device"], "device_rate": st["device_rate"],
               "wall_seconds": round(time.monotonic() - t0, 3), "interrupted": interrupted}
    if publisher:
        summary["published"] = publisher.published
    return summary
