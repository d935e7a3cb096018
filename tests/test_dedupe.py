"""The idempotency ledger against a real JetStream key-value bucket."""

from __future__ import annotations

import asyncio

import nats
import pytest

from uploads_consumer.dedupe import Deduplicator, Where, find_records, key_for
from uploads_consumer.errors import RetryableError
from uploads_consumer.events import FileUploadEvent

EVENT = FileUploadEvent(
    event_id="7c9e6679-7425-40de-944b-e07fc1f90ae7",
    email="user@example.com",
    file_uuid="1cbfac96-1cb1-45b2-a682-39c0de4ea705",
    s3_data_key="uploads/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/a.mp3.enc",
    s3_metadata_key="uploads/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/metadata.json",
    bucket_name="uploads",
    timestamp=1,
)


@pytest.fixture
async def js(nats_server):
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream(timeout=2)
    await nc.close()


def test_an_upload_is_keyed_by_its_event_id_and_what_it_points_at():
    twin = EVENT.model_copy(update={"s3_data_key": EVENT.s3_data_key.replace("a.mp3", "b.mp3")})
    assert key_for(EVENT) == key_for(EVENT.model_copy())
    assert key_for(EVENT).startswith(EVENT.event_id + ".")
    assert key_for(twin) != key_for(EVENT)
    for field in ("bucket_name", "email", "file_uuid", "s3_metadata_key"):
        assert key_for(EVENT.model_copy(update={field: "other"})) != key_for(EVENT), field


async def test_seen_after_mark_and_steps_are_kept_per_upload(js):
    ledger = Deduplicator(await js.create_key_value(bucket="ledger", history=1))
    key = key_for(EVENT)
    assert not await ledger.seen(key)
    assert await ledger.step(key, "webhook") is None
    await ledger.record_step(key, "webhook", {"status": 200})
    await ledger.mark(key)
    assert await ledger.seen(key)
    assert await ledger.step(key, "webhook") == {"status": 200}
    other = key_for(EVENT.model_copy(update={"bucket_name": "other"}))
    assert not await ledger.seen(other) and await ledger.step(other, "webhook") is None


async def test_a_record_says_where_the_upload_was_and_is_found_by_event_id_or_file_uuid_alone(js):
    """`trace` finds a processed upload with one lookup per consumer: the server matches the key."""
    ledger = Deduplicator(await js.create_key_value(bucket="ledger", history=1))
    key = key_for(EVENT)
    await ledger.record_step(key, "webhook", {"status": 200})  # a step's record is not the upload's
    where = Where("FILE_UPLOADS", 42, 7, 1769395017042, EVENT.event_id)
    await ledger.mark(key, where, EVENT.file_uuid)
    assert await ledger.seen(key)
    assert await find_records(js, "ledger", event_id=EVENT.event_id) == [where]
    assert await find_records(js, "ledger", file_uuid=EVENT.file_uuid) == [where]
    assert await find_records(js, "ledger", event_id="0ab35a7e-7a72-4e37-b34d-1045459d355f") == []
    assert await find_records(js, "no_such_bucket", event_id=EVENT.event_id) == []


async def test_a_record_written_before_records_said_where_is_still_found_with_its_time(js):
    ledger = Deduplicator(await js.create_key_value(bucket="ledger", history=1))
    await ledger.mark(key_for(EVENT))  # as a daemon before this wrote it: `1`
    (found,) = await find_records(js, "ledger", event_id=EVENT.event_id)
    assert (found.stream, found.seq, found.event_id) == ("", 0, EVENT.event_id) and found.at > 0


async def test_a_failed_record_is_retried_in_place_rather_than_repeating_the_whole_upload(js):
    ledger = Deduplicator(await js.create_key_value(bucket="ledger", history=1))
    await js.delete_key_value("ledger")  # writes fail until the bucket is back

    async def bucket_comes_back() -> None:
        await asyncio.sleep(0.4)
        await js.create_key_value(bucket="ledger", history=1)

    restore = asyncio.create_task(bucket_comes_back())
    await ledger.mark(key_for(EVENT))  # no RetryableError: the pauses outlast the outage
    await restore
    assert await ledger.seen(key_for(EVENT))


async def test_a_record_that_keeps_failing_is_retryable(js):
    ledger = Deduplicator(await js.create_key_value(bucket="ledger", history=1))
    await js.delete_key_value("ledger")
    with pytest.raises(RetryableError, match="recording the upload as processed failed"):
        await ledger.mark(key_for(EVENT))


async def test_timeouts_are_counted_per_upload_step_and_message_and_replicas_counting_at_once_each_add_theirs(
    js, nats_server
):
    bucket = await js.create_key_value(bucket="ledger", history=1)
    key = key_for(EVENT)
    ledger = Deduplicator(bucket)
    assert [await ledger.count_timeout(key, "transcode", "FILE_UPLOADS:7") for _ in range(2)] == [1, 2]
    assert await ledger.count_timeout(key, "video", "FILE_UPLOADS:7") == 1, "each step its own count"
    # Three replicas, each with its own connection, time out on the same message at once.
    replicas = [await nats.connect(nats_server.url) for _ in range(3)]
    try:
        ledgers = [Deduplicator(await nc.jetstream(timeout=2).key_value("ledger")) for nc in replicas]
        counted = await asyncio.gather(*(r.count_timeout(key, "transcode", "FILE_UPLOADS:7") for r in ledgers))
    finally:
        for nc in replicas:
            await nc.close()
    assert sorted(counted) == [3, 4, 5]
    # `dlq replay` republishes the upload: another message, whose count starts afresh.
    assert await ledger.count_timeout(key, "transcode", "FILE_UPLOADS:12") == 1
    assert await Deduplicator(None).count_timeout(key, "transcode", "FILE_UPLOADS:12") is None
