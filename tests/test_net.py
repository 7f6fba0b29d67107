"""TCP_NODELAY reaches the TCP connection, also under a TLS wrapper."""

from agents.net import no_delay


class TCP:
    def __init__(self):
        self.nodelay = False

    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled


class TLSWrapper:
    def __init__(self, transport):
        self.transport = transport


def test_no_delay_on_plain_and_wrapped_transports():
    plain, wrapped = TCP(), TCP()
    no_delay(plain)
    no_delay(TLSWrapper(wrapped))
    assert plain.nodelay and wrapped.nodelay
    no_delay(object())  # a transport without TCP (a StringTransport in tests) is left alone
