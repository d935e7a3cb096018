"""What the SMS backends share: phone numbers, the text of a message and its segments, what a provider
answered, and the interface a backend offers. No backend imports another; both import this.

Segments follow 3GPP TS 23.038 and 23.040: a text whose every character is in the GSM 7-bit default
alphabet or its extension table is sent as GSM-7 (160 septets in one segment, 153 a segment when it
takes several; a character of the extension table, such as `€`, `[` or `{`, takes two septets, and
the two are never split across segments); any other text is sent as UCS-2 (70 UTF-16 code units in
one segment, 67 a segment when several; a character beyond the Basic Multilingual Plane, such as an
emoji, takes two code units, never split).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, Protocol

E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
E164_EXAMPLE = "+ and 2 to 15 digits, no spaces, e.g. +14155550123"

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[]~|€")
GSM7_SINGLE, GSM7_PART = 160, 153  # septets: one segment alone; each segment of several (a 6-byte header)
UCS2_SINGLE, UCS2_PART = 70, 67  # UTF-16 code units
MAX_SEGMENTS = 10  # what Twilio advises at most; its own limit is 1600 characters
Encoding = Literal["GSM-7", "UCS-2"]


def is_e164(number: str) -> bool:
    return E164.match(number) is not None


def encoding_of(text: str) -> Encoding:
    """GSM-7 when every character is in the GSM default alphabet or its extension table; else UCS-2."""
    return "GSM-7" if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text) else "UCS-2"


def _units(text: str, encoding: Encoding) -> list[int]:
    """What each character takes: septets in GSM-7 (2 for the extension table), UTF-16 code units in UCS-2."""
    if encoding == "GSM-7":
        return [2 if c in GSM7_EXTENSION else 1 for c in text]
    return [2 if ord(c) > 0xFFFF else 1 for c in text]


def segments(text: str) -> int:
    """How many SMS segments `text` is sent in (0 for an empty text)."""
    encoding = encoding_of(text)
    return _pack(_units(text, encoding), encoding)


def _pack(units: list[int], encoding: Encoding) -> int:
    single, part = (GSM7_SINGLE, GSM7_PART) if encoding == "GSM-7" else (UCS2_SINGLE, UCS2_PART)
    if not units:
        return 0
    if sum(units) <= single:
        return 1
    count, used = 1, 0
    for size in units:  # a character's units stay together: a full segment starts the next one early
        if used + size > part:
            count, used = count + 1, 0
        used += size
    return count


@dataclass(frozen=True)
class Text:
    """A message body as it will be sent: its encoding, its segments, and whether it was cut to fit."""

    body: str
    encoding: Encoding
    segments: int
    truncated: bool


def fit(text: str, max_segments: int) -> Text:
    """`text` cut, at a character, to at most `max_segments` segments, ending with an ellipsis when cut
    (`...` in GSM-7, which has no `…`, so cutting never changes the encoding). Linear in the text's length."""
    encoding = encoding_of(text)
    units = _units(text, encoding)
    count = _pack(units, encoding)
    if count <= max_segments:
        return Text(text, encoding, count, False)
    ellipsis = "..." if encoding == "GSM-7" else "…"
    single, part = (GSM7_SINGLE, GSM7_PART) if encoding == "GSM-7" else (UCS2_SINGLE, UCS2_PART)
    capacity = single if max_segments == 1 else part
    reserve = sum(_units(ellipsis, encoding))
    segment, used, keep = 1, 0, 0
    for size in units:
        if used + size > capacity - (reserve if segment == max_segments else 0):
            if segment == max_segments:
                break
            segment, used = segment + 1, 0
        used += size
        keep += 1
    body = text[:keep].rstrip() + ellipsis
    return Text(body, encoding, _pack(_units(body, encoding), encoding), True)


def clean(text: str) -> str:
    """A rendered body with every control and format character but the line break made a space: a file
    name cannot hide text with a right-to-left override, nor carry an escape into the message."""
    return "".join(c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else " " for c in text).strip()


MASKED = re.compile(r"\+?[0-9][0-9 ().-]{5,}[0-9]")


def masked(text: str) -> str:
    """A provider's words with anything that looks like a phone number replaced: reasons name a
    recipient's position in SMS_TO, never its number."""
    return MASKED.sub("(number)", text)


@dataclass(frozen=True)
class Sent:
    """A message the provider accepted."""

    message_id: str
    segments: int | None = None
    """As the provider counted them, when it says (Twilio's `num_segments`)."""


class RecipientRefused(Exception):
    """The provider refused the recipient for good (not a number, not a mobile, opted out, a region not
    allowed): the same next time. `detail` names no number."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class Misconfigured(Exception):
    """The operator's to fix (credentials refused, a sender the account does not own, a wrong URL): the
    same for every upload until then. Retried, and said at error level naming what to check."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class Sender(Protocol):
    """One provider: `send` raises RecipientRefused, Misconfigured, RetryableError (with the provider's
    Retry-After as its delay, capped) or PermanentError (a message refused for good)."""

    provider: str
    origin: str
    """Where it sends, for logs and reasons: Twilio's scheme, host and port; SNS and its region."""

    async def start(self) -> None: ...

    async def send(self, to: str, body: str) -> Sent: ...

    async def close(self) -> None: ...
