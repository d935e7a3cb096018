"""Hostile input through the real daemon: whoever can publish to file.uploads or write to the bucket
gets every bad message dead-lettered with the right class on its first delivery, while good uploads
still go through, the daemon stays alive, and nothing is written outside DECRYPT_DOWNLOAD_PATH."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from helpers import provision_now, publish_raw, read_stream, wait_settled

from uploads_consumer.envelope import MasterKeyRing, encrypt_stream, metadata_json
from uploads_consumer.pipeline import WORK_DIR_NAME
from uploads_consumer.processors.save import safe_component

MAX_FILE_SIZE = 64 * 1024
HOSTILE = "hostile@example.com"


# ---- crafting uploads and events -------------------------------------------------------------------


@dataclass
class Upload:
    """One upload as the backend would write it, before the test spoils some part of it."""

    email: str
    file_uuid: str
    data_key: str
    metadata_key: str
    plaintext: bytes
    name: str
    obj: bytes
    metadata: dict

    def event(self, bucket: str, **changes) -> dict:
        event = {
            "event_id": str(uuid.uuid4()),
            "email": self.email,
            "file_uuid": self.file_uuid,
            "s3_data_key": self.data_key,
            "s3_metadata_key": self.metadata_key,
            "bucket_name": bucket,
            "timestamp": 1769395016298,
        }
        event.update(changes)
        return event


def craft(
    ring: MasterKeyRing, email: str = HOSTILE, size: int = 1000, name: str = "report.pdf", filename: str | None = None
) -> Upload:
    """`name` goes into the object key; `filename` (default: name) is what the browser sent."""
    file_uuid = str(uuid.uuid4())
    prefix = f"uploads/{email}/{file_uuid}/"
    plaintext = os.urandom(size)
    dek = os.urandom(32)
    sink = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), sink, dek)
    metadata = json.loads(metadata_json(ring.wrap(dek), (filename or name) + ".encrypted", size))
    return Upload(
        email, file_uuid, prefix + name + ".enc", prefix + "metadata.json", plaintext, name, sink.getvalue(), metadata
    )


def store(
    s3_client, bucket: str, upload: Upload, obj: bytes | None = None, metadata: bytes | dict | None = None
) -> None:
    meta = metadata if metadata is not None else upload.metadata
    raw = meta if isinstance(meta, bytes) else json.dumps(meta, indent=2).encode()
    s3_client.put_object(Bucket=bucket, Key=upload.metadata_key, Body=raw)
    s3_client.put_object(Bucket=bucket, Key=upload.data_key, Body=upload.obj if obj is None else obj)


def body(event: dict | list | str) -> bytes:
    return json.dumps(event).encode()


def flip(data: bytes, index: int) -> bytes:
    spoiled = bytearray(data)
    spoiled[index] ^= 0x01
    return bytes(spoiled)


# ---- looking at the file system -----------------------------------------------------------------------


def snapshot(base: Path, exclude: set[Path]) -> dict[str, tuple]:
    """Everything under `base` (symlinks not followed) except `exclude` and log files: type, and size
    and mtime for files. Directories are compared by presence only (adding an entry changes their mtime)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if here / n not in exclude]
        for name in dirnames + filenames:
            path = here / name
            if path in exclude or path.suffix == ".log":
                continue
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            out[str(path.relative_to(base))] = (kind,) if stat.S_ISDIR(kind) else (kind, st.st_size, st.st_mtime_ns)
    return out


def tree(root: Path) -> tuple[list[Path], list[Path]]:
    """(directories, non-directories) under root, not following symlinks."""
    dirs, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += [Path(dirpath) / n for n in dirnames]
        others += [Path(dirpath) / n for n in filenames]
    return dirs, others


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_no_trouble_in_log(daemon) -> None:
    text = daemon.log_text()
    for marker in ("Traceback", "message handler failed", "unexpected error", "will retry"):
        assert marker not in text, f"{marker!r} in the daemon log:\n{text[-4000:]}"


async def dead_letters_by_seq(url: str) -> dict[int, object]:
    return {int(m.headers["Uploads-Stream-Seq"]): m for m in await read_stream(url, "FILE_UPLOADS_DLQ")}


# ---- the table -----------------------------------------------------------------------------------------


def hostile_cases(s3_client, bucket: str, ring: MasterKeyRing) -> list[tuple[str, bytes, str]]:
    """(case, body, expected Uploads-Error-Class). Objects the envelope cases need are stored here."""
    cases: list[tuple[str, bytes, str]] = []

    def add(name: str, raw: bytes, error_class: str) -> None:
        cases.append((name, raw, error_class))

    # An upload that would succeed: the event cases below spoil only the event, so a wrong
    # acceptance would show up as a processed file, not hide behind not_found.
    real = craft(ring)
    store(s3_client, bucket, real)
    good_event = real.event(bucket)

    # -- events: not an upload event at all
    add("not UTF-8", b"\xff\xfe\x00{", "invalid_message")
    add("not JSON", b"{this is not json", "invalid_message")
    add("JSON array", body([good_event]), "invalid_message")
    add("JSON string", body("hello"), "invalid_message")
    add("JSON string holding an array", body("[1, 2]"), "invalid_message")
    add("JSON number", b"42", "invalid_message")
    add("startup probe", body({"test": "message", "timestamp": 1}), "invalid_message")
    add("missing fields", body({"event_id": str(uuid.uuid4())}), "invalid_message")
    for field in ("email", "s3_data_key", "bucket_name", "timestamp"):
        add(f"missing {field}", body({k: v for k, v in good_event.items() if k != field}), "invalid_message")
    add("event_id not a UUID", body({**good_event, "event_id": "not-a-uuid"}), "invalid_message")
    add("file_uuid a traversal", body({**good_event, "file_uuid": "../../etc"}), "invalid_message")
    add("event_id a number", body({**good_event, "event_id": 12345}), "invalid_message")
    add("email a list", body({**good_event, "email": [HOSTILE]}), "invalid_message")
    add("timestamp a string", body({**good_event, "timestamp": "1769395016298"}), "invalid_message")
    add("timestamp of 400 digits", body({**good_event, "timestamp": 10**400}), "invalid_message")
    add("timestamp of 5000 digits", body({**good_event, "timestamp": 0})[:-2] + b"9" * 5000 + b"}", "invalid_message")
    # JSON may escape a lone surrogate; no S3 key or file name can hold one (keys agree with the email).
    add(
        "email with a lone surrogate",
        body(craft(ring, email="user\ud800@example.com").event(bucket)),
        "invalid_message",
    )
    add("body just over 64 KiB", body({**good_event, "padding": "x" * (64 * 1024)}), "invalid_message")
    add("body of 200 KB", body({**good_event, "padding": "x" * 200_000}), "invalid_message")
    add("60000 nested arrays", b"[" * 60000, "invalid_message")
    add("10000 nested objects", b'{"a":' * 10000 + b"1" + b"}" * 10000, "invalid_message")
    add(
        "nested arrays in an event field",
        body({**good_event, "extra": 0})[:-2] + b"[" * 50000 + b"}",
        "invalid_message",
    )
    add("double-encoded deep nesting", body("[" * 60000), "invalid_message")

    # -- events: pointing outside their folder, or not allowed
    add("bucket not allowed", body({**good_event, "bucket_name": "someone-elses-bucket"}), "forbidden")
    add("bucket a traversal", body({**good_event, "bucket_name": "../" + bucket}), "forbidden")
    add(
        "data key under another email",
        body({**good_event, "s3_data_key": real.data_key.replace(HOSTILE, "victim@example.com")}),
        "forbidden",
    )
    add("keys under another file_uuid", body({**good_event, "file_uuid": str(uuid.uuid4())}), "forbidden")
    add(
        "backend test endpoint keys",
        body(
            {
                **good_event,
                "s3_data_key": f"test/data/{real.file_uuid}/a.enc",
                "s3_metadata_key": f"test/data/{real.file_uuid}/metadata.json",
            }
        ),
        "forbidden",
    )
    add(
        "data key in a sub-folder",
        body({**good_event, "s3_data_key": real.data_key.replace("/report", "/sub/report")}),
        "forbidden",
    )
    add(
        "filename ../ in the data key",
        body({**good_event, "s3_data_key": real.data_key.replace("/report", "/../report")}),
        "forbidden",
    )
    add(
        "data key is the folder's ..",
        body({**good_event, "s3_data_key": real.data_key.rsplit("/", 1)[0] + "/.."}),
        "forbidden",
    )
    add(
        "data key is the folder itself",
        body({**good_event, "s3_data_key": real.data_key.rsplit("/", 1)[0] + "/"}),
        "forbidden",
    )
    add(
        "data key with NUL",
        body({**good_event, "s3_data_key": real.data_key.replace("report", "rep\x00ort")}),
        "forbidden",
    )
    add(
        "data key with a newline",
        body({**good_event, "s3_data_key": real.data_key.replace("report", "rep\nort")}),
        "forbidden",
    )
    add(
        "metadata key not metadata.json",
        body({**good_event, "s3_metadata_key": real.metadata_key.replace("metadata.json", "other.json")}),
        "forbidden",
    )
    add("data key is the metadata key", body({**good_event, "s3_data_key": real.metadata_key}), "forbidden")
    # Emails that are not one path component. Each has a real, valid upload stored under its literal
    # keys, so only the confinement check stands between it and a processed (mis-filed) upload.
    for label, email in [
        ("email with /", "a/b@example.com"),
        ("email with ../", "../../escape@example.com"),
        ("email ..", ".."),
        ("email .", "."),
        ("email with a backslash", "..\\..\\escape@example.com"),
        ("email with NUL", "user\x00@example.com"),
        ("email with a newline", "user\n@example.com"),
        ("email with ESC", "user\x1b[31m@example.com"),
        ("email with a C1 control", "user\x85@example.com"),
    ]:
        up = craft(ring, email=email)
        if all(c.isprintable() for c in email):
            store(s3_client, bucket, up)
        add(label, body(up.event(bucket)), "forbidden")

    # -- envelopes: the event is fine, the bucket's content is not
    def envelope_case(
        name: str, error_class: str, *, obj=None, metadata=None, size: int = 1000, **meta_changes
    ) -> None:
        up = craft(ring, size=size)
        meta = metadata(up) if callable(metadata) else metadata
        if meta_changes:
            meta = {**up.metadata, **meta_changes}
        store(s3_client, bucket, up, obj=obj(up) if callable(obj) else obj, metadata=meta)
        add(name, body(up.event(bucket)), error_class)

    envelope_case("metadata over 64 KiB", "bad_envelope", metadata=b'{"padding": "' + b"x" * (65 * 1024) + b'"}')
    envelope_case("metadata not JSON", "bad_envelope", metadata=b"{not json")
    envelope_case("metadata a JSON array", "bad_envelope", metadata=b"[1, 2, 3]")
    envelope_case("metadata deeply nested", "bad_envelope", metadata=b"[" * 60000)
    envelope_case(
        "metadata without kek",
        "bad_envelope",
        metadata=json.dumps({"version": "1.0", "algorithm": "AES-GCM-256"}).encode(),
    )
    envelope_case("kek not base64", "bad_envelope", kek="not base64 at all!!")
    envelope_case("kek of 59 bytes", "bad_envelope", kek=base64.b64encode(os.urandom(59)).decode())
    envelope_case("kek a number", "bad_envelope", kek=12345)
    envelope_case("version 2.0", "bad_envelope", version="2.0")
    envelope_case("algorithm AES-CBC", "bad_envelope", algorithm="AES-CBC")
    envelope_case("encrypted_size not original_size + 28", "bad_envelope", encrypted_size=1000 + 27)
    envelope_case("negative sizes", "bad_envelope", original_size=-28, encrypted_size=0)
    envelope_case("filename with a lone surrogate", "bad_envelope", original_filename="a\ud800.pdf.encrypted")
    envelope_case("sizes agree but not with the object", "bad_envelope", original_size=500, encrypted_size=528)
    envelope_case("object truncated", "bad_envelope", obj=lambda up: up.obj[:-10])
    envelope_case("object with bytes appended", "bad_envelope", obj=lambda up: up.obj + b"\x00" * 10)
    envelope_case("object shorter than IV and tag", "bad_envelope", obj=b"\x00" * 10, size=0)
    envelope_case("object empty", "bad_envelope", obj=b"", size=0)
    # Truncated, with metadata made to agree: only the tag can tell.
    envelope_case(
        "object truncated, metadata agreeing",
        "decrypt_failed",
        obj=lambda up: up.obj[:-10],
        original_size=990,
        encrypted_size=1018,
    )
    envelope_case("tag flipped", "decrypt_failed", obj=lambda up: flip(up.obj, -1))
    envelope_case("ciphertext flipped", "decrypt_failed", obj=lambda up: flip(up.obj, 20))
    envelope_case("IV flipped", "decrypt_failed", obj=lambda up: flip(up.obj, 0))
    envelope_case(
        "kek wrapped under another master key",
        "decrypt_failed",
        kek=base64.b64encode(MasterKeyRing(os.urandom(32)).wrap(os.urandom(32))).decode(),
    )
    envelope_case(
        "kek tampered",
        "decrypt_failed",
        metadata=lambda up: {
            **up.metadata,
            "kek": base64.b64encode(flip(base64.b64decode(up.metadata["kek"]), 30)).decode(),
        },
    )
    # Metadata claims a small file, the object is larger than MAX_FILE_SIZE: its size is taken from
    # the object (before reading it), so this is too_large, not a size mismatch found while reading.
    envelope_case(
        "object over MAX_FILE_SIZE, metadata claiming small", "too_large", obj=os.urandom(MAX_FILE_SIZE + 4096)
    )
    envelope_case("metadata claiming over MAX_FILE_SIZE", "too_large", size=MAX_FILE_SIZE + 1)

    # -- missing things
    missing_object = craft(ring)
    s3_client.put_object(
        Bucket=bucket, Key=missing_object.metadata_key, Body=json.dumps(missing_object.metadata).encode()
    )
    add("object missing", body(missing_object.event(bucket)), "not_found")
    add("metadata missing", body(craft(ring).event(bucket)), "not_found")
    return cases


# ---- the tests -------------------------------------------------------------------------------------------


async def test_hostile_messages_are_dead_lettered_once_with_their_class_while_good_uploads_go_through(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket, master_key
):
    ring = MasterKeyRing(base64.b64decode(master_key))
    # Deep enough that up to four `..` from the download path still land inside tmp_path, where we look.
    root = tmp_path / "jail" / "a" / "b" / "downloads"
    root.parent.mkdir(parents=True)
    cases = hostile_cases(s3_client, bucket, ring)
    assert len({name for name, _, _ in cases}) == len(cases)
    goods = [
        craft(ring, email="good@example.com", size=3000, name="notes.txt"),
        craft(ring, email="good@example.com", size=MAX_FILE_SIZE - 4096, name="voice note.m4a"),
    ]
    for up in goods:
        store(s3_client, bucket, up)
    await provision_now(settings_for())
    seqs = await publish_raw(
        nats_server.url, "file.uploads", [raw for _, raw, _ in cases] + [body(up.event(bucket)) for up in goods]
    )
    before = snapshot(tmp_path, exclude={root, tmp_path / "nats"})

    daemon = start_daemon(DECRYPT_DOWNLOAD_PATH=str(root), MAX_FILE_SIZE=str(MAX_FILE_SIZE))
    await wait_settled(nats_server.url, seqs[-1], daemon=daemon, timeout=90)

    # Alive, and every message settled on its first delivery: nothing nak'ed, nothing retried.
    assert daemon.http_get("/healthz")[0] == 200
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="dead_lettered"') == len(cases)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == len(goods)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 0
    assert daemon.metric("uploads_consumer_redeliveries_total") == 0
    assert daemon.terminate() == 0

    dead = await dead_letters_by_seq(nats_server.url)
    got = {
        name: (dead[seq].headers["Uploads-Error-Class"] if seq in dead else "not dead-lettered")
        for seq, (name, _, _) in zip(seqs, cases, strict=False)
    }
    assert got == {name: error_class for name, _, error_class in cases}
    assert set(dead) == set(seqs[: len(cases)])  # and the good uploads are not among them
    for seq, (name, raw, _) in zip(seqs, cases, strict=False):
        assert dead[seq].headers["Uploads-Deliveries"] == "1", name
        assert dead[seq].data == raw, name  # the original body, unchanged
    assert_no_trouble_in_log(daemon)

    # The good uploads, and nothing else, are under the download path; private; no temporaries left.
    expected = {root / up.email / up.file_uuid / up.name: up.plaintext for up in goods}
    dirs, files = tree(root)
    assert sorted(files) == sorted(expected)
    for path, plaintext in expected.items():
        assert path.read_bytes() == plaintext
        assert mode(path) == 0o600, path
    assert list((root / WORK_DIR_NAME).iterdir()) == []
    for folder in [root, *dirs]:
        assert mode(folder) == 0o700, folder
    # Nothing outside the download path was created or changed.
    assert snapshot(tmp_path, exclude={root, tmp_path / "nats"}) == before


async def test_a_symlink_planted_in_the_download_path_is_not_followed_out_of_it(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket, master_key, downloads
):
    ring = MasterKeyRing(base64.b64decode(master_key))
    outside = tmp_path / "outside"
    outside.mkdir()
    by_email = craft(ring, email="linked@example.com")
    by_uuid = craft(ring, email="other@example.com")
    good = craft(ring, email="good@example.com")
    (downloads / by_email.email).symlink_to(outside, target_is_directory=True)
    (downloads / by_uuid.email).mkdir(mode=0o700)
    (downloads / by_uuid.email / by_uuid.file_uuid).symlink_to(outside, target_is_directory=True)
    for up in (by_email, by_uuid, good):
        store(s3_client, bucket, up)
    await provision_now(settings_for())
    seqs = await publish_raw(
        nats_server.url, "file.uploads", [body(up.event(bucket)) for up in (by_email, by_uuid, good)]
    )
    before = snapshot(tmp_path, exclude={downloads, tmp_path / "nats"})

    daemon = start_daemon()
    await wait_settled(nats_server.url, seqs[-1], daemon=daemon)
    assert daemon.http_get("/healthz")[0] == 200
    assert daemon.terminate() == 0

    dead = await dead_letters_by_seq(nats_server.url)
    assert sorted(dead) == seqs[:2]
    for seq in seqs[:2]:
        assert dead[seq].headers["Uploads-Error-Class"] == "processor_failed"
        assert dead[seq].headers["Uploads-Deliveries"] == "1"
    assert list(outside.iterdir()) == []
    assert (downloads / by_email.email).is_symlink()  # left as it was, neither followed nor replaced
    assert (downloads / good.email / good.file_uuid / good.name).read_bytes() == good.plaintext
    _, files = tree(downloads)
    assert files == [downloads / good.email / good.file_uuid / good.name]  # no temporaries anywhere
    assert list((downloads / WORK_DIR_NAME).iterdir()) == []
    assert snapshot(tmp_path, exclude={downloads, tmp_path / "nats"}) == before


async def test_a_filename_that_sanitises_onto_an_existing_file_or_link_replaces_it_inside_the_download_path(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket, master_key, downloads
):
    ring = MasterKeyRing(base64.b64decode(master_key))
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"untouched")
    onto_link = craft(ring, email="x@example.com", filename="../../../outside/victim.txt")
    onto_file = craft(ring, email="x@example.com", filename="..\\notes\x00.txt")
    onto_hidden = craft(ring, email="x@example.com", filename=".bashrc")
    planted = {}
    for up in (onto_link, onto_file, onto_hidden):
        store(s3_client, bucket, up)
        folder = downloads / up.email / up.file_uuid
        folder.mkdir(parents=True)
        planted[up.file_uuid] = folder / safe_component(up.metadata["original_filename"].removesuffix(".encrypted"))
    planted[onto_link.file_uuid].symlink_to(victim)
    planted[onto_file.file_uuid].write_bytes(b"an older file")
    planted[onto_hidden.file_uuid].write_bytes(b"an older file")
    await provision_now(settings_for())
    seqs = await publish_raw(
        nats_server.url, "file.uploads", [body(up.event(bucket)) for up in (onto_link, onto_file, onto_hidden)]
    )
    before = snapshot(tmp_path, exclude={downloads, tmp_path / "nats"})

    daemon = start_daemon()
    await wait_settled(nats_server.url, seqs[-1], daemon=daemon)
    assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 3
    assert daemon.terminate() == 0

    assert victim.read_bytes() == b"untouched"
    root = downloads.resolve()
    saved = {
        json.loads(m.data)["file_uuid"]: Path(json.loads(m.data)["outputs"]["save"]["path"])
        for m in await read_stream(nats_server.url, "FILE_PROCESSED")
    }
    for up in (onto_link, onto_file, onto_hidden):
        dest = planted[up.file_uuid]
        assert saved[up.file_uuid] == dest.resolve()
        assert dest.resolve().relative_to(root).parts == (up.email, up.file_uuid, dest.name)
        assert not dest.name.startswith(".") and "/" not in dest.name and "\\" not in dest.name
        assert not dest.is_symlink() and dest.read_bytes() == up.plaintext
        assert mode(dest) == 0o600
    _, files = tree(downloads)
    assert sorted(files) == sorted(planted.values())  # replaced in place, no temporaries left
    assert snapshot(tmp_path, exclude={downloads, tmp_path / "nats"}) == before
