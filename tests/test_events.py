"""Upload events: parsing the backend's bodies, and confining an event to its own folder."""

from __future__ import annotations

import json

import pytest
from helpers import INTEROP

from uploads_consumer.errors import ErrorClass, PermanentError
from uploads_consumer.events import FileUploadEvent, check_event, parse_event

BASIC = (INTEROP / "messages" / "basic.bin").read_bytes()
DOUBLE = (INTEROP / "messages" / "double_encoded.bin").read_bytes()
BASIC_DICT = json.loads(BASIC)
BUCKET = BASIC_DICT["bucket_name"]
EMAIL = BASIC_DICT["email"]
FILE_UUID = BASIC_DICT["file_uuid"]
ALLOWED = frozenset({BUCKET})


def body(**changes) -> bytes:
    data = dict(BASIC_DICT)
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


def event(**changes) -> FileUploadEvent:
    return parse_event(body(**changes))


def assert_invalid(raw: bytes) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        parse_event(raw)
    assert info.value.error_class is ErrorClass.INVALID_MESSAGE
    return info.value


def assert_forbidden(ev: FileUploadEvent, allowed=ALLOWED) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        check_event(ev, allowed)
    assert info.value.error_class is ErrorClass.FORBIDDEN
    return info.value


# ---- parse_event accepts ------------------------------------------------------------------------


def test_parse_event_accepts_the_backend_plain_body():
    ev = parse_event(BASIC)
    assert ev.event_id == "0ab35a7e-7a72-4e37-b34d-1045459d355f"
    assert ev.email == "user@example.com"
    assert ev.file_uuid == "1cbfac96-1cb1-45b2-a682-39c0de4ea705"
    assert ev.s3_data_key == "uploads/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/audio.mp3.enc"
    assert ev.s3_metadata_key == "uploads/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/metadata.json"
    assert ev.bucket_name == "whispers-bucket-dev"
    assert ev.timestamp == 1769395016298


def test_parse_event_accepts_the_backend_double_encoded_body():
    ev = parse_event(DOUBLE)
    assert ev.event_id == "78f19799-fd1d-43fb-bb0d-7b9ff29e49d1"
    assert ev.file_uuid == "a7c2409c-18f6-4c09-b569-3203fce58140"
    assert ev.s3_data_key.endswith("/voice note.m4a.enc")


def test_double_encoded_body_parses_like_the_plain_one():
    assert parse_event(json.dumps(BASIC.decode()).encode()) == parse_event(BASIC)


def test_parse_event_ignores_unknown_extra_fields():
    ev = event(source="quarkus", extra={"nested": [1, 2]})
    assert ev == parse_event(BASIC)
    assert not hasattr(ev, "source")


def test_parse_event_canonicalises_uuids_to_lower_case():
    ev = event(event_id=BASIC_DICT["event_id"].upper())
    assert ev.event_id == BASIC_DICT["event_id"]


# ---- parse_event rejects ------------------------------------------------------------------------


def test_parse_event_rejects_not_utf8():
    err = assert_invalid((INTEROP / "messages" / "not_json.bin").read_bytes())
    assert "UTF-8" in err.reason


def test_parse_event_rejects_not_json():
    err = assert_invalid(b"{this is not json")
    assert "JSON" in err.reason


def test_parse_event_rejects_json_array():
    assert_invalid(json.dumps([BASIC_DICT]).encode())


@pytest.mark.parametrize("inner", ["[1, 2]", '"hello"', "42", "null"])
def test_parse_event_rejects_json_string_holding_a_non_object(inner):
    assert_invalid(json.dumps(inner).encode())


def test_parse_event_rejects_json_string_holding_non_json():
    assert_invalid(json.dumps("not json at all").encode())


def test_parse_event_rejects_the_backend_startup_probe():
    err = assert_invalid((INTEROP / "messages" / "not_an_event.bin").read_bytes())
    assert "not an upload event" in err.reason


def test_parse_event_rejects_non_uuid_event_id():
    err = assert_invalid(body(event_id="not-a-uuid"))
    assert "event_id" in err.reason


def test_parse_event_rejects_non_uuid_file_uuid():
    err = assert_invalid(body(file_uuid="../../etc"))
    assert "file_uuid" in err.reason


@pytest.mark.parametrize(
    "field", ["event_id", "email", "file_uuid", "s3_data_key", "s3_metadata_key", "bucket_name", "timestamp"]
)
def test_parse_event_rejects_missing_field(field):
    err = assert_invalid(body(**{field: ...}))
    assert field in err.reason


def test_parse_event_rejects_empty_email():
    assert_invalid(body(email="  "))


def test_parse_event_rejects_timestamp_as_string():
    err = assert_invalid(body(timestamp=str(BASIC_DICT["timestamp"])))
    assert "timestamp" in err.reason


def test_parse_event_rejects_body_over_64_kib():
    err = assert_invalid(body(padding="x" * (64 * 1024)))
    assert "limit" in err.reason


def test_parse_event_rejects_body_of_100000_brackets():
    assert_invalid(b"[" * 100000)


def test_parse_event_rejects_deeply_nested_json_without_recursion_error():
    # under the size limit, so the JSON parser itself meets the nesting
    assert_invalid(b"[" * 60000)


def test_parse_event_rejects_deeply_nested_objects_without_recursion_error():
    assert_invalid(b'{"a":' * 12000 + b"1" + b"}" * 12000)


def test_parse_event_rejects_deeply_nested_double_encoded_json_without_recursion_error():
    assert_invalid(json.dumps("[" * 60000).encode())


# ---- check_event ---------------------------------------------------------------------------------


def keys(email: str = EMAIL, file_uuid: str = FILE_UUID, name: str = "audio.mp3.enc") -> dict:
    return {
        "s3_data_key": f"uploads/{email}/{file_uuid}/{name}",
        "s3_metadata_key": f"uploads/{email}/{file_uuid}/metadata.json",
    }


def test_check_event_accepts_the_backend_event():
    check_event(parse_event(BASIC), ALLOWED)  # must not raise
    check_event(parse_event(DOUBLE), ALLOWED)


def test_check_event_forbids_a_bucket_not_allowed():
    err = assert_forbidden(event(bucket_name="someone-elses-bucket"))
    assert "someone-elses-bucket" in err.reason


def test_check_event_forbids_data_key_under_another_email():
    assert_forbidden(event(s3_data_key=keys(email="other@example.com")["s3_data_key"]))


def test_check_event_forbids_metadata_key_under_another_email():
    assert_forbidden(event(s3_metadata_key=keys(email="other@example.com")["s3_metadata_key"]))


def test_check_event_forbids_keys_under_another_file_uuid():
    other = "00000000-0000-4000-8000-000000000000"
    assert_forbidden(event(**keys(file_uuid=other)))


def test_check_event_forbids_the_backend_test_endpoint_keys():
    assert_forbidden(
        event(
            s3_data_key=f"test/data/{FILE_UUID}/audio.mp3.enc",
            s3_metadata_key=f"test/data/{FILE_UUID}/metadata.json",
        )
    )


def test_check_event_forbids_metadata_key_not_ending_in_metadata_json():
    err = assert_forbidden(event(s3_metadata_key=f"uploads/{EMAIL}/{FILE_UUID}/other.json"))
    assert "metadata.json" in err.reason


def test_check_event_forbids_data_key_with_a_further_folder():
    assert_forbidden(event(s3_data_key=f"uploads/{EMAIL}/{FILE_UUID}/sub/audio.mp3.enc"))


def test_check_event_forbids_dot_dot_below_the_folder():
    assert_forbidden(event(s3_data_key=f"uploads/{EMAIL}/{FILE_UUID}/.."))


def test_check_event_forbids_the_metadata_object_as_data():
    assert_forbidden(event(s3_data_key=keys()["s3_metadata_key"]))


def test_check_event_accepts_email_differing_only_in_case():
    check_event(event(email="User@Example.COM"), ALLOWED)  # keys are lower case
    check_event(event(**keys(email="USER@example.com")), ALLOWED)  # event email is lower case


def test_check_event_accepts_upper_case_file_uuid_in_keys():
    check_event(event(**keys(file_uuid=FILE_UUID.upper())), ALLOWED)
