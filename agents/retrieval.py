"""What the MDA's two mailbox-access servers share: IMAP and POP3 factories.

Both protocols serve the same Maildirs to the same users: each connection
gets a server protocol with the mail store, a cred portal (the realm hands
out the user's mailbox, the checker checks the password), the STARTTLS/STLS
context, the tracer, the login throttle shared with the agent's other
listeners, and a ``fetched`` callback for coursework hooks.
"""

from __future__ import annotations

from twisted.cred import portal as cred_portal
from twisted.internet import protocol
from zope.interface import implementer

from .trace import NULL_TRACER


class TracingPortal:
    """Wraps a Portal to record every login attempt, whatever the command."""

    def __init__(self, portal, on_result):
        self._portal, self._on_result = portal, on_result

    def login(self, credentials, mind, *interfaces_):
        user = getattr(credentials, "username", b"")
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        d = self._portal.login(credentials, mind, *interfaces_)

        def ok(result):
            self._on_result(user, True)
            return result

        def failed(failure):
            self._on_result(user, False)
            return failure

        return d.addCallbacks(ok, failed)


class TracedLoginMixin:
    """Login bookkeeping IMAP and POP3 share: every attempt is a trace event.

    The protocol's ``portal`` is wrapped in a :class:`TracingPortal`, so a
    login is recorded whichever command made it (LOGIN, AUTHENTICATE, USER/PASS).
    """

    login_event: str
    _portal = None

    @property
    def portal(self):
        return self._portal

    @portal.setter
    def portal(self, value):
        self._portal = None if value is None else TracingPortal(value, self._logged_in)

    def _logged_in(self, user: str, ok: bool) -> None:
        if ok:
            self.user = user.lower()
        self.tracer.event(self.login_event, conn=self.conn_id, peer=self.peer, user=user, ok=ok)


@implementer(cred_portal.IRealm)
class MailboxRealm:
    """Cred realm: the avatar id (the user's address) gets that user's mailbox.

    Subclasses name the interface they serve and the avatar they build; the
    portal has already checked the password, so this only looks up *what*
    the user may see: their own Maildir, never another's.
    """

    interface: type
    avatar_class: type

    def __init__(self, store):
        self.store = store

    def requestAvatar(self, avatarId, mind, *interfaces_):
        if self.interface not in interfaces_:
            raise NotImplementedError(f"only {self.interface.__name__} avatars here")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        return self.interface, self.avatar_class(self.store, avatarId), lambda: None


class RetrievalServerFactory(protocol.ServerFactory):
    """Builds one ``server_class`` protocol per connection."""

    server_class: type

    def __init__(self, store, portal, tls_context, tracer, throttle=None, on_fetched=None):
        self.store, self.portal, self.tls_context, self.tracer = store, portal, tls_context, tracer
        self.throttle, self.on_fetched = throttle, on_fetched

    def buildProtocol(self, addr):
        server = self.server_class(self.store, self.tls_context, self.tracer, self.throttle)
        server.on_fetched = self.on_fetched
        server.portal = self.portal
        server.factory = self
        return server


def make_factory(factory_class, realm_class, store, checker, tls_context, implicit_tls=False,
                 tracer=NULL_TRACER, throttle=None, on_fetched=None):  # fmt: skip
    """A factory of ``factory_class`` whose portal uses ``realm_class(store)``.

    With ``implicit_tls`` (ports 993 and 995, RFC 8314) the caller listens
    with ``reactor.listenSSL``: the server already runs over TLS, so it gets
    no context for STARTTLS/STLS and offers login at once.
    """
    portal = cred_portal.Portal(realm_class(store), [checker])
    return factory_class(store, portal, None if implicit_tls else tls_context, tracer, throttle, on_fetched)
