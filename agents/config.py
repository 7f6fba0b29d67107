"""The lab configuration: which domains exist, where they live, who the users are.

A lab is described by one TOML file (``default_lab.toml`` ships inside the
package; ``--config FILE`` overrides it). Every agent reads the same file, so
the whole topology sits in one documented place. Everything else, the DNS
zone, the certificates, the Maildirs, is derived from it.

Host names follow one convention for every domain ``D``::

    mx.D     the MTA (the target of D's MX record, RFC 5321 5.1)
    smtp.D   the MSA, where D's users submit mail (RFC 6409)
    lmtp.D   the MDA's LMTP listener (RFC 2033), only D's MTA talks to it
    imap.D   the MDA's IMAP4rev1 and POP3 listeners
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

#: The services an agent can listen on, with their standard ports.
STANDARD_PORTS = {
    "dns": 53,
    "submission": 587,
    "submissions": 465,
    "smtp": 25,
    "lmtp": 24,
    "imap": 143,
    "imaps": 993,
    "pop3": 110,
    "pop3s": 995,
}

#: Which services each role offers.
ROLE_SERVICES = {
    "dns": ("dns",),
    "msa": ("submission", "submissions"),
    "mta": ("smtp",),
    "mda": ("lmtp", "imap", "imaps", "pop3", "pop3s"),
}

#: Which host name (see the module docstring) each role answers to.
ROLE_HOST = {"msa": "smtp", "mta": "mx", "mda": "imap"}

#: On/off keys of a ``[[domain]]`` table, each on unless the table says
#: ``false`` (see ``default_lab.toml``). They are what a provider's admin
#: decides for its own agents, and each has a measurable cost (benchmarks/):
#:
#: ``relay_tls``          its MSA and MTA use STARTTLS to the next SMTP hop when
#:                        offered (RFC 3207; Postfix's ``smtp_tls_security_level = may``)
#: ``dkim_sign``          its MTA DKIM-signs mail it relays to other domains (RFC 6376)
#: ``check_sender_auth``  its MTA checks SPF, DKIM and DMARC on mail from other
#:                        domains (RFC 7208, 6376, 7489)
DOMAIN_SWITCHES = ("relay_tls", "dkim_sign", "check_sender_auth")


class ConfigError(ValueError):
    """The lab configuration is malformed; the message says what to fix."""


@dataclass(frozen=True)
class Domain:
    """One mail domain of the lab: a small provider with MSA, MTA and MDA."""

    name: str
    address: str
    #: False for a domain that only sends (it still gets an MTA and DNS records).
    has_mailboxes: bool = True
    #: Any other keys of the domain's ``[[domain]]`` table (DMARC policy, extra
    #: MX hosts...), for the modules that use them.
    options: dict = field(default_factory=dict, compare=False, hash=False)

    def switch(self, name: str) -> bool:
        """One of :data:`DOMAIN_SWITCHES`: on unless the domain's table says false."""
        if name not in DOMAIN_SWITCHES:
            raise KeyError(name)
        return self.options.get(name, True)

    def host(self, role: str) -> str:
        """The DNS name of this domain's agent with the given role."""
        prefix = {"msa": "smtp", "mta": "mx", "mda": "imap", "lmtp": "lmtp"}[role]
        return f"{prefix}.{self.name}"


@dataclass(frozen=True)
class User:
    address: str
    password: str

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0]


@dataclass(frozen=True)
class AgentSpec:
    """One agent process of the lab: its name, role and what it listens on."""

    name: str
    role: str
    domain: str | None
    address: str
    ports: dict[str, int] = field(default_factory=dict)

    def endpoints(self) -> dict[str, str]:
        return {svc: f"{self.address}:{port}" for svc, port in self.ports.items()}


@dataclass(frozen=True)
class LabConfig:
    """The whole lab, as read from TOML (see ``default_lab.toml``)."""

    dns_address: str
    ports: dict[str, int]
    domains: tuple[Domain, ...]
    users: tuple[User, ...]
    ttl: int = 60
    # Without [lab] values, the queue schedule is Postfix's (agents.queue):
    # retry after 300 s, doubling to 4000 s, give up after 5 days.
    retry_min: float = 300.0
    retry_max: float = 4000.0
    queue_lifetime: float = 5 * 24 * 3600.0
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    trace: bool = True
    #: Other top-level tables (``[security]``, ``[queue]``, ``[hooks]``...),
    #: read by the module they belong to through :meth:`section`.
    sections: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = "<default>"

    # -- loading -----------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "LabConfig":
        """Read a lab config file; ``None`` means the default lab."""
        if path is None:
            text = resources.files("agents").joinpath("default_lab.toml").read_text()
            source = "<default>"
        else:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read lab config {path}: {e.strerror}") from None
            source = str(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "LabConfig":
        lab = data.get("lab", {})
        ports = dict(STANDARD_PORTS)
        ports = {k: v + 1000 for k, v in ports.items()}
        ports.update(data.get("ports", {}))
        unknown = set(ports) - set(STANDARD_PORTS)
        if unknown:
            raise ConfigError(f"{source}: unknown service(s) in [ports]: {sorted(unknown)}")
        domains = tuple(
            Domain(
                d["name"].lower(),
                d["address"],
                d.get("has_mailboxes", True),
                {k: v for k, v in d.items() if k not in ("name", "address", "has_mailboxes")},
            )
            for d in data.get("domain", [])
        )
        users = tuple(User(u["address"], u["password"]) for u in data.get("user", []))
        config = cls(
            dns_address=lab.get("dns", "127.0.0.1"),
            ports=ports,
            domains=domains,
            users=users,
            ttl=int(lab.get("ttl", 60)),
            retry_min=float(lab.get("retry_min", cls.retry_min)),
            retry_max=float(lab.get("retry_max", cls.retry_max)),
            queue_lifetime=float(lab.get("queue_lifetime", cls.queue_lifetime)),
            max_message_size=int(lab.get("max_message_size", 10 * 1024 * 1024)),
            max_recipients=int(lab.get("max_recipients", 100)),
            trace=bool(lab.get("trace", True)),
            sections={k: v for k, v in data.items() if k not in ("lab", "ports", "domain", "user")},
            source=source,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse anything that would leave loopback or confuse the lab."""
        backups = [d.options["backup_mx"] for d in self.domains if d.options.get("backup_mx")]
        for addr in [self.dns_address] + [d.address for d in self.domains] + backups:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                raise ConfigError(f"{self.source}: {addr!r} is not an IP address") from None
            if not ip.is_loopback:
                raise ConfigError(
                    f"{self.source}: {addr} is not a loopback address; "
                    "the lab binds 127.0.0.0/8 only"
                )
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.source}: a domain is listed twice")
        for d in self.domains:
            for name in DOMAIN_SWITCHES:
                if not isinstance(d.options.get(name, True), bool):
                    raise ConfigError(f"{self.source}: {d.name}: {name} must be true or false, "
                                      f"not {d.options[name]!r}")
        for user in self.users:
            if "@" not in user.address:
                raise ConfigError(f"{self.source}: user {user.address!r} has no domain")
            if user.domain not in names:
                raise ConfigError(
                    f"{self.source}: user {user.address} belongs to no lab domain"
                )

    # -- questions agents ask ----------------------------------------------

    def section(self, name: str) -> dict:
        """The raw ``[name]`` table of the config (empty if absent)."""
        return dict(self.sections.get(name, {}))

    def domain(self, name: str) -> Domain:
        name = name.lower()
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(name)

    def is_local_domain(self, name: str) -> bool:
        return any(d.name == name.lower() for d in self.domains)

    def users_of(self, domain: str) -> list[User]:
        return [u for u in self.users if u.domain == domain.lower()]

    def user(self, address: str) -> User | None:
        for u in self.users:
            if u.address.lower() == address.lower():
                return u
        return None

    @property
    def dns_server(self) -> tuple[str, int]:
        return (self.dns_address, self.ports["dns"])

    def agents(self) -> list[AgentSpec]:
        """Every agent process of the lab, in the order they are started."""
        out = [AgentSpec("dns", "dns", None, self.dns_address, {"dns": self.ports["dns"]})]
        for d in self.domains:
            if d.options.get("null_mx"):
                continue  # RFC 7505: it takes no mail, so it runs no agents (agents.exchangers)
            for role in ("mda", "mta", "msa"):
                if role in ("mda", "msa") and not d.has_mailboxes:
                    continue
                ports = {svc: self.ports[svc] for svc in ROLE_SERVICES[role]}
                out.append(AgentSpec(f"{role}.{d.name}", role, d.name, d.address, ports))
                if role == "mta" and d.options.get("backup_mx"):  # its backup MX, mx2.D
                    out.append(AgentSpec(f"mta2.{d.name}", "mta", d.name, d.options["backup_mx"], ports))
        return out

    def agent(self, name: str) -> AgentSpec:
        for spec in self.agents():
            if spec.name == name:
                return spec
        raise KeyError(name)

    # -- variants ----------------------------------------------------------

    def relocated(self, subnet: int) -> "LabConfig":
        """The same lab moved to ``127.<subnet>.x.y`` so two labs can run side by side."""
        if not 0 <= subnet <= 255:
            raise ConfigError("subnet must be 0..255")

        def move(addr: str) -> str:
            parts = addr.split(".")
            return ".".join([parts[0], str(subnet), parts[2], parts[3]])

        def move_domain(d: Domain) -> Domain:
            options = dict(d.options)
            if options.get("backup_mx"):
                options["backup_mx"] = move(options["backup_mx"])
            return replace(d, address=move(d.address), options=options)

        return replace(
            self,
            dns_address=move(self.dns_address),
            domains=tuple(move_domain(d) for d in self.domains),
        )

    def to_toml(self) -> str:
        """Write this config back as TOML (used to hand a test lab to its agents)."""
        lines = ["[lab]", f'dns = "{self.dns_address}"', f"ttl = {self.ttl}"]
        lines += [
            f"retry_min = {self.retry_min}",
            f"retry_max = {self.retry_max}",
            f"queue_lifetime = {self.queue_lifetime}",
            f"max_message_size = {self.max_message_size}",
            f"max_recipients = {self.max_recipients}",
            f"trace = {'true' if self.trace else 'false'}",
            "",
            "[ports]",
        ]
        lines += [f"{k} = {v}" for k, v in self.ports.items()]
        for d in self.domains:
            lines += ["", "[[domain]]", f'name = "{d.name}"', f'address = "{d.address}"']
            if not d.has_mailboxes:
                lines.append("has_mailboxes = false")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.options.items()]
        for u in self.users:
            lines += ["", "[[user]]", f'address = "{u.address}"', f'password = "{u.password}"']
        for name, table in self.sections.items():
            lines += ["", f"[{name}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    """A bare key if it can be one; else quoted (``"mta.recipient.test"`` is one key, not three)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value) -> str:
    """A TOML literal for the simple values a lab config holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} to TOML")
