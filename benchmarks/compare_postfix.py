#!/usr/bin/env python3
"""mailpipe against Postfix + Dovecot: the recipient domain's slice (issue 3).

Both pipelines get the same load, in the same run, on the same machine::

    smtp-source -s SESSIONS -m N -l SIZE -f alice@sender.test -t bob@recipient.test HOST:PORT

* **mailpipe**: a lab started by this script (its own subnet, ``127.<subnet>.x.y``,
  in a temporary home) with only the agents the slice needs: the lab DNS (SPF
  and DMARC lookups), ``mta.recipient.test`` (SMTP, 1025) and
  ``mda.recipient.test`` (LMTP 1024 into the Maildir, IMAP 1143).
* **Postfix**: a private Postfix (smtpd on 127.0.0.1) delivering over LMTP
  (unix socket) to a private Dovecot that serves IMAP on 127.0.0.1, both in
  their own temporary directory, with their own config and ports; nothing in
  /etc is used or changed. Adapted from /work/shared/reference/start.sh and
  stop.sh (the team's Postfix yardstick); the Maildir wait is the idea of
  /work/shared/reference/lib/maildir_wait.py.

For each side the clock starts when smtp-source starts and stops when Bob's
IMAP server reports all N new messages in INBOX (``STATUS INBOX (MESSAGES)``,
over STARTTLS with the lab CA for mailpipe, plain for the private Dovecot).
While the load runs, the script counts files in the Maildir (``new/`` +
``cur/``, every 50 ms) and only then asks IMAP, so we also get "accepted"
(smtp-source exited: every message had its 250) and "in the Maildir" times.
Rates are N / seconds; the headline ratio is mailpipe / Postfix on
"visible over IMAP". Target (issue 3): ratio >= 0.5.

What differs, on purpose or by nature (see benchmarks/README.md):
smtp-source connects from 127.0.0.1, which is not sender.test's address, so
SPF fails; sender.test's DMARC policy is ``reject`` in the default lab, so the
benchmark lab sets it to ``none`` (the MTA still runs SPF, DKIM and DMARC on
every message and writes Authentication-Results; it then delivers to INBOX).
The messages carry no DKIM signature, so no RSA verification happens, unlike
mail relayed by mta.sender.test. Rate limits ([security]) are switched off.

Needs: Debian's postfix (smtp-source, postfix), dovecot-imapd, dovecot-lmtpd,
and root for the Postfix side (``--skip-postfix`` to run mailpipe only).

    sudo .venv/bin/python benchmarks/compare_postfix.py --messages 2000 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import imaplib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agents.bench import benchmark_config  # noqa: E402
from agents.config import LabConfig  # noqa: E402
from agents.lab import Lab, tcp_port_free  # noqa: E402

APT = "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix dovecot-imapd dovecot-lmtpd"
SENDER, RCPT = "alice@sender.test", "bob@recipient.test"
SMTP_SOURCE = "/usr/sbin/smtp-source"
# The private Postfix/Dovecot listen on 127.0.0.1 like the reference does, but on
# other ports than the reference (2525/2143/2424), so both can run side by side.
PF_SMTP_PORT = 2625
DV_IMAP_PORT = 2243
DV_PASSWORD = "lab"
MAILUID = MAILGID = 5000  # numeric, no passwd entry needed (as in the reference)
SLICE_AGENTS = ("dns", "mda.recipient.test", "mta.recipient.test")


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# -- prerequisites --------------------------------------------------------------------

def missing_tools(need_postfix: bool) -> list[str]:
    need = {SMTP_SOURCE: "postfix"}
    if need_postfix:
        need.update({
            "/usr/sbin/postfix": "postfix", "/usr/sbin/postconf": "postfix",
            "/usr/sbin/dovecot": "dovecot-core", "/usr/lib/dovecot/imap": "dovecot-imapd",
            "/usr/lib/dovecot/lmtp": "dovecot-lmtpd",
        })
    return sorted({pkg for path, pkg in need.items() if not os.access(path, os.X_OK)})


def alive(pid: int | None) -> bool:
    """pid exists and is not a zombie (from the reference's stop.sh)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


# -- measuring --------------------------------------------------------------------

def count_maildir(path: Path) -> int:
    n = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(path / sub) as it:
                n += sum(1 for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            pass
    return n


def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


class ImapCounter:
    """One logged-in IMAP session, opened before the load starts; counts INBOX."""

    def __init__(self, host: str, port: int, user: str, password: str, ca_cert: Path | None = None):
        self.imap = imaplib.IMAP4(host, port, timeout=30)
        if ca_cert is not None:
            # imaplib checks the certificate against the address it dialled: the
            # lab certificates carry the domain's IP address too (agents.pki).
            self.imap.starttls(ssl_context=ssl.create_default_context(cafile=str(ca_cert)))
        self.imap.login(user, password)

    def count(self, folder: str = "INBOX") -> int:
        typ, data = self.imap.status(folder, "(MESSAGES)")
        if typ != "OK":
            raise BenchError(f"IMAP STATUS {folder}: {typ} {data}")
        text = data[0].decode() if isinstance(data[0], bytes) else str(data[0])
        return int(text.rsplit("MESSAGES", 1)[1].strip(" )"))

    def close(self) -> None:
        try:
            self.imap.logout()
        except Exception:  # noqa: BLE001
            pass


def drive(target: tuple[str, int], maildir: Path, imap: ImapCounter, n: int, sessions: int,
          size: int, timeout: float) -> dict:
    """Run smtp-source into ``target``; wait until n more messages are visible over IMAP."""
    base_files = count_maildir(maildir)
    base_imap = imap.count()
    subprocess.run(["sync"], check=False)
    time.sleep(1.0)  # settle, as the reference's bench_accept.sh does
    load_before = os.getloadavg()[0]  # others' work on the machine shows up here
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(n), "-l", str(size),
           "-f", SENDER, "-t", RCPT, f"{target[0]}:{target[1]}"]
    c0 = cpu_times()
    t0 = time.monotonic()
    deadline = t0 + timeout
    src = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_accept = t_first = t_files = t_imap = None
    files = base_files
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if t_accept is None and src.poll() is not None:
                t_accept = now
                if src.returncode != 0:
                    raise BenchError(f"smtp-source failed ({src.returncode}): "
                                     f"{(src.stderr.read() or src.stdout.read()).strip()[-500:]}")
            files = count_maildir(maildir)
            if t_first is None and files > base_files:
                t_first = now
            if files >= base_files + n:
                t_files = now
                break
            time.sleep(0.05)
        seen = base_imap
        while t_files is not None and time.monotonic() < deadline:
            seen = imap.count()
            if seen >= base_imap + n:
                t_imap = time.monotonic()
                break
            time.sleep(0.02)
        if t_accept is None:
            rc = src.wait(max(1.0, deadline - time.monotonic()))
            t_accept = time.monotonic()
            if rc != 0:
                raise BenchError(f"smtp-source failed ({rc}): {src.stderr.read().strip()[-500:]}")
    finally:
        if src.poll() is None:
            src.kill()
            src.wait()
    c1 = cpu_times()
    busy = 1 - (c1[1] - c0[1]) / max(1, c1[0] - c0[0])

    def rate(t):
        return round(n / (t - t0), 1) if t else None

    return {
        "messages": n, "sessions": sessions, "size": size,
        "accepted_s": round(t_accept - t0, 3) if t_accept else None,
        "in_maildir_s": round(t_files - t0, 3) if t_files else None,
        "visible_imap_s": round(t_imap - t0, 3) if t_imap else None,
        "first_file_s": round(t_first - t0, 3) if t_first else None,
        "accept_rate": rate(t_accept), "maildir_rate": rate(t_files), "imap_rate": rate(t_imap),
        "files": files - base_files, "imap_count": seen - base_imap,
        "cpu_busy": round(busy, 3), "loadavg_1m_before": round(load_before, 2),
        "complete": t_imap is not None,
    }


# -- mailpipe ------------------------------------------------------------------------

def bench_config(subnet: int, trace: bool) -> LabConfig:
    cfg = benchmark_config(LabConfig.load(None).relocated(subnet), trace)
    # smtp-source connects from 127.0.0.1: SPF of sender.test fails, and p=reject would
    # refuse every message. p=none keeps every check running and delivers to INBOX.
    domains = tuple(
        dataclasses.replace(d, options={**d.options, "dmarc_policy": "none"}) if d.name == "sender.test" else d
        for d in cfg.domains
    )
    return dataclasses.replace(cfg, domains=domains)


class MailpipeSlice:
    """The recipient domain's slice of a benchmark lab: DNS, mta.recipient.test, mda.recipient.test."""

    def __init__(self, args):
        self.cfg = bench_config(args.subnet, not args.no_trace)
        self.keep = args.keep
        self.home = self.lab = self.imap = None

    def start(self) -> None:
        cfg = self.cfg
        busy = [f"{s.address}:{p}" for s in cfg.agents() if s.name in SLICE_AGENTS
                for svc, p in s.ports.items() if svc != "dns" and not tcp_port_free(s.address, p)]
        if busy:
            raise BenchError(f"lab subnet {cfg.dns_address.rsplit('.', 2)[0]}.x.y is in use "
                             f"({', '.join(busy)}); try --subnet")
        t = time.monotonic()
        self.home = Path(tempfile.mkdtemp(prefix="mailpipe-bench-"))
        self.lab = Lab(self.home, cfg)
        self.lab.prepare()
        for name in SLICE_AGENTS:
            self.lab.start_agent(name)
        self.target = self.lab.endpoint("recipient.test", "smtp")
        self.maildir = self.lab.home.maildirs / "recipient.test" / "bob"
        host, port = self.lab.endpoint("recipient.test", "imap")
        self.imap = ImapCounter(host, port, RCPT, cfg.user(RCPT).password, ca_cert=self.lab.home.ca_cert)
        log(f"mailpipe slice up in {time.monotonic() - t:.1f} s (home {self.home}, "
            f"trace {'on' if cfg.trace else 'off'}; MTA {self.target[0]}:{self.target[1]})")

    def run(self, args) -> dict:
        r = drive(self.target, self.maildir, self.imap, args.messages, args.sessions, args.size, args.timeout)
        r["junk"] = count_maildir(self.maildir / ".Junk")
        return r

    def stop(self) -> None:
        if self.imap is not None:
            self.imap.close()
        if self.lab is not None:
            self.lab.down()
        if self.home is not None:
            if self.keep:
                log(f"kept mailpipe home {self.home}")
            else:
                shutil.rmtree(self.home, ignore_errors=True)


# -- Postfix + Dovecot (adapted from /work/shared/reference/start.sh) -----------------

DOVECOT_CONF = """\
# private Dovecot for benchmarks/compare_postfix.py (no includes from /etc/dovecot)
instance_name = mailpipe-bench-dovecot
base_dir = {ref}/dovecot/run
state_dir = {ref}/dovecot/state
log_path = {ref}/log/dovecot.log
info_log_path = {ref}/log/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 500
first_valid_gid = 500
mail_location = maildir:{ref}/mail/%n
mail_fsync = optimized
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {dvc}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {dvc}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@recipient.test
}}
"""

MAIN_CF = """\
# private Postfix for benchmarks/compare_postfix.py
compatibility_level = 3.6
queue_directory = {ref}/postfix/spool
data_directory = {ref}/postfix/data
mail_owner = postfix
maillog_file_prefixes = {ref}/log
maillog_file = {ref}/log/postfix.log
myhostname = ref.test
mydomain = ref.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
relayhost =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks_style = host
mynetworks = 127.0.0.0/8
biff = no
append_dot_mydomain = no
readme_directory = no
smtpd_banner = $myhostname ESMTP
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_client_restrictions =
smtpd_helo_restrictions =
smtpd_sender_restrictions =
smtpd_recipient_restrictions =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_tls_security_level = none
smtp_tls_security_level = none
lmtp_tls_security_level = none
smtpd_sasl_auth_enable = no
virtual_mailbox_domains = recipient.test
virtual_mailbox_maps = texthash:{pfc}/vmailbox
virtual_alias_maps =
virtual_transport = lmtp:unix:{ref}/dovecot/run/lmtp
"""

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{smtp_port} inet n   -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """Postfix (127.0.0.1:PF_SMTP_PORT) -> Dovecot LMTP (unix socket) -> Maildir; IMAP on DV_IMAP_PORT."""

    def __init__(self, args):
        self.keep = args.keep
        self.ref = None
        self.pf_pid = self.dv_pid = self.imap = None
        self.target = ("127.0.0.1", PF_SMTP_PORT)

    def start(self) -> None:
        for port in (PF_SMTP_PORT, DV_IMAP_PORT):
            if not tcp_port_free("127.0.0.1", port):
                raise BenchError(f"127.0.0.1:{port} is in use (another private Postfix/Dovecot?)")
        t = time.monotonic()
        ref = self.ref = Path(tempfile.mkdtemp(prefix="mailpipe-pfref-"))
        self.pfc, self.dvc = ref / "conf" / "postfix", ref / "conf" / "dovecot"
        self.maildir = ref / "mail" / "bob"
        for d in (self.pfc, self.dvc, ref / "postfix/spool", ref / "postfix/data", ref / "dovecot/run",
                  ref / "dovecot/state", ref / "log", ref / "mail"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (ref, ref / "conf", self.pfc, self.dvc, ref / "postfix", ref / "postfix/spool",
                  ref / "dovecot", ref / "log"):
            d.chmod(0o755)
        shutil.chown(ref / "postfix/data", "postfix", "root")
        (ref / "postfix/data").chmod(0o700)
        os.chown(ref / "mail", MAILUID, MAILGID)
        (ref / "mail").chmod(0o755)

        (self.dvc / "users").write_text(
            f"{RCPT}:{{PLAIN}}{DV_PASSWORD}:{MAILUID}:{MAILGID}::{ref}/mail/bob::\n")
        (self.dvc / "users").chmod(0o644)
        (self.dvc / "dovecot.conf").write_text(DOVECOT_CONF.format(ref=ref, dvc=self.dvc, imap_port=DV_IMAP_PORT))
        (self.pfc / "vmailbox").write_text(f"{RCPT} bob/\n")
        (self.pfc / "main.cf").write_text(MAIN_CF.format(ref=ref, pfc=self.pfc))
        (self.pfc / "master.cf").write_text(MASTER_CF.format(smtp_port=PF_SMTP_PORT))
        # Postfix re-reads a config/map file modified in the last ~2 s in 300 ms
        # cool-down steps; backdate them (a finding of the reference's start.sh).
        old = time.time() - 60
        for f in ("main.cf", "master.cf", "vmailbox"):
            os.utime(self.pfc / f, (old, old))

        errlog = open(ref / "log/start.err", "ab")
        subprocess.run(["/usr/sbin/dovecot", "-c", str(self.dvc / "dovecot.conf")],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog, check=True)
        deadline = time.monotonic() + 20
        self.dv_pid = self._read_pid(ref / "dovecot/run/master.pid", "dovecot", deadline)
        r = subprocess.run(["/usr/sbin/postfix", "-c", str(self.pfc), "start"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog)
        errlog.close()
        if r.returncode != 0:
            raise BenchError(f"postfix start failed, see {ref}/log/start.err "
                             f"({(ref / 'log/start.err').read_text()[-300:].strip()})")
        self.pf_pid = self._read_pid(ref / "postfix/spool/pid/master.pid", "postfix", deadline)
        for target in [("127.0.0.1", PF_SMTP_PORT), ("127.0.0.1", DV_IMAP_PORT), str(ref / "dovecot/run/lmtp")]:
            while not self._ready(target):
                if time.monotonic() > deadline:
                    raise BenchError(f"timeout waiting for {target}")
                time.sleep(0.02)
        self.imap = ImapCounter("127.0.0.1", DV_IMAP_PORT, RCPT, DV_PASSWORD)
        log(f"Postfix+Dovecot up in {time.monotonic() - t:.1f} s (dir {ref}; "
            f"smtpd 127.0.0.1:{PF_SMTP_PORT}, imap 127.0.0.1:{DV_IMAP_PORT})")

    def run(self, args) -> dict:
        return drive(self.target, self.maildir, self.imap, args.messages, args.sessions, args.size, args.timeout)

    @staticmethod
    def _read_pid(path: Path, name: str, deadline: float) -> int:
        """The master's pid, once the daemon has written it (both daemonize first)."""
        while True:
            try:
                return int(path.read_text().strip())
            except (FileNotFoundError, ValueError):
                if time.monotonic() > deadline:
                    raise BenchError(f"{name} wrote no {path}") from None
                time.sleep(0.02)

    @staticmethod
    def _ready(addr) -> bool:
        fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            try:
                s.connect(addr)
                return s.recv(200)[:1] in (b"2", b"*")
            except OSError:
                return False

    @staticmethod
    def _wait_gone(pid: int, name: str) -> None:
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            log(f"{name} pid {pid} still alive after 10 s, SIGKILL")
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop both by pid (as the reference's stop.sh does), then remove the directory."""
        if self.imap is not None:
            self.imap.close()
        if alive(self.pf_pid):
            r = subprocess.run(["/usr/sbin/postfix", "-c", str(self.pfc), "stop"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode != 0:
                os.kill(self.pf_pid, signal.SIGTERM)
            self._wait_gone(self.pf_pid, "postfix")
        if alive(self.dv_pid):
            os.kill(self.dv_pid, signal.SIGTERM)
            self._wait_gone(self.dv_pid, "dovecot")
        if self.ref is None:
            return
        if self.keep:
            log(f"kept Postfix/Dovecot directory {self.ref}")
        else:
            shutil.rmtree(self.ref, ignore_errors=True)


# -- report ---------------------------------------------------------------------------

def summary(r: dict) -> str:
    if not r["complete"]:
        return (f"INCOMPLETE after timeout: {r['files']} files, {r['imap_count']} over IMAP "
                f"of {r['messages']}")
    return (f"accepted {r['accepted_s']:.2f} s ({r['accept_rate']:.0f}/s), "
            f"in Maildir {r['in_maildir_s']:.2f} s ({r['maildir_rate']:.0f}/s), "
            f"visible over IMAP {r['visible_imap_s']:.2f} s ({r['imap_rate']:.0f}/s), cpu {r['cpu_busy']:.0%}")


def median_of(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 1) if vals else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", "-n", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--size", type=int, default=2048, help="payload bytes per message (smtp-source -l)")
    p.add_argument("--runs", type=int, default=1, help="runs per side (the median is reported)")
    p.add_argument("--skip-postfix", action="store_true", help="measure mailpipe only")
    p.add_argument("--skip-mailpipe", action="store_true", help="measure Postfix only")
    p.add_argument("--subnet", type=int, default=88, help="the benchmark lab runs on 127.SUBNET.x.y")
    p.add_argument("--no-trace", action="store_true", help="run the lab with trace = false")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per run before giving up (default 60 + N/20)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.timeout is None:
        args.timeout = 60 + args.messages / 20

    need_postfix = not args.skip_postfix
    missing = missing_tools(need_postfix)
    if missing:
        print(f"missing: {', '.join(missing)}; install with:\n  sudo {APT}", file=sys.stderr)
        return 2
    if need_postfix and os.geteuid() != 0:
        print("the Postfix side needs root (postfix start); run with sudo, or --skip-postfix",
              file=sys.stderr)
        return 2

    out = {"host": platform.node(), "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "load": {"messages": args.messages, "sessions": args.sessions, "size": args.size,
                    "runs": args.runs, "smtp_source": f"-s {args.sessions} -m {args.messages} -l {args.size} "
                                                       f"-f {SENDER} -t {RCPT}"}}
    sides = {}
    if not args.skip_mailpipe:
        sides["mailpipe"] = MailpipeSlice(args)
    if need_postfix:
        sides["postfix"] = PrivatePostfix(args)
    for side in sides:
        out[side] = {"runs": []}
    if "mailpipe" in out:
        out["mailpipe"]["trace"] = not args.no_trace
    try:
        # Both pipelines are up for the whole run (idle while the other is measured)
        # and take turns, the order alternating, so background load hits both alike.
        for pipeline in sides.values():
            pipeline.start()
        order = list(sides)
        for run in range(args.runs):
            for side in (order if run % 2 == 0 else order[::-1]):
                r = sides[side].run(args)
                out[side]["runs"].append(r)
                log(f"{side} run {run + 1}: {summary(r)}")
                if not r["complete"]:
                    raise BenchError(f"{side} did not deliver every message in {args.timeout:.0f} s")
    except BenchError as e:
        print(f"compare_postfix: {e}", file=sys.stderr)
        out["error"] = str(e)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 1
    finally:
        for pipeline in sides.values():
            pipeline.stop()

    print(f"\nrecipient slice: smtp-source {out['load']['smtp_source']}  "
          f"({args.runs} run(s) each, median; {os.cpu_count()} CPUs)")
    print(f"{'':10} {'accepted':>12} {'in Maildir':>12} {'IMAP visible':>13}   msg/s")
    for side in ("mailpipe", "postfix"):
        if side in out:
            runs = out[side]["runs"]
            out[side].update({k: median_of(runs, k) for k in ("accept_rate", "maildir_rate", "imap_rate")})
            out[side]["complete"] = all(r["complete"] for r in runs)
            fmt = lambda v: f"{v:12.0f}" if v is not None else f"{'-':>12}"  # noqa: E731
            print(f"{side:10} {fmt(out[side]['accept_rate'])} {fmt(out[side]['maildir_rate'])} "
                  f"{fmt(out[side]['imap_rate'])} ")
    if "mailpipe" in out and "postfix" in out and out["mailpipe"]["imap_rate"] and out["postfix"]["imap_rate"]:
        ratio = out["mailpipe"]["imap_rate"] / out["postfix"]["imap_rate"]
        out["ratio"] = round(ratio, 3)
        out["target_met"] = ratio >= 0.5
        print(f"ratio mailpipe/postfix (IMAP visible): {ratio:.2f}x  "
              f"(target >= 0.5x: {'met' if ratio >= 0.5 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    complete = all(out[s]["complete"] for s in ("mailpipe", "postfix") if s in out)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
