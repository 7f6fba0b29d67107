"""A raw-socket client for tests that must control every byte on the wire.

``smtplib``, ``imaplib`` and ``poplib`` are polite: they never pipeline
behind STARTTLS, never split a line across writes, never send ``\\r.\\r``.
Attack tests need a client that does exactly what it is told, and reads the
answers one at a time so that a desynchronised server shows up as a wrong
or extra reply.
"""

from __future__ import annotations

import socket
import ssl
import time


class Wire:
    """One TCP connection, optionally from a chosen loopback source address.

    Any ``127.x.y.z`` can be the source on Linux, so each test can be a
    different "client address" for the per-address throttles.
    """

    def __init__(self, host: str, port: int, source: str | None = None, timeout: float = 10.0):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buffer = b""

    # -- bytes -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_slowly(self, data: bytes, pieces: list[int], pause: float = 0.02) -> None:
        """Send ``data`` in several TCP writes, cut at the given offsets."""
        start = 0
        for cut in [*pieces, len(data)]:
            self.sock.sendall(data[start:cut])
            start = cut
            time.sleep(pause)  # let each piece arrive as its own read

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def line(self) -> bytes | None:
        """One line without its CRLF; None when the server closed the connection."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                return None
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def closed(self) -> bool:
        """True if the server has closed the connection (nothing more to read)."""
        if self.buffer:
            return False
        try:
            return not self._fill()
        except socket.timeout:
            return False

    def quiet(self, wait: float = 0.3) -> bool:
        """True if nothing arrives, and the connection stays open, for ``wait`` seconds."""
        if self.buffer:
            return False
        previous = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            self._fill()
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(previous)
        return False  # something arrived, or the server closed the connection

    # -- SMTP ----------------------------------------------------------------

    def reply(self) -> tuple[int, list[bytes]] | None:
        """One complete SMTP reply: its code and its lines (RFC 5321 4.2.1)."""
        lines = []
        while True:
            line = self.line()
            if line is None:
                return None
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes) -> tuple[int, list[bytes]] | None:
        self.send(line + b"\r\n")
        return self.reply()

    def starttls(self, ca_file: str, hostname: str) -> None:
        """Wrap the socket in TLS (after the server said 220 / OK / +OK)."""
        assert not self.buffer, f"unread plaintext before TLS: {self.buffer!r}"
        ctx = ssl.create_default_context(cafile=ca_file)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def smtp_session(host: str, port: int, *, source: str | None = None, ca_file: str | None = None,
                 tls_hostname: str | None = None, helo: bytes = b"client.test") -> Wire:  # fmt: skip
    """Connect, read the greeting, EHLO; with ``ca_file`` also STARTTLS and EHLO again."""
    wire = Wire(host, port, source)
    code, _ = wire.reply()
    assert code == 220
    assert wire.command(b"EHLO " + helo)[0] == 250
    if ca_file:
        assert wire.command(b"STARTTLS")[0] == 220
        wire.starttls(ca_file, tls_hostname)
        assert wire.command(b"EHLO " + helo)[0] == 250
    return wire
