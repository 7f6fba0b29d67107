#!/usr/bin/env bash
# Install the Debian tools the interop tests use, when they are missing.
# swaks: an independent SMTP client; curl: SMTP, IMAP and POP3 URLs.
set -euo pipefail
need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v curl  >/dev/null 2>&1 || need+=(curl)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "debian-tools: please install ${need[*]} (no apt-get here); the interop tests need them" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "debian-tools: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
