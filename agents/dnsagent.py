"""The DNS agent process: serves the lab zones (see :mod:`agents.dns`)."""

from . import dns
from .runtime import CannotStart


def build(ctx) -> None:
    try:
        dns.listen(ctx.reactor, ctx.config, ctx.tracer, home_root=ctx.home.root)
    except Exception as e:  # CannotListenError for UDP or TCP
        raise CannotStart(f"dns: cannot listen on {ctx.config.dns_address}:{ctx.config.ports['dns']}: "
                          f"{getattr(e, 'socketError', e)}; is another lab running? ('mailpipe down')") from None
