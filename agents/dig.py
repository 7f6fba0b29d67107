"""A tiny ``dig``: ask the lab DNS one question, synchronously, from anywhere.

Notebooks must not run a Twisted reactor, but they can still send a DNS
query: a DNS message is just bytes in a UDP datagram (RFC 1035 4.1). This
module builds the query with ``twisted.names.dns.Message``, sends it with a
plain socket, and decodes the answer with the same class.
"""

from __future__ import annotations

import random
import socket
import time

from twisted.names import dns

QTYPES = {"A": dns.A, "MX": dns.MX, "TXT": dns.TXT, "NS": dns.NS, "SOA": dns.SOA}


def _record_text(record) -> str:
    payload = record.payload
    if record.type == dns.A:
        return payload.dottedQuad()
    if record.type == dns.MX:
        return f"{payload.preference} {payload.name.name.decode()}"
    if record.type == dns.TXT:
        return " ".join('"' + d.decode() + '"' for d in payload.data)
    if record.type == dns.NS:
        return payload.name.name.decode()
    return str(payload)


def dig(name: str, qtype: str = "A", server: tuple[str, int] = ("127.0.0.1", 1053), timeout: float = 2.0) -> dict:
    """One query; returns ``{"answers": [...], "additional": [...], "rcode": ..., "ms": ...}``.

    Each record is ``{"name", "type", "ttl", "value"}``.
    """
    query = dns.Message(id=random.randrange(1 << 16), recDes=False)
    query.addQuery(name.encode(), QTYPES[qtype.upper()])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        started = time.perf_counter()
        sock.sendto(query.toStr(), server)
        while True:
            data, _ = sock.recvfrom(4096)
            answer = dns.Message()
            answer.fromStr(data)
            if answer.id == query.id:
                break
        ms = (time.perf_counter() - started) * 1000

    def rows(records):
        return [{"name": r.name.name.decode(), "type": dns.QUERY_TYPES.get(r.type, str(r.type)),
                 "ttl": r.ttl, "value": _record_text(r)} for r in records]

    return {"question": f"{name} {qtype.upper()}", "rcode": answer.rCode, "authoritative": bool(answer.auth),
            "answers": rows(answer.answers), "additional": rows(answer.additional), "ms": round(ms, 3)}
