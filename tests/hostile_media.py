"""Hostile media the limit tests feed the daemon, made here without holding them decoded in memory."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# Adam7's seven passes: (first column, first row, column step, row step).
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def interlaced_png(path: Path, width: int = 9999, height: int = 9999) -> Path:
    """An Adam7-interlaced 16-bit RGBA PNG of zero pixels (the expert review's file of issue 28 at its
    default size: 9999×9999, under IMAGE_MAX_PIXELS, 800 MB decoded, 3.5 MB on disk).
    Written a row at a time: the test process never holds it decoded."""
    pixel = 8  # 4 samples of 16 bits
    deflate = zlib.compressobj(1)
    body = bytearray()
    for x0, y0, dx, dy in ADAM7:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if not columns:
            continue
        row = bytes(1 + columns * pixel)  # filter type 0, then zero samples
        for _ in range(rows):
            body += deflate.compress(row)
    body += deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 1)  # 16 bits, RGBA, Adam7
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", bytes(body)) + _chunk(b"IEND", b"")
    )
    return path
