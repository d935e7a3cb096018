"""The `save` processor: safe path components, atomic private files, nothing outside the root."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import structlog
from helpers import INTEROP

from uploads_consumer.config import Settings
from uploads_consumer.envelope import EnvelopeMetadata, parse_metadata
from uploads_consumer.errors import ErrorClass, PermanentError
from uploads_consumer.events import FileUploadEvent, parse_event
from uploads_consumer.processors import ProcessingContext
from uploads_consumer.processors.save import MAX_COMPONENT_BYTES, safe_component, save, save_file

BASIC_BODY = (INTEROP / "messages" / "basic.bin").read_bytes()
BASIC_METADATA = (INTEROP / "objects" / "basic" / "1.bin").read_bytes()
UNICODE_BODY = (INTEROP / "messages" / "unicode_name.bin").read_bytes()
UNICODE_METADATA = (INTEROP / "objects" / "unicode_name" / "1.bin").read_bytes()


# ---- safe_component --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "maria+test@example.com",
        "grabación final (1).mp3",
        "voice note.m4a",
        "a.b.c",
        "日本語の録音.wav",
        "Ünïcödé ñame",
    ],
)
def test_safe_component_keeps_ordinary_characters(name):
    assert safe_component(name) == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("a\x00b", "a_b"),
        ("a\nb", "a_b"),
        ("a\rb", "a_b"),
        ("a\x1bb", "a_b"),
        ("a\x7fb", "a_b"),
        ("a\x85b", "a_b"),
    ],
    ids=["slash", "backslash", "nul", "newline", "cr", "escape", "del", "c1-control"],
)
def test_safe_component_turns_separators_and_controls_into_underscore(name, expected):
    assert safe_component(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "...",
        "/",
        "../",
        "./..",
        ".hidden",
        " ",
        " .. ",
        "\x00",
        "\t.",
        "..\\..",
        "/etc/passwd",
        "../../etc",
    ],
)
def test_safe_component_never_returns_a_dangerous_name(name):
    result = safe_component(name)
    assert result not in ("", ".", "..")
    assert not result.startswith(".")
    assert "/" not in result and "\\" not in result and "\x00" not in result


def test_safe_component_cuts_long_names_keeping_the_extension():
    result = safe_component("a" * 300 + ".mp3")
    assert len(result.encode("utf-8")) <= MAX_COMPONENT_BYTES
    assert result.endswith(".mp3")
    assert result.startswith("aaaa")


def test_safe_component_cuts_long_multibyte_names_by_utf8_bytes():
    result = safe_component("ñ" * 300 + ".m4a")
    assert len(result.encode("utf-8")) <= MAX_COMPONENT_BYTES
    assert result.endswith(".m4a")
    assert set(result.removesuffix(".m4a")) == {"ñ"}  # cut on whole characters


def test_safe_component_cuts_long_names_without_extension():
    result = safe_component("x" * 1000)
    assert 0 < len(result.encode("utf-8")) <= MAX_COMPONENT_BYTES


def test_safe_component_leaves_a_name_at_the_limit_alone():
    name = "b" * (MAX_COMPONENT_BYTES - 4) + ".mp3"
    assert safe_component(name) == name


# ---- save_file ---------------------------------------------------------------------------------------


def make_event(email: str | None = None, body: bytes = BASIC_BODY) -> FileUploadEvent:
    event = parse_event(body)
    if email is not None:
        event = event.model_copy(update={"email": email})
    return event


def make_metadata(filename: str | None = None, raw: bytes = BASIC_METADATA) -> EnvelopeMetadata:
    if filename is None:
        return parse_metadata(raw)
    data = json.loads(raw)
    data["original_filename"] = filename
    return parse_metadata(json.dumps(data).encode())


def make_ctx(
    tmp_path: Path,
    content: bytes = b"plaintext bytes",
    event: FileUploadEvent | None = None,
    metadata: EnvelopeMetadata | None = None,
    name: str = "plain.bin",
) -> ProcessingContext:
    plaintext = tmp_path / "work" / name
    plaintext.parent.mkdir(exist_ok=True)
    plaintext.write_bytes(content)
    return ProcessingContext(
        event=event or make_event(),
        metadata=metadata or make_metadata(),
        plaintext_path=plaintext,
        size=len(content),
        sha256="",
        settings=Settings(decrypt_download_path=tmp_path / "out"),
        log=structlog.get_logger("test"),
    )


def all_files(folder: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(folder) for f in files]


def test_save_writes_email_uuid_clean_name(tmp_path):
    dest = save_file(make_ctx(tmp_path, b"hello"))
    expected = (tmp_path / "out" / "user@example.com" / "1cbfac96-1cb1-45b2-a682-39c0de4ea705" / "audio.mp3").resolve()
    assert dest == expected
    assert expected.read_bytes() == b"hello"


def test_save_keeps_the_backend_layout_for_unicode_names(tmp_path):
    ctx = make_ctx(tmp_path, event=make_event(body=UNICODE_BODY), metadata=make_metadata(raw=UNICODE_METADATA))
    dest = save_file(ctx)
    assert dest.relative_to((tmp_path / "out").resolve()).parts == (
        "maria+test@example.com",
        "1624ff24-6418-44db-ad46-e7afb5f25946",
        "grabación final (1).mp3",
    )


def test_saved_file_is_private(tmp_path):
    dest = save_file(make_ctx(tmp_path))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_saved_folders_are_private(tmp_path):
    dest = save_file(make_ctx(tmp_path))
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(dest.parent.parent.stat().st_mode) == 0o700


def test_save_replaces_an_existing_file_atomically(tmp_path):
    first = save_file(make_ctx(tmp_path, b"old contents", name="one.bin"))
    with open(first, "rb") as reader:  # a reader that opened the old file keeps seeing all of it
        second = save_file(make_ctx(tmp_path, b"new contents, longer", name="two.bin"))
        assert second == first
        assert reader.read() == b"old contents"
    assert second.read_bytes() == b"new contents, longer"


def test_save_replaces_a_symlink_at_the_destination_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"untouched")
    dest = save_file(make_ctx(tmp_path, b"first"))
    dest.unlink()
    dest.symlink_to(victim)
    save_file(make_ctx(tmp_path, b"second", name="again.bin"))
    assert victim.read_bytes() == b"untouched"
    assert not dest.is_symlink()
    assert dest.read_bytes() == b"second"


def test_save_leaves_no_part_file_behind(tmp_path):
    save_file(make_ctx(tmp_path, name="a.bin"))
    save_file(make_ctx(tmp_path, name="b.bin"))
    names = [p.name for p in all_files(tmp_path / "out")]
    assert names == ["audio.mp3"]
    assert not any(n.endswith(".part") for n in names)


def test_save_leaves_the_plaintext_in_place(tmp_path):
    ctx = make_ctx(tmp_path, b"keep me")
    save_file(ctx)
    assert ctx.plaintext_path.read_bytes() == b"keep me"


def test_save_never_writes_outside_the_root_for_a_traversal_email(tmp_path):
    root = (tmp_path / "out").resolve()
    dest = save_file(make_ctx(tmp_path, event=make_event(email="../../etc")))
    assert dest.resolve().is_relative_to(root)
    assert dest.parent.parent.parent == root
    assert [p.relative_to(tmp_path) for p in all_files(tmp_path) if not p.is_relative_to(tmp_path / "work")] == [
        dest.relative_to(tmp_path)
    ]


def test_save_never_writes_outside_the_root_for_a_traversal_filename(tmp_path):
    root = (tmp_path / "out").resolve()
    dest = save_file(make_ctx(tmp_path, metadata=make_metadata("../x")))
    assert dest.parent == root / "user@example.com" / "1cbfac96-1cb1-45b2-a682-39c0de4ea705"
    assert not (tmp_path / "out" / "user@example.com" / "x").exists()
    assert [p for p in all_files(tmp_path) if not p.is_relative_to(tmp_path / "work")] == [dest]


def test_save_refuses_a_symlinked_email_folder_pointing_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "out"
    root.mkdir(mode=0o700)
    (root / "user@example.com").symlink_to(outside, target_is_directory=True)

    with pytest.raises(PermanentError) as info:
        save_file(make_ctx(tmp_path))

    assert info.value.error_class is ErrorClass.PROCESSOR_FAILED
    assert list(outside.iterdir()) == []
    assert all_files(root) == []


def test_save_refuses_a_symlinked_uuid_folder_pointing_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    email_dir = tmp_path / "out" / "user@example.com"
    email_dir.mkdir(parents=True)
    (email_dir / "1cbfac96-1cb1-45b2-a682-39c0de4ea705").symlink_to(outside, target_is_directory=True)

    with pytest.raises(PermanentError) as info:
        save_file(make_ctx(tmp_path))

    assert info.value.error_class is ErrorClass.PROCESSOR_FAILED
    assert list(outside.iterdir()) == []


async def test_save_processor_reports_the_saved_path(tmp_path):
    ctx = make_ctx(tmp_path, b"async")
    await save(ctx)
    saved = Path(ctx.outputs["saved_path"])
    assert saved.read_bytes() == b"async"
    assert saved.name == "audio.mp3"
