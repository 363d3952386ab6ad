#!/bin/sh
# Install MediaStream and run it on its three built-in demo streams (http://localhost:8107/).
# Debian 12, as root (or with sudo). Extra arguments go to `mediastream serve`.
set -eu
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/mediastream serve "$@"
