"""The `save` processor: safe path components, atomic private files, nothing outside the root."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest
import structlog
from helpers import INTEROP

from uploads_consumer.envelope import EnvelopeMetadata, parse_metadata
from uploads_consumer.errors import ErrorClass, PermanentError, RetryableError
from uploads_consumer.events import FileUploadEvent, parse_event
from uploads_consumer.processors import ProcessingContext
from uploads_consumer.processors.save import (
    MAX_COMPONENT_BYTES,
    place_bytes,
    place_file,
    safe_component,
    save,
    save_file,
)

BASIC_BODY = (INTEROP / "messages" / "basic.bin").read_bytes()
BASIC_METADATA = (INTEROP / "objects" / "basic" / "1.bin").read_bytes()
UNICODE_BODY = (INTEROP / "messages" / "unicode_name.bin").read_bytes()
UNICODE_METADATA = (INTEROP / "objects" / "unicode_name" / "1.bin").read_bytes()
UUID = "1cbfac96-1cb1-45b2-a682-39c0de4ea705"  # the file_uuid of basic.bin


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
    """A context as the pipeline builds it: plaintext in the message's work folder, `save` running."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    plaintext = work / name
    plaintext.write_bytes(content)
    return ProcessingContext(
        event=event or make_event(),
        metadata=metadata or make_metadata(),
        plaintext_path=plaintext,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        content_type="application/octet-stream",
        download_path=tmp_path / "out",
        work_dir=work,
        log=structlog.get_logger("test"),
        current="save",
    )


def all_files(folder: Path) -> list[Path]:
    """Every file under `folder`; symlinked folders are neither listed nor followed."""
    return [Path(d) / f for d, _, files in os.walk(folder) for f in files]


def outside_the_work_folder(tmp_path: Path) -> list[Path]:
    return sorted(p for p in all_files(tmp_path) if not p.is_relative_to(tmp_path / "work"))


@pytest.fixture
def copy_only(monkeypatch):
    """No hard links (another file system, or one that refuses them): `place_file` must copy."""

    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)


def test_save_writes_email_uuid_clean_name(tmp_path):
    dest = save_file(make_ctx(tmp_path, b"hello"))
    expected = (tmp_path / "out" / "user@example.com" / UUID / "audio.mp3").resolve()
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


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_saved_file_is_private(tmp_path, mode, request):
    if mode == "copy":
        request.getfixturevalue("copy_only")
    dest = save_file(make_ctx(tmp_path))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_saved_folders_are_private(tmp_path):
    dest = save_file(make_ctx(tmp_path))
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(dest.parent.parent.stat().st_mode) == 0o700


def test_save_replaces_the_destination_by_renaming_a_new_file_over_it(tmp_path):
    """The old file's inode is not written to: a reader holding it open keeps all of it, and the
    name points at a different, complete inode afterwards. Writing in place keeps the inode."""
    first = save_file(make_ctx(tmp_path, b"old contents", name="one.bin"))
    old_inode = os.lstat(first).st_ino
    with open(first, "rb") as reader:
        second = save_file(make_ctx(tmp_path, b"new contents, longer", name="two.bin"))
        assert second == first
        assert os.fstat(reader.fileno()).st_ino == old_inode
        assert reader.read() == b"old contents"
    assert os.lstat(second).st_ino != old_inode
    assert second.read_bytes() == b"new contents, longer"


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_a_concurrent_reader_only_ever_sees_a_whole_file(tmp_path, mode, request):
    """Replace a large file again and again while another thread reads it in a tight loop: every
    read must be exactly the old or exactly the new contents, never a prefix, a mix or nothing."""
    if mode == "copy":
        request.getfixturevalue("copy_only")
    size = 4 * 1024 * 1024
    versions = [bytes([0x41 + i]) * (size + i * 65536) for i in range(3)]  # different bytes and lengths
    sources = []
    for i, data in enumerate(versions):
        src = tmp_path / "work" / f"v{i}.bin"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(data)
        sources.append(src)
    root = tmp_path / "out"
    dest = place_file(root, "user@example.com", UUID, "big.bin", sources[0], len(versions[0]))

    stop = threading.Event()
    reads: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(dest, "rb") as f:
                    data = f.read()
            except OSError as exc:  # the name missing, even for a moment, is not atomic either
                bad.append(f"open failed: {exc}")
                continue
            reads.append(len(data))
            if data not in versions:
                bad.append(f"read {len(data)} bytes, starting {data[:1]!r}, ending {data[-1:]!r}")

    def opener() -> None:  # cheap, so it also hits a short window in which the name is missing
        while not stop.is_set():
            try:
                os.close(os.open(dest, os.O_RDONLY))
            except OSError as exc:
                bad.append(f"open failed: {exc}")

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=opener, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        rounds = 0  # at least 60 replacements, and as many as it takes the reader to read 20 times
        while (rounds < 60 or len(reads) < 20) and rounds < 5000 and not bad:
            rounds += 1
            i = rounds % len(versions)
            place_file(root, "user@example.com", UUID, "big.bin", sources[i], len(versions[i]))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not bad, bad[:5]
    assert len(reads) >= 20, "the reader ran alongside the writer"
    assert dest.read_bytes() == versions[rounds % len(versions)]
    for src, data in zip(sources, versions, strict=True):
        assert src.read_bytes() == data, "the sources were never written to"


def test_save_replaces_a_symlink_at_the_destination_and_leaves_its_target_alone(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"untouched")
    before = os.stat(victim)
    dest = save_file(make_ctx(tmp_path, b"first"))
    dest.unlink()
    dest.symlink_to(victim)

    saved = save_file(make_ctx(tmp_path, b"second", name="again.bin"))

    assert saved == dest
    assert stat.S_ISREG(os.lstat(dest).st_mode), "the link itself was replaced by a regular file"
    assert dest.read_bytes() == b"second"
    assert victim.read_bytes() == b"untouched"
    after = os.stat(victim)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert sorted(outside.iterdir()) == [victim]


def test_save_replaces_a_dangling_symlink_at_the_destination_without_creating_its_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = save_file(make_ctx(tmp_path, b"first"))
    dest.unlink()
    dest.symlink_to(outside / "planted.txt")

    save_file(make_ctx(tmp_path, b"second", name="again.bin"))

    assert stat.S_ISREG(os.lstat(dest).st_mode)
    assert dest.read_bytes() == b"second"
    assert list(outside.iterdir()) == [], "nothing was created through the link"


def test_save_leaves_no_part_file_behind(tmp_path):
    save_file(make_ctx(tmp_path, name="a.bin"))
    save_file(make_ctx(tmp_path, name="b.bin"))
    names = [p.name for p in all_files(tmp_path / "out")]
    assert names == ["audio.mp3"]


def test_save_leaves_the_plaintext_in_place(tmp_path):
    ctx = make_ctx(tmp_path, b"keep me")
    save_file(ctx)
    assert ctx.plaintext_path.read_bytes() == b"keep me"


def test_save_never_writes_outside_the_root_for_a_traversal_email(tmp_path):
    root = (tmp_path / "out").resolve()
    dest = save_file(make_ctx(tmp_path, event=make_event(email="../../etc")))
    assert dest.resolve().is_relative_to(root)
    assert dest.parent.parent.parent == root
    assert outside_the_work_folder(tmp_path) == [dest]


def test_save_never_writes_outside_the_root_for_a_traversal_filename(tmp_path):
    root = (tmp_path / "out").resolve()
    dest = save_file(make_ctx(tmp_path, metadata=make_metadata("../x")))
    assert dest.parent == root / "user@example.com" / UUID
    assert outside_the_work_folder(tmp_path) == [dest]


def plant_outside(tmp_path: Path) -> tuple[Path, dict[Path, bytes]]:
    """A folder outside the root that a planted symlink points at, with a file where the link would lead."""
    outside = tmp_path / "outside"
    (outside / UUID).mkdir(parents=True)
    (outside / UUID / "audio.mp3").write_bytes(b"outside, untouched")
    (outside / "audio.mp3").write_bytes(b"outside too")
    return outside, {p: p.read_bytes() for p in all_files(outside)}


def test_save_refuses_a_symlinked_email_folder_pointing_outside(tmp_path):
    outside, before = plant_outside(tmp_path)
    root = tmp_path / "out"
    root.mkdir(mode=0o700)
    link = root / "user@example.com"
    link.symlink_to(outside, target_is_directory=True)

    with pytest.raises(PermanentError) as info:
        save_file(make_ctx(tmp_path))

    assert info.value.error_class is ErrorClass.PROCESSOR_FAILED
    assert {p: p.read_bytes() for p in all_files(outside)} == before, "nothing outside was written or added"
    assert all_files(root) == [] and link.is_symlink()


def test_save_refuses_a_symlinked_uuid_folder_pointing_outside(tmp_path):
    outside, before = plant_outside(tmp_path)
    email_dir = tmp_path / "out" / "user@example.com"
    email_dir.mkdir(parents=True, mode=0o700)
    link = email_dir / UUID
    link.symlink_to(outside, target_is_directory=True)

    with pytest.raises(PermanentError) as info:
        save_file(make_ctx(tmp_path))

    assert info.value.error_class is ErrorClass.PROCESSOR_FAILED
    assert {p: p.read_bytes() for p in all_files(outside)} == before, "nothing outside was written or added"
    assert all_files(tmp_path / "out") == [] and link.is_symlink()


def test_save_refuses_a_file_planted_where_a_folder_belongs(tmp_path):
    email_dir = tmp_path / "out" / "user@example.com"
    email_dir.mkdir(parents=True, mode=0o700)
    (email_dir / UUID).write_bytes(b"not a folder")

    with pytest.raises(PermanentError):
        save_file(make_ctx(tmp_path))

    assert (email_dir / UUID).read_bytes() == b"not a folder"


def test_the_file_is_durable_before_its_rename_and_every_folder_that_gained_an_entry_after(tmp_path, monkeypatch):
    """fsync of the file, then the rename, then fsync of its folder and of each folder made for it (a
    new folder's own entry is durable only once its parent is synced); a later file in the same
    folder syncs that folder alone."""
    real_fsync, real_replace = os.fsync, os.replace
    calls: list[tuple[str, str]] = []

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        calls.append(("replace", str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root = tmp_path / "out"
    root.mkdir()
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")

    dest = place_file(root, "user@example.com", UUID, "a.bin", src, 4)

    folder = dest.parent
    assert calls[1:] == [
        ("replace", str(dest)),
        ("fsync", str(folder)),
        ("fsync", str(folder.parent)),
        ("fsync", str(root)),
    ]
    assert calls[0][0] == "fsync" and Path(calls[0][1]).parent == folder and calls[0][1].endswith(".part")
    calls.clear()
    second = place_file(root, "user@example.com", UUID, "b.bin", src, 4)
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"] and calls[2] == ("fsync", str(folder))
    assert second.read_bytes() == b"data"


def test_a_download_folder_removed_while_running_is_made_again(tmp_path):
    root = tmp_path / "out"
    first = save_file(make_ctx(tmp_path, b"one", name="a.bin"))
    shutil.rmtree(root)
    again = save_file(make_ctx(tmp_path, b"two", name="b.bin"))
    assert again == first and again.read_bytes() == b"two"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


# ---- place_file: the size check, place_bytes -----------------------------------------------------


@pytest.mark.parametrize("mode", ["link", "copy"])
@pytest.mark.parametrize("actual", [0, 999, 1001])
def test_place_file_refuses_a_file_that_is_not_the_declared_size(tmp_path, mode, actual, request):
    """A copy cut short (a full disk, a quota; here: a source of the wrong size) is never renamed
    into place: RetryableError, no destination, no temporary file, an existing file kept."""
    if mode == "copy":
        request.getfixturevalue("copy_only")
    root = tmp_path / "out"
    good = tmp_path / "good.bin"
    good.write_bytes(b"g" * 10)
    dest = place_file(root, "user@example.com", UUID, "f.bin", good, 10)
    short = tmp_path / "short.bin"
    short.write_bytes(b"s" * actual)

    with pytest.raises(RetryableError):
        place_file(root, "user@example.com", UUID, "f.bin", short, 1000)

    assert dest.read_bytes() == b"g" * 10, "the previous file is still whole"
    assert all_files(root) == [dest], "no temporary file left behind"

    with pytest.raises(RetryableError):
        place_file(root, "user@example.com", UUID, "new.bin", short, 1000)
    assert not (dest.parent / "new.bin").exists()
    assert all_files(root) == [dest]


def test_place_file_turns_a_full_disk_mid_copy_into_retryable_and_cleans_up(tmp_path, copy_only, monkeypatch):
    root = tmp_path / "out"
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10_000)

    def copy_then_fill_the_disk(source, target, *, follow_symlinks=True):
        Path(target).write_bytes(Path(source).read_bytes()[:4096])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", copy_then_fill_the_disk)
    with pytest.raises(RetryableError, match="No space left"):
        place_file(root, "user@example.com", UUID, "a.bin", src, 10_000)
    assert all_files(root) == []


def test_place_bytes_writes_a_private_file_and_cleans_its_work_file(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    data = "transcripción\n".encode() * 1000
    dest = place_bytes(tmp_path / "out", work, "user@example.com", UUID, "../notes.txt", data)
    assert dest == (tmp_path / "out").resolve() / "user@example.com" / UUID / "_._notes.txt"
    assert dest.read_bytes() == data
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o600
    assert list(work.iterdir()) == [], "the temporary file in the work folder is gone"
    assert all_files(tmp_path / "out") == [dest]

    again = place_bytes(tmp_path / "out", work, "user@example.com", UUID, "../notes.txt", b"")
    assert again == dest and dest.read_bytes() == b""
    assert list(work.iterdir()) == []


# ---- the processor ---------------------------------------------------------------------------------


async def test_save_processor_copies_when_the_file_system_refuses_hard_links(tmp_path, copy_only):
    ctx = make_ctx(tmp_path, b"copied")
    await save(ctx)
    saved = Path(ctx.outputs["save"]["path"])
    assert saved.read_bytes() == b"copied"
    assert stat.S_IMODE(os.lstat(saved).st_mode) == 0o600
    assert [p.name for p in all_files(tmp_path / "out")] == ["audio.mp3"]
    assert ctx.plaintext_path.read_bytes() == b"copied"


async def test_save_processor_reports_the_saved_path_under_its_name(tmp_path):
    ctx = make_ctx(tmp_path, b"async")
    await save(ctx)
    assert set(ctx.outputs) == {"save"}
    saved = Path(ctx.outputs["save"]["path"])
    assert saved.read_bytes() == b"async"
    assert saved == (tmp_path / "out").resolve() / "user@example.com" / UUID / "audio.mp3"
