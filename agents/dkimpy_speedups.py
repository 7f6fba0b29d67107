"""dkimpy, faster: drop-in replacements for the parts of it that cost the most.

dkimpy does the lab's DKIM (RFC 6376), in pure Python. A profile of the
pipeline found DKIM, signing in the sending MTA and verifying in the
receiving one, to be the largest single cost per message, and most of it was
not the cryptography but a few helpers: big-integer RSA in Python, regular
expressions run over the whole message, and the same key parsed for every
message. Each replacement here computes exactly what dkimpy's own function
computes, only faster; ``tests/test_dkimpy_speedups.py`` checks every one
against the original, on chosen and on random inputs.

What is replaced, and by what:

- RSA signing and verification (``RSASSA_PKCS1_v1_5_sign``, ``_verify``):
  OpenSSL, through the ``cryptography`` package, instead of Python integers;
- key parsing (``parse_pem_private_key``, ``parse_public_key``,
  ``evaluate_pk``): the same functions, remembered, since a key's bytes always
  parse to the same key;
- splitting the message (``rfc822_parse``): ``bytes.split`` instead of a regex;
- emptying ``b=`` before the signature field is hashed (``RE_BTAG``): a
  pattern that does not backtrack;
- relaxed canonicalization's helpers: the regex runs only where something
  changes.

:func:`install` puts them in place, once; :mod:`agents.dkim` calls it.
"""

from __future__ import annotations

import functools
import re

import dkim as dkimpy  # the dkimpy package
from dkim import canonicalization
from dkim import crypto as dkimpy_crypto
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

#: dkimpy's own functions, before :func:`install`: the tests compare against them.
ORIGINALS = {
    "rfc822_parse": dkimpy.rfc822_parse,
    "RE_BTAG": dkimpy.RE_BTAG,
    "strip_trailing_whitespace": canonicalization.strip_trailing_whitespace,
    "compress_whitespace": canonicalization.compress_whitespace,
    "unfold_header_value": canonicalization.unfold_header_value,
    "evaluate_pk": dkimpy.evaluate_pk,
}

_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}


# -- RSA through OpenSSL -------------------------------------------------------

def rsa_sign_with_openssl(digest, private_key: dict) -> bytes:
    """RSASSA-PKCS1-v1_5 (RFC 8017 8.2) through OpenSSL instead of pure Python.

    dkimpy computes RSA signatures with Python integers (``pow`` on 1024-bit
    primes), which costs several milliseconds of CPU per message. The result
    is the same bytes (PKCS#1 v1.5 signatures are deterministic); only the
    arithmetic moves to the ``cryptography`` package. ``private_key`` is
    dkimpy's parsed key (a dict of the RFC 8017 A.1.2 numbers).
    """
    numbers = tuple(private_key[k] for k in ("publicExponent", "modulus", "prime1", "prime2",
                                             "privateExponent", "exponent1", "exponent2", "coefficient"))
    key = _openssl_private_key(*numbers)
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(_HASHES[digest.name.lower()]))


# OpenSSL's key objects, made once per key. The caches are keyed by every
# number of the key and bounded: the public keys come from the DNS, that is
# from anyone who sends us mail.

@functools.lru_cache(maxsize=64)
def _openssl_private_key(e, n, p, q, d, dmp1, dmq1, iqmp) -> rsa.RSAPrivateKey:
    return rsa.RSAPrivateNumbers(p=p, q=q, d=d, dmp1=dmp1, dmq1=dmq1, iqmp=iqmp,
                                 public_numbers=rsa.RSAPublicNumbers(e, n)).private_key()


@functools.lru_cache(maxsize=256)
def _openssl_public_key(e: int, n: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def rsa_verify_with_openssl(digest, signature: bytes, public_key: dict) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 8.2.2) through OpenSSL.

    The same check as dkimpy's (the padded digest must match exactly), done by
    the ``cryptography`` package instead of Python integers. Anything OpenSSL
    cannot take (an odd key size, say) goes to dkimpy's own code.
    """
    try:
        _openssl_public_key(public_key["publicExponent"], public_key["modulus"]).verify(
            signature, digest.digest(), padding.PKCS1v15(), Prehashed(_HASHES[digest.name.lower()]))
        return True
    except InvalidSignature:
        return False
    except (ValueError, KeyError, TypeError, UnsupportedAlgorithm):
        return dkimpy_crypto.RSASSA_PKCS1_v1_5_verify(digest, signature, public_key)


# -- splitting a message -------------------------------------------------------

_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")


def rfc822_parse(message: bytes):
    """``(headers, body)``, as dkimpy's ``rfc822_parse`` returns them.

    dkimpy splits the whole message, body included, with ``re.split(b"\\r?\\n")``;
    ``bytes.split`` and dropping one ``\\r`` before each ``\\n`` gives the same
    lines several times faster. The rest is dkimpy's loop as it is: header
    lines up to the first empty one, continuation lines (starting with a space
    or a tab, RFC 5322 2.2.3) added to the field before them, and the body
    joined with CRLF.
    """
    pieces = message.split(b"\n")
    lines = [piece[:-1] if piece.endswith(b"\r") else piece for piece in pieces[:-1]]
    lines.append(pieces[-1])  # after the last \n: no line ending to drop
    headers = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line:  # the empty line: the body starts after it
            i += 1
            break
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
        else:
            match = _FIELD_NAME.match(line)
            if match is not None:
                headers.append([match.group(1), line[match.end(0):] + b"\r\n"])
            elif not line.startswith(b"From "):  # an mbox separator is skipped
                raise dkimpy.MessageFormatError("Unexpected characters in RFC822 header: %s" % line)
        i += 1
    return headers, b"\r\n".join(lines[i:])


# -- emptying b= before hashing the signature field ------------------------------

#: dkimpy's pattern allows folding whitespace (RFC 5322 FWS) before every
#: character of the base64 value, as ``(?:(?:\s*\r?\n)?\s+)?[...]``, and the
#: regex engine tries each way for each of the ~350 characters. FWS matches
#: exactly what ``\s*`` matches, so the same text is found by runs of base64
#: characters separated by runs of whitespace, without backtracking.
_B64 = rb"[a-zA-Z0-9+/=]"
RE_BTAG = re.compile(rb"([;\s]b\s*=)" + _B64 + rb"*(?:\s+" + _B64 + rb"+)*(?:\r?\n\Z)?")


# -- relaxed canonicalization (RFC 6376 3.4.2 and 3.4.4) --------------------------

_TRAILING_WSP = re.compile(b"[\t ]+\r\n")
#: A run of WSP that is not already one single space: those are what change.
_WSP_TO_COMPRESS = re.compile(b"\t[\t ]*| [\t ]+")
_LINE_BREAK = re.compile(b"\r?\n")


def strip_trailing_whitespace(content: bytes) -> bytes:
    """Drop WSP at the end of each line (3.4.4 a); most lines have none."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WSP.sub(b"\r\n", content)


def compress_whitespace(content: bytes) -> bytes:
    """Make every run of WSP one space (3.4.2, 3.4.4 b).

    dkimpy replaces every run, single spaces too: a 2 KB body has hundreds.
    Only tabs and runs of two or more actually change.
    """
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP_TO_COMPRESS.sub(b" ", content)


def unfold_header_value(content: bytes) -> bytes:
    """Remove the line breaks of a folded header field (3.4.2)."""
    if b"\n" not in content:
        return content
    return _LINE_BREAK.sub(b"", content)


# -- installing ----------------------------------------------------------------

_installed = False


def install() -> None:
    """Put the replacements into dkimpy (once; later calls do nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    dkimpy.RSASSA_PKCS1_v1_5_sign = rsa_sign_with_openssl
    dkimpy.RSASSA_PKCS1_v1_5_verify = rsa_verify_with_openssl
    # The same PEM private key (to sign) and DNS key record (to verify) would
    # be parsed afresh for every message: pure functions of their bytes.
    dkimpy.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkimpy_crypto.parse_pem_private_key)
    dkimpy.parse_public_key = functools.lru_cache(maxsize=256)(dkimpy_crypto.parse_public_key)
    dkimpy.evaluate_pk = functools.lru_cache(maxsize=256)(ORIGINALS["evaluate_pk"])
    dkimpy.rfc822_parse = rfc822_parse
    dkimpy.RE_BTAG = RE_BTAG
    canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
    canonicalization.compress_whitespace = compress_whitespace
    canonicalization.unfold_header_value = unfold_header_value
