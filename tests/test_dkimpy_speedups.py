"""agents.dkimpy_speedups must compute exactly what dkimpy's own code does.

Each replacement is run side by side with the dkimpy function it replaces, on
inputs picked to hit the edge cases and on thousands of random ones made of
the characters that matter (whitespace, line breaks, tag separators).
Then whole signatures and verdicts are compared with and without them.
"""

from __future__ import annotations

import contextlib
import random

import dkim as dkimpy
import dkim.canonicalization as canonicalization
import pytest

from agents import dkim as ours
from agents import dkimpy_speedups as fast
from agents.config import Domain

ORIG = fast.ORIGINALS


def outcome(function, *args):
    """What a call gives: its value, or the kind of exception it raised."""
    try:
        return ("value", function(*args))
    except Exception as e:  # noqa: BLE001 - the kind of failure is what we compare
        return ("raised", type(e))


def random_bytes(rng: random.Random, pieces: list[bytes], most: int) -> bytes:
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(most)))


MESSAGES = [
    b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n",
    b"From: a@x.test\nSubject: hi\n\nbody with LF only\n",
    b"From: a@x.test\r\nSubject: folded\r\n\tsecond line\r\n  third\r\n\r\nbody\r\n\r\n\r\n",
    b"From: a@x.test\r\nSubject: odd \r\r\n\r\nbare\rCR\r\r\n",
    b"From sender Mon Jan 1 00:00:00 2024\r\nFrom: a@x.test\r\n\r\nmbox line first\r\n",
    b"\r\nno headers at all\r\n",
    b"Subject: no body",
    b"Subject: no body\r\n",
    b"",
    b"not a header line\r\n\r\nbody\r\n",
    b" continuation first\r\nFrom: a@x.test\r\n\r\n",
    b"From: a@x.test\r\nX-Empty:\r\n\r\n\r\n",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_rfc822_parse_splits_like_dkimpy(message):
    assert outcome(fast.rfc822_parse, message) == outcome(ORIG["rfc822_parse"], message)


def test_rfc822_parse_splits_like_dkimpy_on_random_messages():
    rng = random.Random(6376)
    pieces = [b"From: a", b"Subject:", b"X", b" ", b"\t", b"\r\n", b"\n", b"\r", b":", b"x", b"From "]
    for _ in range(3000):
        message = random_bytes(rng, pieces, 30)
        assert outcome(fast.rfc822_parse, message) == outcome(ORIG["rfc822_parse"], message), message


SIGNATURE_FIELDS = [
    b" v=1; a=rsa-sha256; d=x.test; s=lab; bh=AbC+/=; b=QUJD+/ZGVm==\r\n",
    b" v=1; a=rsa-sha256; d=x.test; s=lab; b=QUJD\r\n\t ZGVm\r\n  R2hp=; bh=AbC=\r\n",
    b" v=1; b = QUJD ; bh=x",
    b" v=1; b=\r\n",
    b" v=1;b=QUJD",
    b" bh=only; x=y\r\n",
    b" v=1; b=QU JD \r\n",
    b" v=1; b=QUJD;b=second\r\n",
]


@pytest.mark.parametrize("field", SIGNATURE_FIELDS)
def test_b_tag_is_emptied_like_dkimpy(field):
    assert fast.RE_BTAG.sub(b"\\1", field) == ORIG["RE_BTAG"].sub(b"\\1", field)


def test_b_tag_is_emptied_like_dkimpy_on_random_fields():
    rng = random.Random(3)
    pieces = [b"b", b"=", b";", b" ", b"\t", b"\r\n", b"\n", b"\r", b"Q", b"+", b"/", b"h", b"-", b"b="]
    for _ in range(5000):
        field = random_bytes(rng, pieces, 25)
        assert fast.RE_BTAG.sub(b"\\1", field) == ORIG["RE_BTAG"].sub(b"\\1", field), field


@pytest.mark.parametrize("name", ["strip_trailing_whitespace", "compress_whitespace", "unfold_header_value"])
def test_canonicalization_helpers_match_dkimpy(name):
    rng = random.Random(name)
    pieces = [b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"bc", b" \r\n", b"\t\r\n"]
    ours_, theirs = getattr(fast, name), ORIG[name]
    for _ in range(5000):
        text = random_bytes(rng, pieces, 20)
        assert ours_(text) == theirs(text), text


def test_the_key_record_is_evaluated_as_dkimpy_does(tmp_path):
    key = ours.ensure_key(tmp_path, Domain("x.test", "127.0.9.1", True, {"dkim_bits": 1024}))
    name = b"lab._domainkey.x.test"
    assert dkimpy.evaluate_pk(name, key.record.encode()) == ORIG["evaluate_pk"](name, key.record.encode())
    for bad in (b"", b"v=DKIM1; k=rsa; p=", b"v=DKIM1; k=dsa; p=AAAA", b"v=DKIM1; p=notbase64!"):
        assert outcome(dkimpy.evaluate_pk, name, bad) == outcome(ORIG["evaluate_pk"], name, bad)


@contextlib.contextmanager
def dkimpy_as_shipped():
    """dkimpy with its own helpers back in place, for the length of the block.

    RSA stays on OpenSSL: tests/test_senderauth.py compares that part.
    """
    replaced = [(dkimpy, name) for name in ("rfc822_parse", "RE_BTAG", "evaluate_pk")]
    replaced += [(canonicalization, name)
                 for name in ("strip_trailing_whitespace", "compress_whitespace", "unfold_header_value")]
    saved = [(module, name, getattr(module, name)) for module, name in replaced]
    for module, name, _ in saved:
        setattr(module, name, ORIG[name])
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def test_speedups_are_installed():
    assert dkimpy.rfc822_parse is fast.rfc822_parse
    assert canonicalization.compress_whitespace is fast.compress_whitespace
    assert dkimpy.RSASSA_PKCS1_v1_5_sign is fast.rsa_sign_with_openssl


WHITESPACE_BODY = (b"From: Alice  <a@sender.test>\r\nTo: b@recipient.test\r\n"
                   b"Subject: tabs\tand  spaces \r\n\tfolded  on\r\nMessage-ID: <1@sender.test>\r\n\r\n"
                   b"line with trailing space \r\n\ttabbed\t line\r\n\r\n  \r\nend\r\n\r\n\r\n")


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("message", [WHITESPACE_BODY, b"From: a@sender.test\r\n\r\n"])
def test_signatures_and_verdicts_are_the_same_with_and_without_the_speedups(
        tmp_path, monkeypatch, algorithm, message):
    monkeypatch.setattr(dkimpy.time, "time", lambda: 1_800_000_000.0)  # t= is signed too
    key = ours.ensure_key(tmp_path, Domain("sender.test", "127.0.1.1", True,
                                           {"dkim_algorithm": algorithm, "dkim_bits": 1024}))
    found_records = {key.dns_name: [key.record]}

    def sign_and_verify():
        signed = ours.sign(message, key)
        tampered = signed.replace(b"end", b"END").replace(b"sender.test>", b"sender.test >", 1)
        verdicts = [(r.result, r.reason)
                    for m in (signed, tampered, signed.replace(b"b=", b"b=x", 1))
                    for r in ours._verify_all(m, ours.signatures(m), found_records)]
        return signed, verdicts

    fast_signed, fast_verdicts = sign_and_verify()
    with dkimpy_as_shipped():
        slow_signed, slow_verdicts = sign_and_verify()
    assert fast_signed == slow_signed
    assert fast_verdicts == slow_verdicts
    assert fast_verdicts[0] == ("pass", "signature verified")


def test_openssl_rsa_keys_are_cached_by_every_number_and_bounded():
    """A DNS record with the same modulus but another exponent is another key:
    verifying with it must give dkimpy's own answer, not a cached key's. The
    public keys come from anyone's DNS, so their cache is bounded."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_numbers()
    private = {"publicExponent": numbers.public_numbers.e, "modulus": numbers.public_numbers.n,
               "prime1": numbers.p, "prime2": numbers.q, "privateExponent": numbers.d,
               "exponent1": numbers.dmp1, "exponent2": numbers.dmq1, "coefficient": numbers.iqmp}
    digest = hashlib.sha256(b"a message")
    signature = fast.rsa_sign_with_openssl(digest, private)
    assert signature == dkimpy.crypto.RSASSA_PKCS1_v1_5_sign(digest, private)
    right = {"publicExponent": numbers.public_numbers.e, "modulus": numbers.public_numbers.n}
    wrong = {**right, "publicExponent": 3}
    assert fast.rsa_verify_with_openssl(digest, signature, right)  # now cached under this modulus
    assert not fast.rsa_verify_with_openssl(digest, signature, wrong)
    assert not dkimpy.crypto.RSASSA_PKCS1_v1_5_verify(digest, signature, wrong)
    assert fast._openssl_public_key.cache_info().maxsize == 256
