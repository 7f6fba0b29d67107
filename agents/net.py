"""Socket settings every mail protocol connection wants.

Nagle's algorithm (RFC 896) holds back a small write while an earlier one is
unacknowledged, and the peer's delayed ACK (RFC 1122 4.2.3.2) waits up to
40 ms before acknowledging. A request/response protocol that answers in
several small writes (an IMAP FETCH and its tagged OK, a multi-line SMTP
reply) then stalls for those 40 ms on every exchange. Mail servers disable
Nagle (Postfix and Dovecot set ``TCP_NODELAY``), and so do we: every write
here is a whole reply line or more, never a byte at a time.
"""

from __future__ import annotations


def no_delay(transport) -> None:
    """Set TCP_NODELAY on the TCP connection under ``transport`` (also under TLS)."""
    for _ in range(4):  # a TLS wrapper's .transport is the TCP connection
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass  # the connection is already gone
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return
