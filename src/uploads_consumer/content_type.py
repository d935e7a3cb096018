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

HEAD_BYTES = 64 * 1024
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

_magic: Any = None
_magic_problem: str | None = None


def _load_magic() -> Any:
    global _magic, _magic_problem
    if _magic is None and _magic_problem is None:
        try:
            import magic

            _magic = magic.Magic(mime=True)
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


def from_bytes(head: bytes) -> str:
    """libmagic's MIME type for leading bytes; `application/octet-stream` when it cannot tell."""
    magic = _load_magic()
    if magic is None or not head:
        return OCTET_STREAM
    kind = str(magic.from_buffer(head)).split(";", 1)[0].strip().lower()
    return _CANONICAL.get(kind, kind) if kind not in _SAYS_NOTHING else OCTET_STREAM


def sniff(path: Path, filename: str) -> str:
    """The content type of the file at `path`, whose clean name is `filename`."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    kind = from_bytes(head)
    return kind if kind != OCTET_STREAM else from_name(filename)
