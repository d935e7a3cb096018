"""Envelope format: the backend's interop vectors decrypt, and untrusted metadata is checked."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import pytest
from helpers import INTEROP

from uploads_consumer.envelope import (
    EnvelopeMetadata,
    MasterKeyRing,
    ObjectDecryptor,
    encrypt_stream,
    metadata_json,
    parse_metadata,
)
from uploads_consumer.errors import ErrorClass, PermanentError

MANIFEST = json.loads((INTEROP / "manifest.json").read_text())
CASES = {case["name"]: case for case in MANIFEST["cases"]}
PROCESSED = [c["name"] for c in MANIFEST["cases"] if c["expect"] == "processed" and c["objects"]]
MASTER_KEY = base64.b64decode(MANIFEST["master_key"])
PREVIOUS_KEYS = [base64.b64decode(k) for k in MANIFEST["previous_master_keys"]]
CHUNK_SIZES = [1, 7, 16, 17, 4096, None]  # None: the whole object in one feed
SMALL_CHUNK_LIMIT = 1 << 20  # byte-by-byte feeding of the 5 MiB case would take too long for a unit test


def object_bytes(name: str) -> bytes:
    return (INTEROP / CASES[name]["objects"][0]["file"]).read_bytes()


def metadata_bytes(name: str) -> bytes:
    return (INTEROP / CASES[name]["objects"][1]["file"]).read_bytes()


def decrypt(data: bytes, dek: bytes, chunk: int | None) -> bytes:
    """Feed `data` in chunks; copy each returned view at once (the decryptor reuses its buffer)."""
    dec = ObjectDecryptor(dek)
    out = bytearray()
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        out += bytes(dec.feed(data[i : i + step]))
    dec.finalize()
    return bytes(out)


def valid_metadata_dict(**changes) -> dict:
    data = json.loads(metadata_bytes("basic"))
    data.update(changes)
    return data


def encode(data) -> bytes:
    return json.dumps(data).encode()


def decrypt_params():
    for name in PROCESSED:
        size = len(object_bytes(name))
        for chunk in CHUNK_SIZES:
            if chunk is not None and chunk < 4096 and size > SMALL_CHUNK_LIMIT:
                continue
            yield pytest.param(name, chunk, id=f"{name}-{chunk or 'whole'}")
    # the large case also in an odd, bigger-than-a-block chunk size
    yield pytest.param("large", 65537, id="large-65537")


# ---- the interop vectors ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "chunk"), list(decrypt_params()))
def test_processed_case_decrypts_to_manifest_size_and_sha256(name, chunk):
    case = CASES[name]
    meta = parse_metadata(metadata_bytes(name))
    dek = MasterKeyRing(MASTER_KEY).unwrap(meta.kek)

    plaintext = decrypt(object_bytes(name), dek, chunk)

    assert len(plaintext) == case["size"] == meta.original_size
    assert hashlib.sha256(plaintext).hexdigest() == case["sha256"]


def test_decryptor_counts_plaintext_size():
    meta = parse_metadata(metadata_bytes("basic"))
    dec = ObjectDecryptor(MasterKeyRing(MASTER_KEY).unwrap(meta.kek))
    dec.feed(object_bytes("basic"))
    dec.finalize()
    assert dec.plaintext_size == CASES["basic"]["size"]


@pytest.mark.parametrize("chunk", [1, 17, None])
def test_tampered_data_fails_the_tag_as_decrypt_failed(chunk):
    meta = parse_metadata(metadata_bytes("tampered_data"))
    dek = MasterKeyRing(MASTER_KEY).unwrap(meta.kek)
    with pytest.raises(PermanentError) as info:
        decrypt(object_bytes("tampered_data"), dek, chunk)
    assert info.value.error_class is ErrorClass.DECRYPT_FAILED


def test_wrong_master_key_fails_unwrap_as_decrypt_failed():
    meta = parse_metadata(metadata_bytes("wrong_master_key"))
    with pytest.raises(PermanentError) as info:
        MasterKeyRing(MASTER_KEY, PREVIOUS_KEYS).unwrap(meta.kek)
    assert info.value.error_class is ErrorClass.DECRYPT_FAILED


@pytest.mark.parametrize("chunk", [1, None])
def test_truncated_data_fails_finalize_as_bad_envelope(chunk):
    meta = parse_metadata(metadata_bytes("truncated_data"))
    dek = MasterKeyRing(MASTER_KEY).unwrap(meta.kek)
    dec = ObjectDecryptor(dek)
    data = object_bytes("truncated_data")
    step = chunk or len(data)
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])
    with pytest.raises(PermanentError) as info:
        dec.finalize()
    assert info.value.error_class is ErrorClass.BAD_ENVELOPE


def test_object_shorter_than_the_iv_is_bad_envelope():
    dec = ObjectDecryptor(os.urandom(32))
    dec.feed(b"\x00" * 5)
    with pytest.raises(PermanentError) as info:
        dec.finalize()
    assert info.value.error_class is ErrorClass.BAD_ENVELOPE


def test_metadata_without_kek_is_bad_envelope_mentioning_kek():
    with pytest.raises(PermanentError) as info:
        parse_metadata(metadata_bytes("metadata_without_kek"))
    assert info.value.error_class is ErrorClass.BAD_ENVELOPE
    assert "kek" in info.value.reason


@pytest.mark.parametrize("name", PROCESSED)
def test_metadata_json_regenerates_the_backend_bytes(name):
    raw = metadata_bytes(name)
    meta = parse_metadata(raw)
    assert metadata_json(meta.kek, meta.original_filename, meta.original_size, meta.timestamp) == raw


# ---- keys --------------------------------------------------------------------------------------


def test_ring_with_previous_key_unwraps_a_dek_wrapped_under_it():
    new_key = os.urandom(32)
    dek = os.urandom(32)
    wrapped = MasterKeyRing(PREVIOUS_KEYS[0]).wrap(dek)

    assert MasterKeyRing(new_key, PREVIOUS_KEYS).unwrap(wrapped) == dek


def test_ring_without_the_previous_key_cannot_unwrap_after_rotation():
    wrapped = MasterKeyRing(PREVIOUS_KEYS[0]).wrap(os.urandom(32))
    with pytest.raises(PermanentError) as info:
        MasterKeyRing(os.urandom(32)).unwrap(wrapped)
    assert info.value.error_class is ErrorClass.DECRYPT_FAILED


def test_wrap_uses_the_current_key_and_the_backend_layout():
    dek = os.urandom(32)
    wrapped = MasterKeyRing(MASTER_KEY, PREVIOUS_KEYS).wrap(dek)
    assert len(wrapped) == 60
    assert MasterKeyRing(MASTER_KEY).unwrap(wrapped) == dek


def test_repr_of_ring_shows_no_key_material():
    ring = MasterKeyRing(MASTER_KEY, PREVIOUS_KEYS)
    for text in (repr(ring), str(ring)):
        for key in (MASTER_KEY, *PREVIOUS_KEYS):
            assert base64.b64encode(key).decode() not in text
            assert key.hex() not in text
            assert repr(key) not in text
            assert repr(key)[2:20] not in text


# ---- encrypt_stream round trip -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100_003])
def test_encrypt_stream_round_trips_through_the_decryptor(size):
    plaintext = os.urandom(size)
    dek = os.urandom(32)
    sink = io.BytesIO()

    written, digest = encrypt_stream(io.BytesIO(plaintext), sink, dek, chunk_size=4096)

    encrypted = sink.getvalue()
    assert written == size
    assert digest == hashlib.sha256(plaintext).hexdigest()
    assert len(encrypted) == size + 28
    assert decrypt(encrypted, dek, 4099) == plaintext


# ---- parse_metadata rejects ---------------------------------------------------------------------


def assert_bad_envelope(raw: bytes) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        parse_metadata(raw)
    assert info.value.error_class is ErrorClass.BAD_ENVELOPE
    return info.value


def test_parse_metadata_accepts_the_backend_metadata():
    meta = parse_metadata(metadata_bytes("basic"))
    assert meta.version == "1.0"
    assert meta.algorithm == "AES-GCM-256"
    assert len(meta.kek) == 60
    assert meta.original_size == 49152
    assert meta.encrypted_size == 49180


def test_parse_metadata_ignores_extra_fields():
    meta = parse_metadata(encode(valid_metadata_dict(something_new={"x": 1})))
    assert meta.original_filename == "audio.mp3.encrypted"


def test_parse_metadata_rejects_over_64_kib():
    data = valid_metadata_dict(padding="x" * (64 * 1024))
    assert_bad_envelope(encode(data))


def test_parse_metadata_rejects_not_json():
    assert_bad_envelope(b"{not json")


def test_parse_metadata_rejects_not_utf8():
    assert_bad_envelope(b"\xff\xfe{}")


def test_parse_metadata_rejects_json_array():
    assert_bad_envelope(encode([valid_metadata_dict()]))


def test_parse_metadata_rejects_deep_nesting_without_recursion_error():
    assert_bad_envelope(b"[" * 60000)


def test_parse_metadata_rejects_version_2():
    err = assert_bad_envelope(encode(valid_metadata_dict(version="2.0")))
    assert "version" in err.reason


def test_parse_metadata_rejects_version_as_number():
    assert_bad_envelope(encode(valid_metadata_dict(version=1.0)))


def test_parse_metadata_rejects_aes_cbc():
    err = assert_bad_envelope(encode(valid_metadata_dict(algorithm="AES-CBC")))
    assert "algorithm" in err.reason


def test_parse_metadata_rejects_kek_not_base64():
    err = assert_bad_envelope(encode(valid_metadata_dict(kek="not base64 at all!!")))
    assert "kek" in err.reason


def test_parse_metadata_rejects_kek_of_59_bytes():
    kek = base64.b64encode(os.urandom(59)).decode()
    err = assert_bad_envelope(encode(valid_metadata_dict(kek=kek)))
    assert "kek" in err.reason
    assert "59" in err.reason


def test_parse_metadata_rejects_encrypted_size_not_original_plus_28():
    err = assert_bad_envelope(encode(valid_metadata_dict(original_size=100, encrypted_size=127)))
    assert "encrypted_size" in err.reason


@pytest.mark.parametrize(
    ("original", "encrypted"), [(-1, 27), (-28, 0), (10, -1)], ids=["original", "both", "encrypted"]
)
def test_parse_metadata_rejects_negative_sizes(original, encrypted):
    assert_bad_envelope(encode(valid_metadata_dict(original_size=original, encrypted_size=encrypted)))


def test_parse_metadata_rejects_size_as_string():
    assert_bad_envelope(encode(valid_metadata_dict(original_size="49152")))


# ---- clean filename -----------------------------------------------------------------------------


def metadata_named(name: str) -> EnvelopeMetadata:
    return parse_metadata(encode(valid_metadata_dict(original_filename=name)))


@pytest.mark.parametrize(
    ("original", "clean"),
    [
        ("audio.mp3.encrypted", "audio.mp3"),
        ("a.encrypted.encrypted", "a.encrypted"),
        ("audio.mp3", "audio.mp3"),
        ("audio.encrypted.mp3", "audio.encrypted.mp3"),
        ("audio.mp3.ENCRYPTED", "audio.mp3.ENCRYPTED"),
        ("audio.mp3encrypted", "audio.mp3encrypted"),
    ],
)
def test_clean_filename_drops_exactly_one_trailing_encrypted_suffix(original, clean):
    assert metadata_named(original).clean_filename == clean


def test_clean_filename_of_bare_suffix_is_not_empty():
    assert metadata_named(".encrypted").clean_filename != ""
