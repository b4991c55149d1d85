#!/usr/bin/env bash
# What the tests need beside pip's packages (the README's test command runs this):
# - web/node_modules from package-lock.json for the JavaScript step loop (onnxruntime-node brings its CPU
#   binaries in its package; its CUDA download is skipped) and a Chromium for the browser test;
# - qemu-user, which runs onnxruntime on an emulated x86 CPU without VNNI (tests/test_quant_non_vnni.py).
# Debian's chromium and qemu-user are installed with apt-get when run as root.
set -euo pipefail
cd "$(dirname "$0")/../web"
if ! command -v npm >/dev/null; then
  echo "tests/install-tools.sh: npm is needed (Node.js 20 or newer): install Node.js" >&2
  exit 1
fi
ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error
missing=()
if [ -z "${CHROME:-}" ] && ! [ -x /usr/bin/chromium ]; then missing+=(chromium); fi
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then missing+=(qemu-user); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "tests/install-tools.sh: the tests need ${missing[*]}: apt-get install ${missing[*]} (as root)" \
         "(for the browser test, CHROME may name a Chromium or Chrome binary instead)" >&2
    exit 1
  fi
fi
