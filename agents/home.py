"""The lab home: one directory that holds everything a running lab owns.

Layout (created by ``mailpipe up``)::

    HOME/config.toml          the lab config the agents were started with
    HOME/users.json           lab users, passwords as salted scrypt hashes
    HOME/pki/ca.pem           the lab certificate authority (trust this)
    HOME/pki/<domain>.pem     each domain's certificate and key
    HOME/dkim/<domain>/<selector>.private|.txt   each domain's DKIM key and its TXT record
    HOME/spool/<agent>/       each queueing agent's durable spool
    HOME/maildir/<domain>/<user>/   one Maildir per user (cur, new, tmp)
    HOME/trace/<agent>.jsonl  trace events, one JSON object per line
    HOME/log/<agent>.log      each agent's own log (stdout and stderr)
    HOME/run/<agent>.pid      pid of each running agent

``--home DIR`` wins, then ``$MAILPIPE_HOME``, then ``~/.mailpipe/lab``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("~/.mailpipe/lab")


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """Pick the lab home: explicit argument, then $MAILPIPE_HOME, then the default."""
    if home is None:
        home = os.environ.get("MAILPIPE_HOME") or DEFAULT_HOME
    return Path(home).expanduser().resolve()


@dataclass(frozen=True)
class LabHome:
    root: Path

    @classmethod
    def at(cls, home: str | os.PathLike | None = None) -> "LabHome":
        return cls(resolve_home(home))

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def users_file(self) -> Path:
        return self.root / "users.json"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.pem"

    def domain_cert(self, domain: str) -> Path:
        return self.pki / f"{domain}.pem"

    def spool(self, agent: str) -> Path:
        return self.root / "spool" / agent

    @property
    def maildirs(self) -> Path:
        return self.root / "maildir"

    def trace_file(self, agent: str) -> Path:
        return self.root / "trace" / f"{agent}.jsonl"

    @property
    def trace_dir(self) -> Path:
        return self.root / "trace"

    def log_file(self, agent: str) -> Path:
        return self.root / "log" / f"{agent}.log"

    def pid_file(self, agent: str) -> Path:
        return self.root / "run" / f"{agent}.pid"

    def make_dirs(self) -> None:
        for sub in ("pki", "spool", "maildir", "trace", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
