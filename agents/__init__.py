"""mailpipe: a complete mail pipeline on one laptop, for learning how email moves.

The agents (each its own OS process, ``python -m agents <role>``):

* ``dns``  the lab's authoritative DNS (:mod:`agents.dns`)
* ``msa``  mail submission agent, RFC 6409 (:mod:`agents.msa`)
* ``mta``  mail transfer agent, RFC 5321 (:mod:`agents.mta`)
* ``mda``  mail delivery agent: LMTP in, Maildir, IMAP and POP3 out (:mod:`agents.mda`)
* ``mua``  the user's mail client (:mod:`agents.mua`)

Notebooks and tests drive a lab through :class:`agents.lab.Lab`.
"""

ROLE_MODULES = {"dns": "dnsagent", "msa": "msa", "mta": "mta", "mda": "mda"}

__all__ = ["Lab", "ROLE_MODULES"]


def __getattr__(name):
    if name == "Lab":
        from .lab import Lab

        return Lab
    raise AttributeError(name)
