#!/bin/sh
# Install everything the tests need (Debian packages included) and run the whole suite:
# Python unit, integration and browser tests, the JavaScript unit tests, lint and types.
# Debian 12, as root (or with sudo). Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Debian packages:
#   chromium                     the real browser for the end-to-end tests
#   ffmpeg                       test media files
#   python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-*
#                                the real RTSP camera (GStreamer's RTSP server, test patterns,
#                                x264enc in -ugly, avenc_aac in -libav, timeoverlay in -x)
#   coturn                       a real TURN server (relay-only playback test)
#   redis-server                 a real Redis for the cluster tests (leases, the bus)
#   nodejs                       the JavaScript unit tests (node --test)
#   python3-venv                 the virtual environment
#   openssl                      the relay TLS tests make a CA and node certificates
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    python3-venv chromium ffmpeg coturn redis-server openssl \
    python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-tools \
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
    gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-x

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
# Node.js for the JavaScript unit tests: Debian's if none is installed yet (any 18+ works).
command -v node >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q nodejs

# npm packages (pinned by package-lock.json): TypeScript, which checks the browser scripts (a dev
# tool only: the pages load web/static/js as written), and the WHEP player library the browser
# tests serve to Chromium, so before pytest. npm is Debian's if there is none yet.
command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q npm
npm ci --no-audit --no-fund

.venv/bin/python -m pytest "$@"
npx tsc --noEmit -p .
node --test tests/js/
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
