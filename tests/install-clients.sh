#!/usr/bin/env bash
# Installs the official OpenTelemetry SDKs that the end-to-end tests use as clients:
# Python (pip) and JavaScript (npm, from tests/node/package-lock.json).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m pip install -q --disable-pip-version-check -r "$here/python/requirements.txt"
npm ci --prefix "$here/node" --no-audit --no-fund --silent
