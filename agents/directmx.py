"""Sending straight to a mail exchanger, as an MTA (or a spammer) does.

A mail client normally submits to its own provider's MSA, with a password
(:mod:`agents.mua`). Nothing stops a program from skipping that and talking
SMTP directly to the recipient domain's MX on port 25, from any address,
with any ``MAIL FROM`` and any ``From:``: that is how every MTA delivers, and
how forged mail is sent. The receiving MX cannot ask for a password; all it
can do is check SPF, DKIM and DMARC (:mod:`agents.senderauth`).

``mailpipe send --direct-mx`` does this for the spoofing lesson::

    mailpipe send --from alice@sender.test --to bob@recipient.test \\
        --direct-mx --source-address 127.0.3.1      # from attacker.test's address

``--direct-mx DOMAIN`` connects to DOMAIN's MX instead of the recipient's: a
client on ``attacker.test``'s address sending through ``mx.attacker.test``
is that MTA's own client, so it relays (and DKIM-signs) the message.
"""

from __future__ import annotations

from twisted.internet import defer

from .headers import rfc5322_date
from .resolver import LabResolver
from .smtpclient import SMTPDeliveryError
from .smtpclient import send as smtp_send
from .trace import Tracer


def default_helo(config, source_address: str | None) -> str:
    """The name to say in EHLO: the MX name of the lab domain owning the source address."""
    for d in config.domains:
        if d.address == source_address:
            return d.host("mta")
    return "client.example"


@defer.inlineCallbacks
def send_direct(reactor, home, config, *, mail_from: str, to: list[str], content: bytes,
                via: str | None = None, source_address: str | None = None, helo: str | None = None):
    """Deliver ``content`` over SMTP to the MX of ``via`` (default: the recipients' domain).

    Fires with the same report as :meth:`agents.mua.MUA.submit`; a refusal
    (such as ``550 5.7.1`` from DMARC) is part of the report, not an error.
    """
    domains = {r.rpartition("@")[2].lower() for r in to}
    target = (via or "").lower() or (domains.pop() if len(domains) == 1 else None)
    if target is None:
        raise ValueError("recipients in several domains: name the MX to use with --direct-mx DOMAIN")
    tracer = Tracer(home.trace_file("mua") if config.trace else None, "mua", "mua", target)
    resolver = LabResolver(config.dns_server, reactor=reactor, tracer=tracer)
    exchangers = yield resolver.mail_exchangers(target)
    if not exchangers:
        raise ValueError(f"{target} has no mail exchanger in the lab DNS")
    _pref, host, ips = exchangers[0]
    port = config.ports["smtp"]
    if b"\r\nDate:" not in b"\r\n" + content.partition(b"\r\n\r\n")[0]:
        content = f"Date: {rfc5322_date()}\r\n".encode() + content  # no MSA on this path to add it
    helo = helo or default_helo(config, source_address)
    try:
        result = yield smtp_send(
            reactor, ips[0], port, helo=helo, mail_from=mail_from, rcpt_tos=to, content=content,
            tls="opportunistic", tls_hostname=host, ca_cert=home.ca_cert,
            bind_address=source_address, tracer=tracer,
        )
        recipients = [{"address": r.address, "code": r.code, "status": r.status, "text": r.text}
                      for r in result.recipients]
    except SMTPDeliveryError as e:
        known = {r.address: r for r in getattr(e, "recipients", None) or []}
        recipients = [{"address": a, "code": (known[a].code if a in known else e.code) or 451,
                       "status": known[a].status if a in known else e.status,
                       "text": known[a].text if a in known else e.text} for a in to]
    return {"server": f"{host} ({ips[0]}:{port})", "source_address": source_address, "helo": helo,
            "recipients": recipients, "accepted": all(200 <= r["code"] < 300 for r in recipients)}
