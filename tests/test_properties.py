"""Properties of the parsers that untrusted input meets first: whatever a publisher or a bucket
writer sends, they return a checked value or raise the project's own error of the right class —
never anything else — and what they accept is confined."""

from __future__ import annotations

import base64
import io
import json
import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uploads_consumer.envelope import (
    OVERHEAD,
    WRAPPED_KEY_SIZE,
    EnvelopeMetadata,
    ObjectDecryptor,
    encrypt_stream,
    parse_metadata,
)
from uploads_consumer.errors import ErrorClass, PermanentError
from uploads_consumer.events import FileUploadEvent, check_event, parse_event
from uploads_consumer.processors.save import MAX_COMPONENT_BYTES, safe_component, target_path

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BUCKET = "uploads"
EVENT_FIELDS = ("event_id", "email", "file_uuid", "s3_data_key", "s3_metadata_key", "bucket_name", "timestamp")
METADATA_FIELDS = (
    "version",
    "kek",
    "algorithm",
    "original_filename",
    "file_id",
    "original_size",
    "encrypted_size",
    "verification_status",
    "timestamp",
)

# ---- strategies ------------------------------------------------------------------------------------

# Every code point, lone surrogates included (JSON can carry them as \ud800 escapes).
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_char, max_size=40)
tricky_text = st.sampled_from(
    [
        "",
        " ",
        ".",
        "..",
        "...",
        "/",
        "\\",
        "../",
        "..\\",
        "\x00",
        "\n",
        "\x1b",
        "\x85",
        "\u2028",
        "\u202e",
        "\ud800",
        "uploads/",
        "metadata.json",
        "user@example.com",
        "ÉCOLE@exemple.fr",
        "İ",
        "\u212a",
    ]
)
text = st.one_of(any_text, tricky_text, st.lists(st.one_of(any_text, tricky_text), max_size=5).map("".join))
uuids = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), st.uuids().map(lambda u: u.hex))
integers = st.one_of(
    st.integers(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([-1, 0, 1 << 63, -(1 << 63) - 1]),
)
json_leaf = st.one_of(st.none(), st.booleans(), integers, st.floats(), text)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)


def encode(value: object, double: bool, ascii_only: bool) -> bytes:
    raw = json.dumps(value, ensure_ascii=ascii_only)
    if double:
        raw = json.dumps(raw, ensure_ascii=ascii_only)
    return raw.encode("utf-8", "surrogatepass")  # bytes as a careless producer might write them


huge_integers = st.integers(min_value=1 << 1000, max_value=1 << 1400)  # no float can hold them


def mostly(draw, good, other: st.SearchStrategy):
    """`good` nine times in ten, else something drawn from `other`."""
    return good if draw(st.integers(0, 9)) else draw(other)


def spoil(draw, data: dict, fields: tuple[str, ...]) -> dict:
    """One time in three, drop one field or give it an arbitrary value; sometimes add unknown fields."""
    if not draw(st.integers(0, 2)):
        field = draw(st.sampled_from(fields))
        if draw(st.booleans()):
            data.pop(field)
        else:
            data[field] = draw(json_value)
    data.update(draw(st.dictionaries(text, json_value, max_size=2)))
    return data


@st.composite
def event_dicts(draw) -> dict:
    """Events that agree with themselves (keys built from their own email and file_uuid, so
    check_event is reached and often passed) with hostile emails, names, buckets and timestamps."""
    email = draw(st.one_of(text, st.just("user@example.com")))
    file_uuid = str(draw(st.uuids()))
    key_email = draw(st.sampled_from([email, email, email.upper(), email.lower()]))
    key_uuid = draw(st.sampled_from([file_uuid, file_uuid, file_uuid.upper()]))
    name = draw(st.one_of(text, st.just("audio.mp3.enc")))
    folder = mostly(draw, f"uploads/{key_email}/{key_uuid}/", st.sampled_from([f"uploads/{email}/", "test/data/", ""]))
    data = {
        "event_id": mostly(draw, str(draw(st.uuids())), st.one_of(uuids, text)),
        "email": email,
        "file_uuid": mostly(
            draw, file_uuid, st.sampled_from([file_uuid.upper(), file_uuid.replace("-", ""), "../" + file_uuid])
        ),
        "s3_data_key": folder + name,
        "s3_metadata_key": mostly(draw, folder + "metadata.json", st.sampled_from([folder + name, folder])),
        "bucket_name": mostly(draw, BUCKET, text),
        "timestamp": mostly(draw, 1769395016298, st.one_of(integers, huge_integers, huge_integers.map(lambda n: -n))),
    }
    return spoil(draw, data, EVENT_FIELDS)


def wrapped_keys():
    return st.binary(min_size=WRAPPED_KEY_SIZE, max_size=WRAPPED_KEY_SIZE).map(lambda b: base64.b64encode(b).decode())


@st.composite
def metadata_dicts(draw) -> dict:
    """Metadata as the backend writes it, with hostile file names, keks and sizes; some spoiled."""
    size = mostly(draw, draw(st.integers(0, 1 << 40)), st.one_of(integers, huge_integers))
    data = {
        "version": mostly(draw, "1.0", st.one_of(st.sampled_from(["2.0", "1", "", "1.0 "]), json_value)),
        "kek": mostly(
            draw,
            draw(wrapped_keys()),
            st.one_of(st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()), text),
        ),
        "algorithm": mostly(draw, "AES-GCM-256", st.sampled_from(["AES-CBC", "aes-gcm-256", ""])),
        "original_filename": draw(st.one_of(text, text.map(lambda t: t + ".encrypted"))),
        "file_id": draw(st.one_of(st.none(), json_value)),
        "original_size": size,
        "encrypted_size": mostly(draw, size + OVERHEAD, integers),
        "verification_status": "VERIFIED",
        "timestamp": draw(integers),
    }
    return spoil(draw, data, METADATA_FIELDS)


def deep(opening: bytes, depth: int) -> bytes:
    return opening * depth


def raise_class(fn, *args) -> ErrorClass | None:
    """The class of the PermanentError raised, or None if it returned. Anything else propagates."""
    try:
        fn(*args)
    except PermanentError as exc:
        return exc.error_class
    return None


# ---- parse_event and check_event ----------------------------------------------------------------------


def assert_parse_event_contract(raw: bytes) -> FileUploadEvent | None:
    try:
        event = parse_event(raw)
    except PermanentError as exc:
        assert exc.error_class is ErrorClass.INVALID_MESSAGE
        assert "\n" not in exc.reason and exc.reason.isprintable()
        return None
    assert isinstance(event, FileUploadEvent)
    return event


def assert_check_event_contract(event: FileUploadEvent) -> None:
    for allowed in (frozenset({BUCKET}), frozenset()):
        try:
            check_event(event, allowed)
        except PermanentError as exc:
            assert exc.error_class is ErrorClass.FORBIDDEN
            continue
        # Accepted: both keys are one plain file name directly in uploads/{email}/{file_uuid}/.
        assert not allowed or event.bucket_name in allowed
        assert "/" not in event.email and "\\" not in event.email and event.email not in (".", "..")
        prefix = f"uploads/{event.email}/{event.file_uuid}/".lower()
        for key in (event.s3_data_key, event.s3_metadata_key):
            assert key.lower().startswith(prefix)
            rest = key[len(prefix) :]
            assert rest and "/" not in rest and rest not in (".", "..")
            assert not any(unicodedata.category(c) == "Cc" for c in key)
            key.encode("utf-8")  # can be sent to S3
        assert event.s3_metadata_key.endswith("/metadata.json") and event.s3_data_key != event.s3_metadata_key


@FAST
@given(st.binary(max_size=300))
def test_parse_event_on_arbitrary_bytes_returns_an_event_or_raises_invalid_message(raw):
    assert_parse_event_contract(raw)


@FAST
@given(json_value, st.booleans(), st.booleans())
def test_parse_event_on_arbitrary_json_returns_an_event_or_raises_invalid_message(value, double, ascii_only):
    assert_parse_event_contract(encode(value, double, ascii_only))


@FAST
@given(event_dicts(), st.booleans(), st.booleans())
def test_parse_event_and_check_event_on_event_shaped_json_raise_only_their_own_class(data, double, ascii_only):
    event = assert_parse_event_contract(encode(data, double, ascii_only))
    if event is not None:
        assert_check_event_contract(event)
        event.timestamp / 1000  # the consumer computes the message's age from it


@FAST
@given(st.sampled_from([b"[", b'{"a":', b'"', b"[{", b'{"event_id":[']), st.integers(500, 13000), st.booleans())
def test_parse_event_on_deep_or_huge_json_raises_invalid_message(opening, depth, double):
    raw = deep(opening, depth)
    assert raise_class(parse_event, json.dumps(raw.decode()).encode() if double else raw) is ErrorClass.INVALID_MESSAGE


@FAST
@given(st.integers(4000, 60000))
def test_parse_event_on_a_number_with_too_many_digits_raises_invalid_message(digits):
    raw = b'{"event_id": "0ab35a7e-7a72-4e37-b34d-1045459d355f", "timestamp": ' + b"7" * digits + b"}"
    assert raise_class(parse_event, raw) is ErrorClass.INVALID_MESSAGE


# ---- safe_component and target_path --------------------------------------------------------------------


def assert_safe(component: str) -> None:
    assert component not in ("", ".", "..")
    assert not component.startswith(".")
    assert "/" not in component and "\\" not in component and "\x00" not in component
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in component)
    assert len(component.encode("utf-8")) <= MAX_COMPONENT_BYTES


@FAST
@given(
    st.one_of(text, st.text(any_char, min_size=150, max_size=400), st.text(st.sampled_from("./\\ \x00\t"), max_size=30))
)
def test_safe_component_always_gives_one_harmless_path_component(name):
    assert_safe(safe_component(name))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("root").resolve()


@FAST
@given(
    email=text, file_uuid=st.one_of(uuids, text), name=st.one_of(text, st.text(any_char, min_size=150, max_size=400))
)
def test_target_path_always_resolves_three_levels_inside_the_root(root, email, file_uuid, name):
    path = target_path(root, email, file_uuid, name)
    assert path.resolve().relative_to(root).parts == path.relative_to(root).parts
    assert len(path.relative_to(root).parts) == 3
    for part in path.relative_to(root).parts:
        assert_safe(part)


# ---- parse_metadata --------------------------------------------------------------------------------------


def assert_parse_metadata_contract(raw: bytes) -> None:
    try:
        meta = parse_metadata(raw)
    except PermanentError as exc:
        assert exc.error_class is ErrorClass.BAD_ENVELOPE
        assert "\n" not in exc.reason and exc.reason.isprintable()
        return
    assert isinstance(meta, EnvelopeMetadata)
    assert meta.version == "1.0" and meta.algorithm == "AES-GCM-256"
    assert isinstance(meta.kek, bytes) and len(meta.kek) == WRAPPED_KEY_SIZE == 60
    assert meta.original_size >= 0 and meta.encrypted_size == meta.original_size + OVERHEAD
    meta.clean_filename.encode("utf-8")  # goes into the result event
    assert_safe(safe_component(meta.clean_filename))


@FAST
@given(st.binary(max_size=300))
def test_parse_metadata_on_arbitrary_bytes_returns_metadata_or_raises_bad_envelope(raw):
    assert_parse_metadata_contract(raw)


@FAST
@given(json_value, st.booleans())
def test_parse_metadata_on_arbitrary_json_returns_metadata_or_raises_bad_envelope(value, ascii_only):
    assert_parse_metadata_contract(encode(value, False, ascii_only))


@FAST
@given(metadata_dicts(), st.booleans())
def test_parse_metadata_on_metadata_shaped_json_returns_valid_metadata_or_raises_bad_envelope(data, ascii_only):
    assert_parse_metadata_contract(encode(data, False, ascii_only))


@FAST
@given(st.sampled_from([b"[", b'{"a":', b'{"kek":[']), st.integers(500, 20000))
def test_parse_metadata_on_deep_json_raises_bad_envelope(opening, depth):
    assert raise_class(parse_metadata, deep(opening, depth)) is ErrorClass.BAD_ENVELOPE


# ---- ObjectDecryptor ------------------------------------------------------------------------------------


def feed_all(dec: ObjectDecryptor, data: bytes, cuts: list[int]) -> bytes:
    out = bytearray()
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += bytes(dec.feed(data[start:cut]))
        start = cut
    return bytes(out)


@FAST
@given(st.binary(max_size=200), st.lists(st.integers(0, 1000), max_size=6), st.binary(min_size=32, max_size=32))
def test_decryptor_fed_arbitrary_bytes_raises_only_a_permanent_error_on_finalize(data, cuts, dek):
    dec = ObjectDecryptor(dek)
    feed_all(dec, data, cuts)  # feeding never raises
    with pytest.raises(PermanentError) as info:
        dec.finalize()
    expected = ErrorClass.BAD_ENVELOPE if len(data) < OVERHEAD else ErrorClass.DECRYPT_FAILED
    assert info.value.error_class is expected


@FAST
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=6), st.integers(0, 10_000), st.integers(0, 7))
def test_decryptor_rejects_any_single_flipped_bit_and_accepts_the_untouched_object(plaintext, cuts, where, bit):
    dek = os.urandom(32)
    sink = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), sink, dek, chunk_size=64)
    obj = sink.getvalue()

    dec = ObjectDecryptor(dek)
    assert feed_all(dec, obj, cuts) == plaintext
    dec.finalize()

    spoiled = bytearray(obj)
    spoiled[where % len(obj)] ^= 1 << bit
    dec = ObjectDecryptor(dek)
    feed_all(dec, bytes(spoiled), cuts)
    assert raise_class(dec.finalize) is ErrorClass.DECRYPT_FAILED
