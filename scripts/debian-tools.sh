#!/usr/bin/env bash
# Install the Debian tools the interop tests use, when they are missing.
# swaks: an independent SMTP client; curl: SMTP, IMAP and POP3 URLs.
# postfix, dovecot-imapd, dovecot-lmtpd: the reference implementations that
# tests/test_interop_chunking.py and tests/test_benchmarks.py run privately on
# loopback (skipped without them, so their install is best effort).
set -euo pipefail
need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v curl  >/dev/null 2>&1 || need+=(curl)
reference=()
[ -x /usr/sbin/smtp-source ] || reference+=(postfix)
[ -x /usr/sbin/dovecot ] || reference+=(dovecot-imapd dovecot-lmtpd)
[ ${#need[@]} -eq 0 ] && [ ${#reference[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  [ ${#need[@]} -eq 0 ] && exit 0
  echo "debian-tools: please install ${need[*]} (no apt-get here); the interop tests need them" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  echo "debian-tools: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ${#reference[@]} -gt 0 ]; then
  echo "debian-tools: installing ${reference[*]} (no system daemon is configured or started)"
  # The tests start their own Postfix and Dovecot on 127.0.0.1 with private
  # configs. No system MTA may come up on port 25 or IMAP on 143: Postfix
  # gets "No configuration", and policy-rc.d forbids starting any service
  # while the packages install.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    added_policy=yes
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${reference[@]}" >/dev/null \
    || echo "debian-tools: could not install ${reference[*]}; the tests that need them will be skipped" >&2
  [ -n "$added_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi
exit 0
