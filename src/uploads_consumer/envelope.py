"""Envelope encryption exactly as the upload backend does it (docs/contract.md; vectors in tests/interop).

Object:   IV (12) || AES-256-GCM(DEK, file) || tag (16)   — one GCM message over the whole file
kek:      base64(IV (12) || AES-256-GCM(master key, DEK) || tag (16))   — 60 bytes decoded
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Iterable
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator

from uploads_consumer.errors import ErrorClass, PermanentError

IV_SIZE = 12
TAG_SIZE = 16
OVERHEAD = IV_SIZE + TAG_SIZE
WRAPPED_KEY_SIZE = IV_SIZE + 32 + TAG_SIZE
MAX_METADATA_BYTES = 64 * 1024
ENCRYPTED_SUFFIX = ".encrypted"


def _bad(reason: str) -> PermanentError:
    return PermanentError(ErrorClass.BAD_ENVELOPE, reason)


class EnvelopeMetadata(BaseModel):
    """`metadata.json`, treated as untrusted input. Extra fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: StrictStr
    kek: bytes
    algorithm: StrictStr
    original_filename: StrictStr
    file_id: Any = None
    original_size: StrictInt
    encrypted_size: StrictInt
    verification_status: StrictStr | None = None
    timestamp: StrictInt | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if value != "1.0":
            raise ValueError(f"unknown version {value[:20]!r} (only 1.0 is understood)")
        return value

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, value: str) -> str:
        if value != "AES-GCM-256":
            raise ValueError(f"unknown algorithm {value[:30]!r} (only AES-GCM-256 is understood)")
        return value

    @field_validator("original_filename")
    @classmethod
    def _text(cls, value: str) -> str:
        try:  # JSON can carry lone surrogates ("\ud800"); a file name and the result event cannot
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text") from None
        return value

    @field_validator("kek", mode="before")
    @classmethod
    def _kek(cls, value: Any) -> bytes:
        if not isinstance(value, str):
            raise ValueError("must be a base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
        if len(raw) != WRAPPED_KEY_SIZE:
            raise ValueError(f"decodes to {len(raw)} bytes, expected {WRAPPED_KEY_SIZE}")
        return raw

    @field_validator("original_size", "encrypted_size")
    @classmethod
    def _size(cls, value: int) -> int:
        if value < 0:
            raise ValueError("cannot be negative")
        return value

    @property
    def clean_filename(self) -> str:
        """The browser's name without the `.encrypted` suffix the frontend adds."""
        name = self.original_filename
        if name.endswith(ENCRYPTED_SUFFIX) and len(name) > len(ENCRYPTED_SUFFIX):
            return name[: -len(ENCRYPTED_SUFFIX)]
        return name


def parse_metadata(raw: bytes) -> EnvelopeMetadata:
    """Bytes of metadata.json → validated metadata, or a bad_envelope error saying what is wrong."""
    if len(raw) > MAX_METADATA_BYTES:
        raise _bad(f"metadata is over {MAX_METADATA_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _bad("metadata is JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError):
        raise _bad("metadata is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise _bad("metadata is not a JSON object")
    try:
        meta = EnvelopeMetadata.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "metadata"
        msg = "is missing" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        raise _bad(f"metadata {field} {msg}") from None
    if meta.encrypted_size != meta.original_size + OVERHEAD:
        raise _bad(
            f"metadata encrypted_size {meta.encrypted_size} is not original_size {meta.original_size} + {OVERHEAD}"
        )
    return meta


def fingerprint(key: bytes) -> str:
    """A key's name for logs and `keys check`: the first 12 hex digits of its SHA-256, which says nothing
    of the key (`base64 -d < master.key | sha256sum | cut -c1-12` gives the same)."""
    return hashlib.sha256(key).hexdigest()[:12]


class MasterKeyRing:
    """The current master key plus previous ones still accepted for unwrapping (rotation)."""

    def __init__(self, current: bytes, previous: Iterable[bytes] = ()) -> None:
        raw = [current, *previous]
        self._keys = [AESGCM(k) for k in raw]
        self._current = self._keys[0]
        self.fingerprints = [fingerprint(k) for k in raw]
        """Of each key, current first: the first 12 hex digits of its SHA-256 (never the key)."""

    def __repr__(self) -> str:  # never show key material
        return f"MasterKeyRing(<{len(self._keys)} keys>)"

    def unwrap(self, wrapped: bytes) -> bytes:
        """Wrapped DEK (IV || ciphertext || tag) → 32-byte DEK, trying each key in order."""
        return self.unwrap_with(wrapped)[1]

    def unwrap_with(self, wrapped: bytes) -> tuple[int, bytes]:
        """(which key opened it: 0 the current, 1… the previous ones in order, the DEK)."""
        if len(wrapped) != WRAPPED_KEY_SIZE:
            raise _bad(f"wrapped key is {len(wrapped)} bytes, expected {WRAPPED_KEY_SIZE}")
        iv, sealed = wrapped[:IV_SIZE], wrapped[IV_SIZE:]
        for index, key in enumerate(self._keys):
            try:
                return index, key.decrypt(iv, sealed, None)
            except InvalidTag:
                continue
        raise PermanentError(
            ErrorClass.DECRYPT_FAILED, "the wrapped data key does not verify under any configured master key"
        )

    def wrap(self, dek: bytes) -> bytes:
        """DEK → IV || AES-GCM(current master key, DEK) || tag, as the backend writes `kek`."""
        iv = os.urandom(IV_SIZE)
        return iv + self._current.encrypt(iv, dek, None)


class ObjectDecryptor:
    """Streaming decryption of `IV || ciphertext || tag` fed in chunks of any size.

    `feed()` returns plaintext that is NOT yet authenticated (a view valid until the next call);
    callers write it somewhere private and release it only after `finalize()` returns.
    """

    def __init__(self, dek: bytes) -> None:
        self._dek = dek
        self._head = bytearray()
        self._ctx: Any = None
        self._tail = b""  # held back: the last 16 bytes seen may be the tag
        self._buf = bytearray(0)
        self.plaintext_size = 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> memoryview:
        if self._ctx is None:
            self._head += chunk
            if len(self._head) < IV_SIZE:
                return memoryview(b"")
            iv, chunk = bytes(self._head[:IV_SIZE]), bytes(self._head[IV_SIZE:])
            self._ctx = Cipher(algorithms.AES(self._dek), modes.GCM(iv)).decryptor()
        view = memoryview(chunk)
        if len(view) < TAG_SIZE:
            joined = self._tail + bytes(view)
            ready, self._tail = joined[:-TAG_SIZE] if len(joined) > TAG_SIZE else b"", joined[-TAG_SIZE:]
            return self._decrypt(memoryview(ready), memoryview(b""))
        out = self._decrypt(memoryview(self._tail), view[:-TAG_SIZE])
        self._tail = bytes(view[-TAG_SIZE:])
        return out

    def _decrypt(self, first: memoryview, second: memoryview) -> memoryview:
        need = len(first) + len(second) + 32
        if len(self._buf) < need:
            self._buf = bytearray(need)
        buf = memoryview(self._buf)
        n = self._ctx.update_into(first, buf) if len(first) else 0
        if len(second):
            n += self._ctx.update_into(second, buf[n:])
        self.plaintext_size += n
        return buf[:n]

    def finalize(self) -> None:
        """Verify the tag; raises decrypt_failed on mismatch, bad_envelope if the object was too short."""
        if self._ctx is None or len(self._tail) < TAG_SIZE:
            raise _bad(f"object is shorter than {OVERHEAD} bytes (IV and tag)")
        try:
            self._ctx.finalize_with_tag(self._tail)
        except InvalidTag:
            raise PermanentError(
                ErrorClass.DECRYPT_FAILED, "the object's GCM tag does not verify (tampered, truncated or wrong key)"
            ) from None


def encrypt_stream(src: IO[bytes], dst: IO[bytes], dek: bytes, chunk_size: int = 1 << 20) -> tuple[int, str]:
    """Encrypt `src` into `dst` as `IV || ciphertext || tag`; returns (plaintext size, sha256 hex)."""
    iv = os.urandom(IV_SIZE)
    enc = Cipher(algorithms.AES(dek), modes.GCM(iv)).encryptor()
    digest = hashlib.sha256()
    size = 0
    dst.write(iv)
    while chunk := src.read(chunk_size):
        digest.update(chunk)
        size += len(chunk)
        dst.write(enc.update(chunk))
    dst.write(enc.finalize())
    dst.write(enc.tag)
    return size, digest.hexdigest()


def metadata_json(
    wrapped_dek: bytes, original_filename: str, original_size: int, timestamp_ms: int | None = None
) -> bytes:
    """metadata.json byte-for-byte as the backend writes it (Jackson's pretty printer, its field order)."""
    fields = {
        "version": "1.0",
        "kek": base64.b64encode(wrapped_dek).decode("ascii"),
        "algorithm": "AES-GCM-256",
        "original_filename": original_filename,
        "file_id": None,
        "original_size": original_size,
        "encrypted_size": original_size + OVERHEAD,
        "verification_status": "VERIFIED",
        "timestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
    }
    return json.dumps(fields, indent=2, separators=(",", " : "), ensure_ascii=False).encode("utf-8")
