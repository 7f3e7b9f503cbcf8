"""Encryption at rest: the age v1 format (https://age-encryption.org/v1), X25519 recipients.

Every encrypted file is an age file cut in two: its header (the per-file key wrapped to each
recipient, and the header's MAC) and its payload (a nonce, then ChaCha20-Poly1305 chunks of
64 KiB). The repository stores the header beside the payload (``<key>.age``, see
``sealed.py``), so a key rotation rewrites headers only, never a payload. Joined again they are
a standard age file that the stock tool decrypts::

    cat dump.zst.age dump.zst | age -d -i key.txt > dump.zst

The primitives are the `cryptography` package's (OpenSSL): X25519, HKDF-SHA-256,
ChaCha20-Poly1305, HMAC-SHA-256; this module only lays them out as the age specification
says. The backup side needs only public keys (``age1...``); restores and verification need an
identity (``AGE-SECRET-KEY-1...``).

Each header also carries a ``rag-backup-keyset`` stanza naming the set of recipients it was
written for (a hash of their public keys): age ignores stanzas it does not know, and key
rotation uses it to skip files already rewrapped (rotation is resumable) and to verify that
none is left for a removed key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rag_backup.errors import IntegrityError, InvalidRequest

VERSION_LINE = b"age-encryption.org/v1\n"
X25519_INFO = b"age-encryption.org/v1/X25519"
KEYSET_STANZA = "rag-backup-keyset"
CHUNK = 64 * 1024
TAG = 16
NONCE = 16
SEALED_CHUNK = CHUNK + TAG
PUBLIC_HRP, SECRET_HRP = "age", "age-secret-key-"


class DecryptionError(IntegrityError):
    """A ciphertext or header that does not authenticate, or is not age: tampered or corrupt."""


class IdentityError(InvalidRequest):
    """No identity (private key) configured, or none that opens a file."""


# -- bech32 (BIP 173), as age encodes its keys ---------------------------------------------------
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= _GEN[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: Iterable[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or (acc << (tobits - bits)) & maxv):
        raise ValueError("invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    values = _convertbits(data, 8, 5, True)
    checksum = _polymod(_hrp_expand(hrp) + values + [0] * 6) ^ 1
    values += [(checksum >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[v] for v in values)


def bech32_decode(text: str) -> tuple[str, bytes]:
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    hrp, sep, rest = text.rpartition("1")
    if not sep or not hrp or len(rest) < 6 or any(c not in _CHARSET for c in rest):
        raise ValueError("not bech32")
    values = [_CHARSET.index(c) for c in rest]
    if _polymod(_hrp_expand(hrp) + values) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_convertbits(values[:-6], 5, 8, False))


# -- keys ----------------------------------------------------------------------------------------
def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Recipient:
    """An X25519 public key (``age1...``): what backups are encrypted to."""

    public: bytes

    @classmethod
    def parse(cls, text: str) -> Recipient:
        return cls(_decode_key(text, PUBLIC_HRP, InvalidRequest,
                               f"{_redact(text)!r} is not an age public key (age1..., X25519)"))

    def __str__(self) -> str:
        return bech32_encode(PUBLIC_HRP, self.public)


@dataclass(frozen=True, repr=False)
class Identity:
    """An X25519 private key (``AGE-SECRET-KEY-1...``): what restores decrypt with."""

    secret: bytes

    def __repr__(self) -> str:  # never print a secret
        return f"Identity({self.recipient})"

    @classmethod
    def generate(cls) -> Identity:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()))

    @classmethod
    def parse(cls, text: str) -> Identity:  # the message never quotes the secret
        return cls(_decode_key(text, SECRET_HRP, IdentityError, "an identity is not an age "
                               "X25519 secret key (AGE-SECRET-KEY-1...)"))

    def encode(self) -> str:
        return bech32_encode(SECRET_HRP, self.secret).upper()

    @functools.cached_property
    def _private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.secret)

    @functools.cached_property
    def recipient(self) -> Recipient:
        return Recipient(_raw_public(self._private.public_key()))

    def unwrap(self, stanza: Stanza) -> bytes | None:
        """The file key if ``stanza`` was wrapped to this identity, else ``None``."""
        if stanza.type != "X25519" or len(stanza.args) != 1:
            return None
        try:
            share = _b64decode(stanza.args[0])
        except ValueError:
            return None
        if len(share) != 32 or len(stanza.body) != 32:
            return None
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:  # an all-zero shared secret (a low-order point)
            return None
        key = _hkdf(shared, share + self.recipient.public, X25519_INFO)
        try:
            return ChaCha20Poly1305(key).decrypt(b"\x00" * 12, stanza.body, None)
        except InvalidTag:
            return None


def _decode_key(text: str, hrp: str, error: type[Exception], what: str) -> bytes:
    """The 32 key bytes of a bech32 age key of kind ``hrp``; ``error(what: why)`` if not one."""
    try:
        found, data = bech32_decode(text.strip())
    except ValueError as exc:
        raise error(f"{what}: {exc}") from exc
    if found != hrp or len(data) != 32:
        raise error(what)
    return data


def _redact(text: str) -> str:
    return text if not text.strip().upper().startswith("AGE-SECRET-KEY") else "AGE-SECRET-KEY-…"


def keyset_id(recipients: Sequence[Recipient]) -> str:
    """A short, stable name of a set of recipients (order and duplicates do not matter)."""
    joined = "\n".join(sorted({str(r) for r in recipients}))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def parse_recipients(text: str) -> list[Recipient]:
    """Comma-, space- or newline-separated ``age1...`` keys (``#`` comments allowed)."""
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        found += [Recipient.parse(t) for t in line.replace(",", " ").split() if t]
    return found


def parse_identities(text: str) -> list[Identity]:
    """An age identity file's text: one ``AGE-SECRET-KEY-1...`` per line, ``#`` comments."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.append(Identity.parse(line))
    return found


# -- header --------------------------------------------------------------------------------------
def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    if "=" in text or "\n" in text or "\r" in text:
        raise ValueError("padded or multi-line base64")
    data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    if _b64encode(data) != text:
        raise ValueError("non-canonical base64")
    return data


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class Stanza:
    type: str
    args: tuple[str, ...]
    body: bytes

    def encode(self) -> bytes:
        line = " ".join(("->", self.type, *self.args)) + "\n"
        b64 = _b64encode(self.body)
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append("")
        return (line + "".join(f"{x}\n" for x in lines)).encode()


def wrap(file_key: bytes, recipient: Recipient) -> Stanza:
    ephemeral = X25519PrivateKey.generate()
    share = _raw_public(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient.public))
    key = _hkdf(shared, share + recipient.public, X25519_INFO)
    return Stanza("X25519", (_b64encode(share),),
                  ChaCha20Poly1305(key).encrypt(b"\x00" * 12, file_key, None))


def _mac(file_key: bytes, header_without_mac: bytes) -> bytes:
    return hmac.new(_hkdf(file_key, b"", b"header"), header_without_mac, "sha256").digest()


def build_header(file_key: bytes, recipients: Sequence[Recipient]) -> bytes:
    """An age header wrapping ``file_key`` to every recipient (and naming their keyset)."""
    if not recipients:
        raise InvalidRequest("encryption needs at least one recipient")
    stanzas = [wrap(file_key, r) for r in recipients]
    stanzas.append(Stanza(KEYSET_STANZA, (keyset_id(recipients),), b""))
    body = VERSION_LINE + b"".join(s.encode() for s in stanzas) + b"---"
    return body + b" " + _b64encode(_mac(file_key, body)).encode() + b"\n"


@dataclass(frozen=True)
class Header:
    stanzas: tuple[Stanza, ...]
    mac: bytes
    signed: bytes  # the header up to and including "---": what the MAC covers

    @property
    def keyset(self) -> str | None:
        for s in self.stanzas:
            if s.type == KEYSET_STANZA and s.args:
                return s.args[0]
        return None

    def file_key(self, identities: Sequence[Identity], where: str) -> bytes:
        """Unwrap the file key with the first identity that opens it and check the header's
        MAC; ``IdentityError`` when none opens it, ``DecryptionError`` when the MAC fails."""
        if not identities:
            raise IdentityError(f"{where} is encrypted and no identity is configured: set "
                                "RAG_BACKUP_IDENTITY (the age secret key, or the path of a "
                                "file holding it)")
        for stanza in self.stanzas:
            for identity in identities:
                key = identity.unwrap(stanza)
                if key is not None:
                    if not hmac.compare_digest(_mac(key, self.signed), self.mac):
                        raise DecryptionError(f"{where}: the age header's MAC does not match "
                                              "(the header was modified)")
                    return key
        names = ", ".join(str(i.recipient) for i in identities)
        raise IdentityError(f"{where} is not encrypted to the configured identity ({names}): "
                            "it was written for other keys (a wrong or rotated key?); nothing "
                            "was changed")


def parse_header(data: bytes, where: str) -> Header:
    """Parse an age header (exactly the header's bytes); ``DecryptionError`` if invalid."""
    def bad(why: str) -> DecryptionError:
        return DecryptionError(f"{where}: not a valid age header ({why})")

    if not data.startswith(VERSION_LINE):
        raise bad("no age-encryption.org/v1 line")
    lines = data[len(VERSION_LINE):].split(b"\n")
    stanzas: list[Stanza] = []
    i = 0
    while i < len(lines):
        line = lines[i].decode("ascii", "replace")
        if line.startswith("---"):
            if not line.startswith("--- ") or i != len(lines) - 2 or lines[-1] != b"":
                raise bad("malformed MAC line")
            try:
                mac = _b64decode(line[4:])
            except ValueError as exc:
                raise bad(f"MAC: {exc}") from exc
            signed = data[:data.rindex(b"\n---") + 4]
            return Header(tuple(stanzas), mac, signed)
        if not line.startswith("-> "):
            raise bad(f"unexpected line {line[:40]!r}")
        parts = line[3:].split(" ")
        if not parts or not parts[0]:
            raise bad("stanza without a type")
        body_lines = []
        i += 1
        while True:
            if i >= len(lines):
                raise bad("truncated stanza")
            chunk = lines[i].decode("ascii", "replace")
            i += 1
            body_lines.append(chunk)
            if len(chunk) < 64:
                break
        try:
            body = _b64decode("".join(body_lines))
        except ValueError as exc:
            raise bad(f"stanza body: {exc}") from exc
        stanzas.append(Stanza(parts[0], tuple(parts[1:]), body))
    raise bad("no MAC line")


def split_age(data: bytes, where: str) -> tuple[bytes, bytes]:
    """A whole age file's bytes as (header, payload)."""
    end = data.find(b"\n--- ")
    nl = data.find(b"\n", end + 1) if end >= 0 else -1
    if end < 0 or nl < 0:
        raise DecryptionError(f"{where}: not an age file (no header end)")
    return data[:nl + 1], data[nl + 1:]


def rewrap(header: bytes, identities: Sequence[Identity], recipients: Sequence[Recipient],
           where: str) -> bytes:
    """The same file key in a new header for ``recipients`` (the payload is untouched)."""
    key = parse_header(header, where).file_key(identities, where)
    return build_header(key, recipients)


# -- payload -------------------------------------------------------------------------------------
def _chunk_nonce(counter: int, last: bool) -> bytes:
    if counter >= 1 << 88:
        raise DecryptionError("age payload too long")
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def payload_size(plain_size: int) -> int:
    """The size of the payload that encrypts ``plain_size`` bytes."""
    chunks = max(1, -(-plain_size // CHUNK))
    return NONCE + plain_size + TAG * chunks


def plain_size(payload: int) -> int:
    """The plaintext size of a payload of ``payload`` bytes (inverse of ``payload_size``)."""
    body = payload - NONCE
    chunks = max(1, -(-body // SEALED_CHUNK))
    return max(0, body - TAG * chunks)


class EncryptingWriter:
    """Writes the payload of ``file_key`` to ``sink``: ``write`` plaintext, then ``close``."""

    def __init__(self, sink: BinaryIO, file_key: bytes) -> None:
        nonce = os.urandom(NONCE)
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._sink, self._buffer, self._counter = sink, bytearray(), 0
        self._closed = False
        sink.write(nonce)

    def write(self, data: bytes) -> int:
        self._buffer += data
        # keep at least one byte back: the last chunk is only known at close
        if len(self._buffer) > CHUNK:
            view, start = memoryview(self._buffer), 0
            while len(self._buffer) - start > CHUNK:
                self._emit(view[start:start + CHUNK], last=False)
                start += CHUNK
            view.release()
            del self._buffer[:start]
        return len(data)

    def _emit(self, chunk: bytes, last: bool) -> None:
        self._sink.write(self._aead.encrypt(_chunk_nonce(self._counter, last), chunk, None))
        self._counter += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(bytes(self._buffer), last=True)
            self._buffer.clear()


class DecryptingReader:
    """Reads the plaintext of a payload stream; a modified, truncated or extended payload raises
    ``DecryptionError`` naming ``where``."""

    def __init__(self, source: BinaryIO, file_key: bytes, where: str) -> None:
        self._source, self._where = source, where
        nonce = _read_exactly(source, NONCE)
        if len(nonce) != NONCE:
            raise DecryptionError(f"{where}: the encrypted payload is truncated (no nonce)")
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._counter, self._done = 0, False
        self._next = _read_exactly(source, SEALED_CHUNK)
        self._plain = bytearray()

    def _advance(self) -> None:
        current = self._next
        following = _read_exactly(self._source, SEALED_CHUNK) if current else b""
        last = not following
        if not current or len(current) < TAG or (not last and len(current) != SEALED_CHUNK):
            raise DecryptionError(f"{self._where}: the encrypted payload is truncated")
        try:
            plain = self._aead.decrypt(_chunk_nonce(self._counter, last), current, None)
        except InvalidTag as exc:
            raise DecryptionError(
                f"{self._where}: chunk {self._counter} of the encrypted payload does not "
                "authenticate (modified, truncated or written with another key)") from exc
        if last and not plain and self._counter > 0:
            raise DecryptionError(f"{self._where}: an empty final chunk (invalid age payload)")
        self._plain += plain
        self._counter += 1
        self._next = following
        self._done = last

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._plain) < size):
            self._advance()
        if size < 0 or size >= len(self._plain):
            out = bytes(self._plain)
            self._plain.clear()
            return out
        out = bytes(self._plain[:size])
        del self._plain[:size]
        return out

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> DecryptingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exactly(source: BinaryIO, size: int) -> bytes:
    parts, have = [], 0
    while have < size:
        data = source.read(size - have)
        if not data:
            break
        parts.append(data)
        have += len(data)
    return b"".join(parts)


def new_file_key() -> bytes:
    return secrets.token_bytes(16)


def encrypt_bytes(data: bytes, recipients: Sequence[Recipient]) -> bytes:
    """A whole age file (header and payload) of ``data``: for small records."""
    import io

    key = new_file_key()
    out = io.BytesIO()
    writer = EncryptingWriter(out, key)
    writer.write(data)
    writer.close()
    return build_header(key, recipients) + out.getvalue()


def decrypt_bytes(data: bytes, identities: Sequence[Identity], where: str) -> bytes:
    import io

    header, payload = split_age(data, where)
    key = parse_header(header, where).file_key(identities, where)
    return DecryptingReader(io.BytesIO(payload), key, where).read()
