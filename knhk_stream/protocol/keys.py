"""Ed25519 keys and signatures with the protocol's own rules on top of the library.

The key rule (canonical encoding, not of small order) and S < L are checked
here in our code, not left to whatever the crypto library accepts: a
small-order key would let the forged signature (R = identity, S = 0)
verify for any message.

Signatures are made and checked with libsodium (PyNaCl), twice as fast as
OpenSSL's Ed25519 at checking and the largest cost of a peer at short beats.
Both check the same cofactorless equation; libsodium also refuses an R of
small order, which RFC 8032 accepts, so a signature libsodium refuses is
decided by OpenSSL: what verifies is exactly what verified before.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
L = 2**252 + 27742317777372353535851937790883648493  # order of the base point


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """RFC 8032 5.1.3 point decoding; None for a non-canonical or off-curve encoding."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else (0, y)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    x, y = pt
    xy = x * y % _P
    dxy = _D * xy * xy % _P
    x3 = 2 * xy * pow(1 + dxy, _P - 2, _P) % _P
    y3 = (y * y + x * x) * pow(1 - dxy, _P - 2, _P) % _P
    return x3, y3


@lru_cache(maxsize=4096)
def key_problem(raw: bytes) -> str | None:
    """Why `raw` is not an acceptable public key (None when it is): 32 bytes, canonical, on the curve,
    and [8]A is not the identity."""
    if not isinstance(raw, bytes) or len(raw) != 32:
        return "a public key is 32 bytes"
    pt = _decode_point(raw)
    if pt is None:
        return f"public_key {raw.hex()} is not the canonical encoding of a point on the Ed25519 curve"
    for _ in range(3):
        pt = _double(pt)
    if pt == (0, 1):
        return f"public_key {raw.hex()} is of small order (a forged signature would verify for any message)"
    return None


def parse_public_key(hex_text: object) -> bytes:
    """32 raw bytes from hex that pass the key rule, or a ValueError that says why."""
    if not isinstance(hex_text, str):
        raise ValueError(f"public_key must be 64 hex digits, got {hex_text!r}")
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raise ValueError(f"public_key {hex_text!r} is not hex") from None
    if len(raw) != 32:
        raise ValueError(f"public_key must be 32 bytes (64 hex digits), got {len(raw)} bytes")
    bad = key_problem(raw)
    if bad:
        raise ValueError(bad)
    return raw


@lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 5.1.7 with S < L and the key rule checked here; never raises."""
    if not isinstance(signature, bytes) or len(signature) != 64 or key_problem(public_key) is not None:
        return False
    if int.from_bytes(signature[32:], "little") >= L:
        return False
    try:
        crypto_sign_open(signature + message, public_key)
        return True
    except (BadSignatureError, ValueError):
        pass
    try:  # refused by libsodium: OpenSSL decides (an R of small order verifies under RFC 8032)
        _public_key(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@lru_cache(maxsize=256)
def _secret_key(key: Ed25519PrivateKey) -> bytes:
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return crypto_sign_seed_keypair(seed)[1]


def sign_message(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The RFC 8032 signature of `message` (deterministic: the same bytes as `key.sign(message)`)."""
    return crypto_sign(message, _secret_key(key))[:64]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def save_private_key(key: Ed25519PrivateKey, path: str | Path, overwrite: bool = False) -> None:
    """PKCS#8 PEM, created with mode 0600 (never briefly world-readable)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode on open: fix it before writing
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """A PKCS#8 PEM Ed25519 key, or a file holding the 32-byte seed as hex."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: cannot read the PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    try:
        seed = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: neither a PEM private key nor a hex seed") from None
    if len(seed) != 32:
        raise ValueError(f"{path}: an Ed25519 seed is 32 bytes, got {len(seed)}")
    return key_from_seed(seed)
