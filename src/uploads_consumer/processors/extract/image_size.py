"""The pixel size of each page of an image, from its header alone (PNG, JPEG, TIFF, WebP), so a bomb is
refused before a decoder allocates anything. Standard library only: the document reader runs it in
its sandbox, where the package is not imported."""

from __future__ import annotations

import struct
from typing import BinaryIO

FORMATS = ("png", "jpeg", "tiff", "webp")
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


class NotThatImage(ValueError):
    """The bytes are not an image of the format they were taken for, or its header is broken."""


def page_sizes(path: str, kind: str, most: int) -> list[tuple[int, int]]:
    """(width, height) of each page (one but for a multi-page TIFF), at most `most` + 1 of them: more than
    `most` says there are too many, without reading on."""
    with open(path, "rb") as f:
        if kind == "png":
            return [_png(f)]
        if kind == "jpeg":
            return [_jpeg(f)]
        if kind == "tiff":
            return _tiff(f, most)
        if kind == "webp":
            return [_webp(f)]
    raise NotThatImage(f"{kind} is not a format read here")


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise NotThatImage("the header is cut short")
    return data


def _png(f: BinaryIO) -> tuple[int, int]:
    head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise NotThatImage("not a PNG")
    return struct.unpack(">II", head[16:24])


def _jpeg(f: BinaryIO) -> tuple[int, int]:
    if f.read(2) != b"\xff\xd8":
        raise NotThatImage("not a JPEG")
    while True:
        byte = _read(f, 1)
        if byte != b"\xff":
            raise NotThatImage("a broken JPEG marker")
        marker = _read(f, 1)[0]
        while marker == 0xFF:  # fill bytes
            marker = _read(f, 1)[0]
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise NotThatImage("a JPEG without a frame")
        (length,) = struct.unpack(">H", _read(f, 2))
        if length < 2:
            raise NotThatImage("a broken JPEG segment")
        if marker in _JPEG_FRAMES:
            _precision, height, width = struct.unpack(">BHH", _read(f, 5))
            return width, height
        f.seek(length - 2, 1)


def _tiff(f: BinaryIO, most: int) -> list[tuple[int, int]]:
    head = _read(f, 8)
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(head[:4])
    if order is None:
        raise NotThatImage(
            "a BigTIFF, which is not read here" if head[:4] in (b"II+\x00", b"MM\x00+") else "not a TIFF"
        )
    (offset,) = struct.unpack(order + "I", head[4:8])
    sizes: list[tuple[int, int]] = []
    seen: set[int] = set()
    while offset and len(sizes) <= most:
        if offset in seen:
            raise NotThatImage("a TIFF whose pages loop")
        seen.add(offset)
        f.seek(offset)
        (count,) = struct.unpack(order + "H", _read(f, 2))
        width = height = None
        for _ in range(count):
            tag, kind, _n, value = struct.unpack(order + "HHI4s", _read(f, 12))
            if tag in (256, 257):
                number = struct.unpack(order + ("H" if kind == 3 else "I"), value[: 2 if kind == 3 else 4])[0]
                width, height = (number, height) if tag == 256 else (width, number)
        if width is None or height is None:
            raise NotThatImage("a TIFF page without a width or height")
        sizes.append((width, height))
        (offset,) = struct.unpack(order + "I", _read(f, 4))
    if not sizes:
        raise NotThatImage("a TIFF without a page")
    return sizes


def _webp(f: BinaryIO) -> tuple[int, int]:
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        raise NotThatImage("not a WebP")
    chunk = head[12:16]
    if chunk == b"VP8 ":
        if head[23:26] != b"\x9d\x01\x2a":
            raise NotThatImage("a broken WebP frame")
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if head[20] != 0x2F:
            raise NotThatImage("a broken lossless WebP")
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    raise NotThatImage("a WebP of a kind not read here")
