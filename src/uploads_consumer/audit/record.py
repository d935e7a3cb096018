"""The record: its fields, its canonical form and its hash, and the chain each writer makes of its records.

Two formats. Format 1's hash covers every field as it is. Format 2 (written since the trail could
forget a person) covers, instead of each personal field, a salted commitment to it: SHA-256 of the
record's random salt, the field's name and its value. `audit forget` removes the values and the salt
and keeps the commitments, so the hash still verifies; without the salt, a commitment tells nothing
of the value (an email could otherwise be found again by trying addresses).

Format and guarantees: docs/contract.md, "12. Audit trail".
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

FORMAT = 2
"""What the trail writes; format 1 records stay valid and are verified as they were written."""
ZERO_HASH = "0" * 64
PERSONAL = ("email", "filename", "reason")
"""Fields that may say who someone is: the uploader's address, a file's name, and a reason (it may
quote either, or what a mail server answered about an address). `audit forget` removes them."""
_COMMON = (
    "format",
    "writer",
    "seq",
    "prev_hash",
    "recorded_at",
    "consumer",
    "host",
    "pid",
    "stream",
    "stream_seq",
    "deliveries",
    "event_id",
    "file_uuid",
    "bucket",
    "size",
    "content_type",
    "sha256",
    "outcome",
    "error_class",
    "duration_ms",
    "processors",
    "skipped",
)
COMMITMENTS = tuple(f"{name}_commitment" for name in PERSONAL)
FIELDS_V1 = (*_COMMON[:13], "email", "filename", *_COMMON[13:19], "reason", *_COMMON[19:])
"""What a format 1 record's hash covers: every field but `hash`, the personal ones as they are."""
FIELDS = (*_COMMON, *COMMITMENTS)
"""What a format 2 record's hash covers: the personal fields through their commitments."""
COLUMNS = (*FIELDS_V1, "salt", *COMMITMENTS, "hash")
"""What a store keeps of a record (format 1 records have no salt and no commitments)."""
LISTS = ("processors", "skipped")  # arrays of strings (JSON text in a store)

Record = dict[str, Any]


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # made once: verify's hot path


def _json(value: Any) -> str:
    return _CANONICAL.encode(value)


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is taken over: its format's fields as one JSON object, keys sorted, no
    whitespace, non-ASCII as UTF-8 (for strings, integers, null and lists of strings: RFC 8785)."""
    fields = FIELDS_V1 if record.get("format") == 1 else FIELDS
    return _json({k: record[k] for k in fields}).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def commitment(salt: str, name: str, value: str | None) -> str | None:
    """SHA-256 of the salt's 16 bytes, the field's name, a NUL and the value in UTF-8; null for null."""
    if value is None:
        return None
    return hashlib.sha256(bytes.fromhex(salt) + name.encode() + b"\0" + value.encode()).hexdigest()


def committed(entry: Mapping[str, Any]) -> Record:
    """A format 2 entry with a fresh salt and the commitments of its personal fields."""
    salt = secrets.token_hex(16)
    record = {**entry, "format": FORMAT, "salt": salt}
    for name in PERSONAL:
        record[f"{name}_commitment"] = commitment(salt, name, entry[name])
    return record


def chained(entries: Iterable[Mapping[str, Any]], writer: str, seq: int, prev_hash: str) -> list[Record]:
    """Entries as the records that follow (seq, prev_hash) in `writer`'s chain."""
    records = []
    for entry in entries:
        seq += 1
        record = {**entry, "writer": writer, "seq": seq, "prev_hash": prev_hash}
        record["hash"] = prev_hash = record_hash(record)
        records.append(record)
    return records
