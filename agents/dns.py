"""The lab DNS: an authoritative name server for every lab domain.

On the internet a sending MTA finds where to deliver ``bob@recipient.test``
by asking DNS: the ``MX`` record of ``recipient.test`` names a mail exchanger
host, and that host's ``A`` record gives its address (RFC 5321 5.1). The lab
serves exactly these records from its own server, built from the lab config,
so the agents route mail the way real ones do, without touching the real DNS.

For each domain ``D`` at address ``X`` the zone holds::

    D           SOA   ns.D. hostmaster.D. ...
    D           NS    ns.D
    D           MX    10 mx.D
    D           TXT   "v=spf1 ip4:X -all"          (RFC 7208, used by SPF checks)
    ns.D        A     <the lab DNS address>
    mx.D, smtp.D, lmtp.D, imap.D   A   X

plus ``D MX 20 mx2.D`` for a domain with a backup MX, or only ``D MX 0 .``
for a domain that takes no mail (RFC 7505), see :mod:`agents.exchangers`;
and, for sender authentication (see :func:`agents.senderauth.dns_records`)::

    mx.D                 TXT  "v=spf1 a -all"          (SPF for the HELO name)
    <selector>._domainkey.D   TXT  "v=DKIM1; k=rsa; p=..."  (RFC 6376, from HOME/dkim)
    _dmarc.D             TXT  "v=DMARC1; p=..."        (RFC 7489, from the config)
"""

from __future__ import annotations

from twisted.names import authority, dns, server

from .config import Domain, LabConfig
from .exchangers import add_zone_records


class LabZone(authority.FileAuthority):
    """One domain's zone, built in code instead of read from a zone file.

    ``FileAuthority`` implements the lookup rules (answers, authority and the
    additional section with the A records of MX targets, RFC 1034 4.3.2); we
    only fill in ``soa`` and ``records``.
    """

    def __init__(self, domain: Domain, dns_address: str, ttl: int):
        self._domain, self._dns_address, self._ttl = domain, dns_address, ttl
        super().__init__(filename=None)

    def loadFile(self, filename) -> None:  # called by FileAuthority.__init__
        d, ttl = self._domain, self._ttl
        name = d.name.encode()
        soa = dns.Record_SOA(
            mname=b"ns." + name,
            rname=b"hostmaster." + name,
            serial=1,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=ttl,
            ttl=ttl,
        )
        self.soa = (name, soa)
        records: dict[bytes, list] = {
            name: [
                soa,
                dns.Record_NS(b"ns." + name, ttl=ttl),
                dns.Record_MX(10, b"mx." + name, ttl=ttl),
                dns.Record_TXT(f"v=spf1 ip4:{d.address} -all".encode(), ttl=ttl),
            ],
            b"ns." + name: [dns.Record_A(self._dns_address, ttl=ttl)],
        }
        for host in ("mx", "smtp", "lmtp", "imap"):
            records[f"{host}.{d.name}".encode()] = [dns.Record_A(d.address, ttl=ttl)]
        add_zone_records(d, records, ttl)  # backup MX or null MX (agents.exchangers)
        self.records = records


def zones(config: LabConfig, home_root=None) -> list[LabZone]:
    out = [LabZone(d, config.dns_address, config.ttl) for d in config.domains]
    for zone, d in zip(out, config.domains):
        add_sender_auth_records(zone, d, home_root, config.ttl)
    return out


def add_sender_auth_records(zone: LabZone, domain: Domain, home_root, ttl: int) -> None:
    """SPF (HELO), DKIM and DMARC TXT records; a TXT string holds at most 255
    bytes, so longer texts (a 2048-bit key) go in several (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
    from .senderauth import dns_records

    for name, text in dns_records(domain, home_root):
        data = text.encode()
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)]
        zone.records.setdefault(name.lower().encode(), []).append(dns.Record_TXT(*chunks, ttl=ttl))


class TracingDNSServerFactory(server.DNSServerFactory):
    """A DNS server factory that writes each query and its answer to the trace."""

    def __init__(self, authorities, tracer):
        super().__init__(authorities=authorities)
        self.tracer = tracer

    def handleQuery(self, message, protocol, address):
        for q in message.queries:
            self.tracer.event(
                "dns.query",
                qname=q.name.name.decode(),
                qtype=dns.QUERY_TYPES.get(q.type, str(q.type)),
                peer=address[0] if address else None,
            )
        return super().handleQuery(message, protocol, address)

    def _responseFromMessage(self, message, rCode=dns.OK, answers=None, authority=None, additional=None):
        # Twisted sets AA only when an *answer* is authoritative. A negative
        # answer from our own zone (NODATA: the name exists, the type does
        # not) has no answers, only our SOA in the authority section, and is
        # just as authoritative (RFC 1035 4.1.1, RFC 2308 2.2).
        response = super()._responseFromMessage(message, rCode, answers, authority, additional)
        if any(getattr(r, "auth", False) for r in authority or []):
            response.auth = True
        return response


def listen(reactor, config: LabConfig, tracer, home_root=None) -> list:
    """Serve the lab zones on UDP and TCP (RFC 1035 4.2) at the lab DNS address."""
    factory = TracingDNSServerFactory(zones(config, home_root), tracer)
    host, port = config.dns_server
    udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface=host)
    tcp = reactor.listenTCP(port, factory, interface=host)
    return [udp, tcp]
