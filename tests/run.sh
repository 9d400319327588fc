#!/usr/bin/env bash
# One command to run the test suite on a fresh Debian/Ubuntu machine:
#   bash tests/run.sh            the fast tier (tests not marked slow: still real mosquitto, ONNX Runtime and a
#                                real corpus slice where present), a few minutes
#   bash tests/run.sh --full     every test (what CI runs)
#   bash tests/run.sh --lint     ruff check only
# Extra pytest arguments are passed through, e.g. -k pack. It installs the system packages the real-component tests
# need (mosquitto broker, PortAudio, ALSA utilities) when run as root, makes ./.venv with the CPU build of torch and
# edge-ser[all,test] and ruff, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="mosquitto libportaudio2 alsa-utils libasound2-plugins pulseaudio openssl"
missing=""
for p in $SYSTEM_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "== missing system packages:$missing (run: sudo apt-get install$missing); dependent tests will skip"
  fi
fi
# the broker is started by the tests themselves on 127.0.0.1; make sure a distro service is not in the way
command -v systemctl >/dev/null 2>&1 && systemctl stop mosquitto >/dev/null 2>&1 || true

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build, so nothing pulls a multi-GB CUDA build
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[all,test]"

tier=fast
args=()
for arg in "$@"; do
  case "$arg" in
    --full) tier=full ;;
    --lint) tier=lint ;;
    *) args+=("$arg") ;;
  esac
done
if [ "$tier" = lint ]; then
  echo "== ruff check"
  exec python -m ruff check .
fi
if [ "$tier" = full ]; then
  echo "== running every test"
  exec python -m pytest -q ${args[@]+"${args[@]}"}
fi
echo "== running the fast tier (bash tests/run.sh --full runs every test)"
exec python -m pytest -q -m "not slow" ${args[@]+"${args[@]}"}
