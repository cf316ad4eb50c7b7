#!/usr/bin/env bash
# Set-up of a fresh machine: the Debian data package (Fashion-MNIST) and this suite with its test
# dependencies. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist
fi

python -m pip install -q --disable-pip-version-check -e '.[dev]'
