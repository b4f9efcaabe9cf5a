"""Signatures made and checked with libsodium are exactly those of OpenSSL and the protocol's rules.

`keys.verify_signature` asks libsodium first and OpenSSL when libsodium refuses.
The reference here is the rule as written before libsodium: the key rule,
S < L, then OpenSSL. The edge cases where the two libraries could differ are
built by hand: an R of small order (RFC 8032 accepts it, libsodium does not)
and a key with a small-order component (both check the cofactorless equation).
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

from knhk_stream.protocol.keys import L, key_from_seed, key_problem, public_key_bytes, sign_message, verify_signature

_P = 2**255 - 19
IDENTITY = (1).to_bytes(32, "little")  # the encoding of the neutral point (x = 0, y = 1)


def reference(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """The rule before libsodium: the key rule, S < L, OpenSSL's RFC 8032 check."""
    if len(signature) != 64 or key_problem(public_key) is not None:
        return False
    if int.from_bytes(signature[32:], "little") >= L:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def libsodium_accepts(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        crypto_sign_open(signature + message, public_key)
        return True
    except (BadSignatureError, ValueError):
        return False


def secret_scalar(seed: bytes) -> int:
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return int.from_bytes(h, "little")


def challenge(r: bytes, public_key: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + public_key + message).digest(), "little") % L


@settings(max_examples=200, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=200))
def test_signatures_are_the_bytes_openssl_makes_and_verify(seed, message):
    key = key_from_seed(seed)
    sig = sign_message(key, message)
    assert sig == key.sign(message)
    pub = public_key_bytes(key)
    assert verify_signature(pub, message, sig) is True


@settings(max_examples=300, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=100),
    where=st.integers(0, 64 + 32 + 99),
    bit=st.integers(0, 7),
)
def test_a_flipped_bit_anywhere_is_judged_as_the_reference_judges_it(seed, message, where, bit):
    key = key_from_seed(seed)
    pub, sig, msg = bytearray(public_key_bytes(key)), bytearray(key.sign(message)), bytearray(message)
    if where < 64:
        sig[where] ^= 1 << bit
    elif where < 96:
        pub[where - 64] ^= 1 << bit
    elif msg:
        msg[(where - 96) % len(msg)] ^= 1 << bit
    pub_b, msg_b, sig_b = bytes(pub), bytes(msg), bytes(sig)
    assert verify_signature(pub_b, msg_b, sig_b) == reference(pub_b, msg_b, sig_b)


def test_an_r_of_small_order_verifies_as_rfc_8032_says_though_libsodium_refuses_it():
    """R = identity and S = k*a: [S]B = R + [k]A holds, so OpenSSL and RFC 8032 accept it."""
    seed = bytes(range(32))
    key = key_from_seed(seed)
    pub = public_key_bytes(key)
    message = b"knhk-vote/2 small-order R"
    s = challenge(IDENTITY, pub, message) * secret_scalar(seed) % L
    sig = IDENTITY + s.to_bytes(32, "little")
    assert reference(pub, message, sig) is True
    assert libsodium_accepts(pub, message, sig) is False
    assert verify_signature(pub, message, sig) is True
    assert verify_signature(pub, message + b"!", sig) is False


def test_a_key_with_a_small_order_component_is_judged_alike_by_both_libraries():
    """A' = A + (0, -1): not of small order, so the key rule takes it; a signature made with it
    verifies (cofactorless) exactly when its challenge k is even, in both libraries."""
    seed = bytes(32)
    pub = crypto_sign_seed_keypair(seed)[0]
    y = int.from_bytes(pub, "little") & ((1 << 255) - 1)
    x_sign = pub[31] >> 7
    # adding the point of order 2 negates both coordinates: y -> p - y, x -> p - x (its sign flips, x != 0)
    mixed = bytearray(((_P - y) % _P).to_bytes(32, "little"))
    mixed[31] |= (x_sign ^ 1) << 7
    mixed = bytes(mixed)
    assert key_problem(mixed) is None
    seen = set()
    for i in range(40):
        message = b"message %d" % i
        sig = crypto_sign(message, seed + mixed)[:64]  # signed as if the key were A'
        even = challenge(sig[:32], mixed, message) % 2 == 0
        seen.add(even)
        assert reference(mixed, message, sig) is even
        assert libsodium_accepts(mixed, message, sig) is even
        assert verify_signature(mixed, message, sig) is even
    assert seen == {True, False}


def test_refused_inputs_never_raise():
    key = Ed25519PrivateKey.generate()
    pub = public_key_bytes(key)
    sig = key.sign(b"m")
    assert verify_signature(pub, b"m", sig[:63]) is False
    assert verify_signature(pub[:31], b"m", sig) is False
    assert verify_signature(IDENTITY, b"m", IDENTITY + bytes(32)) is False  # the small-order forgery
    high_s = sig[:32] + (int.from_bytes(sig[32:], "little") + L).to_bytes(32, "little")
    assert reference(pub, b"m", high_s) is False
    assert verify_signature(pub, b"m", high_s) is False
