#!/usr/bin/env bash
# What the JavaScript tests need beside pip's packages (the README's test command runs this):
# web/node_modules from package-lock.json (onnxruntime-node brings its CPU binaries in its package; its
# CUDA download is skipped) and a Chromium for the browser test (Debian's, installed when run as root).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v npm >/dev/null; then
  echo "web/install-test-tools.sh: npm is needed (Node.js 20 or newer): install Node.js" >&2
  exit 1
fi
ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error
if [ -z "${CHROME:-}" ] && ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "web/install-test-tools.sh: the browser test needs Chromium: apt-get install chromium (as root), or set" \
         "CHROME to a Chromium or Chrome binary" >&2
    exit 1
  fi
fi
