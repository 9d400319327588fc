#!/usr/bin/env bash
# Install edge-ser on a Raspberry Pi (64-bit Raspberry Pi OS / Debian bookworm, aarch64) as a device agent.
# Usage: sudo ./install.sh [PATH_TO_edge-ser_SOURCE_OR_WHEEL]   (run from a checkout: defaults to ..)
set -euo pipefail
SRC="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
PREFIX=/opt/edge-ser
USER_NAME=edge-ser
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip libsndfile1 libportaudio2 ca-certificates
id -u "$USER_NAME" >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/edge-ser --groups audio "$USER_NAME"
python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --upgrade pip
# CPU-only torch for train-local (never the CUDA build); inference needs only onnxruntime
"$PREFIX/bin/pip" install torch --index-url https://download.pytorch.org/whl/cpu
"$PREFIX/bin/pip" install "$SRC"
# TFLite runtime: ai-edge-litert where wheels exist, else tflite-runtime (optional)
"$PREFIX/bin/pip" install ai-edge-litert || "$PREFIX/bin/pip" install tflite-runtime || echo "no TFLite runtime (optional)"
install -d -o "$USER_NAME" -g "$USER_NAME" /var/lib/edge-ser /etc/edge-ser
[ -f /etc/edge-ser/device.toml ] || install -m 0644 "$(dirname "$0")/device.toml" /etc/edge-ser/device.toml
install -m 0644 "$(dirname "$0")/edge-ser-agent.service" /etc/systemd/system/edge-ser-agent.service
systemctl daemon-reload
"$PREFIX/bin/edge-ser" doctor || true
echo "copy the server's signing.pub and the broker's ca.crt to /etc/edge-ser/, put this device's MQTT password in"
echo "/etc/edge-ser/mqtt.password (mode 0600, owner edge-ser), edit /etc/edge-ser/device.toml (broker, username), then:"
echo "  systemctl enable --now edge-ser-agent"
