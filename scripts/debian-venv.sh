#!/usr/bin/env bash
# `python3 -m venv` failed: on Debian and Ubuntu the venv module's pip
# (ensurepip) is a package of its own, python3-venv, that a fresh machine may
# lack. Install it (apt-get, as root or with sudo) so that `make` can go on.
set -euo pipefail
if ! command -v apt-get >/dev/null 2>&1; then
  echo "debian-venv: python3 cannot make a venv here; install its venv module (and pip) and run make again" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "debian-venv: installing python3-venv (python3 -m venv needs it on Debian)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
