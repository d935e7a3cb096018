"""Content types: the leading bytes (libmagic) decide; the clean file name only when they say nothing."""

from __future__ import annotations

import pytest

from uploads_consumer.content_type import OCTET_STREAM, from_bytes, from_name, sniff, sniffing_problem

WAV_HEADER = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80\x3e\x00\x00\x00\x7d\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00"


def test_libmagic_is_available_here():
    assert sniffing_problem() is None, "apt-get install libmagic1"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
        (b"Minutes of the meeting.\nDecisions: ship it.\n", "text/plain"),
        (WAV_HEADER, "audio/wav"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00", "image/png"),
    ],
)
def test_the_bytes_decide(head, expected):
    assert from_bytes(head) == expected


def test_the_bytes_win_over_a_misleading_name(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    assert sniff(path, "song.mp3") == "application/pdf"


def test_an_empty_file_is_named_by_its_extension(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"")
    assert sniff(path, "silence.wav") == "audio/wav"
    assert sniff(path, "notes.txt") == "text/plain"
    assert sniff(path, "no-extension") == OCTET_STREAM


def test_bytes_that_say_nothing_fall_back_to_the_name(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00" * 64)
    assert from_bytes(b"\x00" * 64) == OCTET_STREAM
    assert sniff(path, "voice memo.m4a") == "audio/mp4"


def test_names_map_to_registered_types():
    assert from_name("a.mp3") == "audio/mpeg"
    assert from_name("a.WAV") == "audio/wav"
    assert from_name("a.unknownext") == OCTET_STREAM
