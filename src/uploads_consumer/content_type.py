"""The verified plaintext's content type: its leading bytes (libmagic) first, then the file name.

When the bytes say nothing more specific than `application/octet-stream` (or the file is empty),
the clean file name's extension decides. libmagic comes from the system (Debian `libmagic1`); without
it the extension alone decides, and the daemon says so at start (and refuses ALLOWED_CONTENT_TYPES,
which must not rest on a name the uploader chose).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

HEAD_BYTES = 4096  # enough for every signature libmagic looks for at the start of common formats
OCTET_STREAM = "application/octet-stream"
_SAYS_NOTHING = {OCTET_STREAM, "application/x-empty", "inode/x-empty", "application/x-data", ""}
# Names libmagic gives that differ from the registered ones operators write in globs.
_CANONICAL = {
    "audio/x-wav": "audio/wav",
    "audio/x-m4a": "audio/mp4",
    "audio/x-hx-aac-adts": "audio/aac",
    "audio/x-flac": "audio/flac",
    "audio/x-aiff": "audio/aiff",
}

# libmagic's own text analysis costs milliseconds per file (it tries every text rule on the
# buffer), ten times a binary format's lookup: it is skipped, and text is recognised here instead.
_MAGIC_MIME_TYPE = 0x10
_MAGIC_NO_CHECK_TEXT = 0x20000
_MAGIC_NO_CHECK_ENCODING = 0x200000
_TEXT_CONTROLS = set(range(32)) - {9, 10, 12, 13}

_magic: Any = None
_magic_problem: str | None = None


def _load_magic() -> Any:
    global _magic, _magic_problem
    if _magic is None and _magic_problem is None:
        try:
            import magic

            cookie = magic.Magic(mime=True)
            magic.magic_setflags(cookie.cookie, _MAGIC_MIME_TYPE | _MAGIC_NO_CHECK_TEXT | _MAGIC_NO_CHECK_ENCODING)
            _magic = cookie
        except Exception as exc:  # noqa: BLE001 - ImportError, or libmagic missing (an ImportError or OSError)
            _magic_problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return _magic


def sniffing_problem() -> str | None:
    """None when libmagic is usable; else why not (for a warning at start)."""
    _load_magic()
    return _magic_problem


def from_name(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return _CANONICAL.get(guessed or "", guessed or OCTET_STREAM)


def is_text(head: bytes) -> bool:
    """UTF-8 (a character cut off at the end allowed) without control characters but tab and line breaks."""
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return False
    return not _TEXT_CONTROLS.intersection(head)


def from_bytes(head: bytes) -> str:
    """The MIME type leading bytes reveal; `application/octet-stream` when they say nothing more."""
    magic = _load_magic()
    if magic is None or not head:
        return OCTET_STREAM
    kind = str(magic.from_buffer(head[:HEAD_BYTES])).split(";", 1)[0].strip().lower()
    if kind in _SAYS_NOTHING:
        return "text/plain" if is_text(head[:HEAD_BYTES]) else OCTET_STREAM
    return _CANONICAL.get(kind, kind)


def content_type(head: bytes, filename: str) -> str:
    """The content type of a file that starts with `head` and whose clean name is `filename`."""
    kind = from_bytes(head)
    return kind if kind != OCTET_STREAM else from_name(filename)


def sniff(path: Path, filename: str) -> str:
    """The content type of the file at `path`, whose clean name is `filename`."""
    with open(path, "rb") as f:
        return content_type(f.read(HEAD_BYTES), filename)
