"""DKIM, DomainKeys Identified Mail (RFC 6376): a domain signs the mail it sends.

The sending domain's MTA hashes the body and a chosen list of header fields,
signs the hash with the domain's private key, and adds the result as a
``DKIM-Signature:`` header field. Its tags (section 3.5) say everything a
verifier needs::

    v=1  a=rsa-sha256  c=relaxed/relaxed  d=sender.test  s=lab
    h=from : to : subject : ...   bh=<body hash>   b=<signature>

The public key lives in DNS at ``<s>._domainkey.<d>`` (3.6.2), so anyone can
check that the message left ``d=``'s hands unchanged: a changed body breaks
``bh=``, a changed signed header breaks ``b=``. Unlike SPF, the signature
survives forwarding, because it travels with the message.

The cryptography is done by ``dkimpy``. It is synchronous, and it fetches keys
with its own DNS code; so we fetch the key records first through the lab's
asynchronous resolver and then run dkimpy in a thread with a ``dnsfunc`` that
answers only from what we fetched: no DNS query ever leaves the lab resolver.

Keys (RSA 2048 by default, or Ed25519, RFC 8463) are made on the first
``mailpipe up`` and kept in the lab home, as ``opendkim-genkey`` would::

    HOME/dkim/<domain>/<selector>.private   the private key (PEM, mode 0600)
    HOME/dkim/<domain>/<selector>.txt       the TXT record the DNS publishes
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy  # the dkimpy package (top-level name "dkim"), not this module
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, threads

from . import dkimpy_speedups
from .config import ConfigError, Domain
from .headers import header_fields
from .resolver import LookupFailed

#: Header fields worth signing (RFC 6376 5.4.1): the ones a reader sees or a
#: reply uses. ``From`` is signed once more than it occurs ("oversigned",
#: 8.15), so nobody can add a second From: without breaking the signature.
SIGNED_HEADERS = ("From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID",
                  "In-Reply-To", "References", "MIME-Version", "Content-Type",
                  "Content-Transfer-Encoding")
OVERSIGNED = ("From",)

#: RFC 8601 2.7.1: the results of one signature's verification.
RESULTS = ("pass", "fail", "neutral", "temperror", "permerror")

#: A message may carry many signatures; we verify this many at most (6.1).
MAX_SIGNATURES = 5

ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}

dkimpy_speedups.install()  # the same results from dkimpy, for less CPU: see that module

_quiet = logging.getLogger("mailpipe.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


# -- keys ------------------------------------------------------------------------

@dataclass(frozen=True)
class DKIMKey:
    """One domain's signing key and the DNS record that publishes its public half."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    private_pem: bytes
    record: str  # the TXT record's text: v=DKIM1; k=...; p=...

    @property
    def dns_name(self) -> str:
        """Where verifiers look for the key (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def dkimpy_private_key(self) -> bytes:
        """The key as dkimpy wants it: PKCS#1 PEM for RSA, the base64 seed for Ed25519."""
        if self.algorithm == "rsa":
            return self.private_pem
        return _ed25519_seed(self.private_pem)


@functools.lru_cache(maxsize=16)
def _ed25519_seed(private_pem: bytes) -> bytes:
    """The base64 seed of an Ed25519 PEM key, worked out once per key, not per message."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return base64.b64encode(raw)


def key_settings(domain: Domain) -> tuple[str, str, int]:
    """``(selector, algorithm, rsa_bits)`` from the domain's config table.

    Keys of a ``[[domain]]`` table: ``dkim_selector`` (default ``lab``),
    ``dkim_algorithm`` (``rsa``, the default, or ``ed25519``), ``dkim_bits``
    (RSA only; default 2048, RFC 8301 3.2 requires at least 1024).
    """
    options = domain.options
    selector = str(options.get("dkim_selector", "lab"))
    algorithm = str(options.get("dkim_algorithm", "rsa")).lower()
    bits = int(options.get("dkim_bits", 2048))
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{domain.name}: dkim_algorithm must be rsa or ed25519, not {algorithm!r}")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", selector, re.I):
        raise ConfigError(f"{domain.name}: dkim_selector {selector!r} is not a DNS label")
    if algorithm == "rsa" and bits < 1024:
        raise ConfigError(f"{domain.name}: dkim_bits must be at least 1024 (RFC 8301 3.2)")
    return selector, algorithm, bits


def key_paths(root: Path, domain: str, selector: str) -> tuple[Path, Path]:
    """``(private key file, TXT record file)`` under ``HOME/dkim``."""
    folder = Path(root) / "dkim" / domain
    return folder / f"{selector}.private", folder / f"{selector}.txt"


def _public_record(key) -> str:
    """The TXT record for a public key (RFC 6376 3.6.1; Ed25519: RFC 8463 4)."""
    public = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def ensure_key(root: Path, domain: Domain) -> DKIMKey:
    """Load the domain's key from the lab home, making a new one if there is none.

    A key of the wrong kind (the config changed from RSA to Ed25519) is
    replaced. Blocking; runs when the lab is prepared, before agents start.
    """
    selector, algorithm, bits = key_settings(domain)
    private_path, record_path = key_paths(root, domain.name, selector)
    key = load_key(root, domain)
    if key is not None and key.algorithm == algorithm:
        return key
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        # dkimpy reads RFC 8017 RSAPrivateKey ("BEGIN RSA PRIVATE KEY").
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, private_path)
    record_path.write_text(_public_record(private) + "\n")
    return DKIMKey(domain.name, selector, algorithm, pem, _public_record(private))


def load_key(root: Path, domain: Domain) -> DKIMKey | None:
    """The domain's key from the lab home, or ``None`` if it was never made."""
    selector, _algorithm, _bits = key_settings(domain)
    private_path, record_path = key_paths(root, domain.name, selector)
    try:
        pem = private_path.read_bytes()
        record = record_path.read_text().strip()
    except FileNotFoundError:
        return None
    kind = "ed25519" if "k=ed25519" in record else "rsa"
    return DKIMKey(domain.name, selector, kind, pem, record)


def ensure_keys(root: Path, config) -> list[DKIMKey]:
    """A key for every lab domain (called by :meth:`agents.lab.Lab.prepare`)."""
    return [ensure_key(root, d) for d in config.domains]


# -- signing ---------------------------------------------------------------------

def sign(content: bytes, key: DKIMKey) -> bytes:
    """The message with a ``DKIM-Signature:`` field on top (blocking, CPU only).

    relaxed/relaxed canonicalization (3.4): whitespace changes and header
    refolding on the way do not break the signature. No ``l=`` body length
    (8.2: with it, anyone could append text that the signature does not cover).
    """
    present = {name.lower() for name, _ in header_fields(content)}
    include = [h for h in SIGNED_HEADERS if h.lower() in present]
    include += [h for h in OVERSIGNED if h.lower() in present]
    signer = dkimpy.DKIM(content, signature_algorithm=ALGORITHMS[key.algorithm],
                         linesep=b"\r\n", logger=_quiet)
    signature = signer.sign(key.selector.encode(), key.domain.encode(), key.dkimpy_private_key(),
                            canonicalize=(b"relaxed", b"relaxed"),
                            include_headers=[h.encode() for h in include], length=False)
    return signature + content


# -- verifying -------------------------------------------------------------------

@dataclass
class DKIMResult:
    """One signature's verdict, with the tags RFC 8601 reports (header.d, .s, .a, .b)."""

    result: str
    reason: str
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    b: str = ""  # the first characters of b= (RFC 6008), to tell signatures apart
    dns_ms: float = 0.0
    crypto_ms: float = 0.0


def signatures(content: bytes) -> list[dict[str, str]]:
    """The tags of each ``DKIM-Signature:`` field, top first (``{}`` if unparsable)."""
    out = []
    for name, value in header_fields(content):
        if name.lower() == "dkim-signature":
            try:
                tags = dkimpy.util.parse_tag_value(value.encode())
                out.append({k.decode(): "".join(v.decode().split()) for k, v in tags.items()})
            except Exception:
                out.append({})
    return out


@defer.inlineCallbacks
def verify(content: bytes, resolver, run_blocking=threads.deferToThread):
    """Verify every DKIM signature of a message (up to :data:`MAX_SIGNATURES`).

    Fires with a list of :class:`DKIMResult`, empty when the message has no
    signature (RFC 8601 reports that as ``dkim=none``).
    """
    found = signatures(content)[:MAX_SIGNATURES]
    records: dict[str, list[str] | LookupFailed] = {}
    dns_ms: dict[str, float] = {}
    for tags in found:
        if "s" in tags and "d" in tags:
            name = f"{tags['s']}._domainkey.{tags['d']}".lower()
            if name not in records:
                started = time.perf_counter()
                try:
                    records[name] = yield resolver.lookup_txt(name)
                except LookupFailed as e:
                    records[name] = e
                dns_ms[name] = round((time.perf_counter() - started) * 1000, 3)
    results = yield run_blocking(_verify_all, content, found, records)
    for r in results:
        r.dns_ms = dns_ms.get(f"{r.selector}._domainkey.{r.domain}".lower(), 0.0)
    return results


def _verify_all(content: bytes, found: list[dict], records: dict) -> list[DKIMResult]:
    """Runs in a thread: dkimpy checks each signature against the prefetched keys."""

    def dnsfunc(name, timeout=5):
        answer = records.get(name.decode("ascii", "replace").rstrip(".").lower())
        if isinstance(answer, list) and answer:
            return answer[0].encode()
        return None

    return [_verify_one(content, idx, tags, records, dnsfunc) for idx, tags in enumerate(found)]


def _verify_one(content: bytes, idx: int, tags: dict, records: dict, dnsfunc) -> DKIMResult:
    started = time.perf_counter()
    out = DKIMResult("permerror", "", tags.get("d", ""), tags.get("s", ""), tags.get("a", ""),
                     tags.get("b", "")[:8])
    name = f"{out.selector}._domainkey.{out.domain}".lower()
    answer = records.get(name)
    if not tags or not out.domain or not out.selector:
        out.reason = "signature is malformed (no d= or s=)"
    elif isinstance(answer, LookupFailed):
        out.result, out.reason = "temperror", f"key lookup failed: {answer.reason}"
    elif not answer:
        out.reason = f"no key at {name}"
    else:
        try:
            dkimpy.evaluate_pk(name.encode(), answer[0].encode())
        except dkimpy.DKIMException as e:
            out.reason = f"bad key record: {e}"
        else:
            out.result, out.reason = _run_dkimpy(content, idx, dnsfunc)
    out.crypto_ms = round((time.perf_counter() - started) * 1000, 3)
    return out


def _run_dkimpy(content: bytes, idx: int, dnsfunc) -> tuple[str, str]:
    """dkimpy's verdict on signature ``idx``, with a reason a person can read."""
    try:
        ok = dkimpy.DKIM(content, logger=_quiet).verify(idx=idx, dnsfunc=dnsfunc)
    except dkimpy.ValidationError as e:
        if "body hash mismatch" in str(e):
            return "fail", "body hash did not verify"  # the body changed after signing
        return "fail", str(e)
    except dkimpy.DKIMException as e:
        return "permerror", str(e)
    if ok:
        return "pass", "signature verified"
    return "fail", "signature did not verify"  # a signed header changed, or a wrong key
