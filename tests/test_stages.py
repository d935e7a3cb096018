"""Stages (AFTER=): the seed's pipeline as drawn, Process → Notify → Archive, each stage taking an upload only
once the one before it completed it. Real daemons, nats-server, S3, clamd and a webhook receiver."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    consumer_info,
    dead_letters,
    make_files,
    plugins,
    publish_raw,
    publish_uploads,
    read_stream,
    until,
    wait_ready,
    wait_settled,
)
from test_image import flat, truncated_jpeg
from test_scan import EICAR
from webhook_receiver import Answer

from uploads_consumer.embedded import free_port
from uploads_consumer.errors import ErrorClass, PermanentError
from uploads_consumer.events import parse_result
from uploads_consumer.processors import ProcessingContext
from uploads_consumer.producer import event_json

RESULTS = "FILE_PROCESSED"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", *args], env=env, capture_output=True, text=True, timeout=60
    )


def stage(name: str, after: str | None, **extra: str) -> dict[str, str]:
    env = {"NATS_CONSUMER_NAME": name, "HTTP_PORT": str(free_port()), **extra}
    if after:
        env["AFTER"] = after
    return env


async def results_of(url: str) -> dict[tuple[str, str], list[dict]]:
    """Result events by (consumer, event_id), with the subject each was published on: what a reader of
    `file.processed.*` gets (the stages' replays, `file.processed.replay.{stage}`, left out)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for msg in await read_stream(url, RESULTS):
        if msg.subject.startswith("file.processed.replay."):
            continue
        data = json.loads(msg.data)
        data["_subject"] = msg.subject
        out.setdefault((data["consumer"], data["event_id"]), []).append(data)
    return out


async def objects(s3_client, bucket: str) -> set[str]:
    return {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])}


async def test_process_notify_archive_as_stages_gate_what_process_did_not_complete_and_flow_a_replay_on_once(
    tmp_path,
    settings_for,
    start_daemon,
    daemon_env,
    nats_server,
    clamd,
    webhook_receiver,
    webhook_secret,
    s3_client,
    bucket,
):
    """The issue's report, as drawn: a corrupt JPEG and an infected file that `process` dead-lettered reach
    neither `notify` nor `archive`; a clean upload is notified, then archived, once each, each stage after
    the one before, with process's outputs in the webhook and nothing downloaded by notify; an upload
    process could not find is replayed there once its object is back, and flows on once."""
    archive_bucket = bucket + "-archive"
    s3_client.create_bucket(Bucket=archive_bucket)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (clean := inputs / "photo.png").write_bytes(flat(64, 48).pngsave_buffer())
    truncated_jpeg(broken := inputs / "broken.jpg")
    (infected := inputs / "eicar.txt").write_bytes(EICAR)
    [late] = make_files(inputs, 1, prefix="late")

    # Started together, and the later stages first: each waits for the one it follows to exist.
    archive = start_daemon(
        "archive.log",
        **stage(
            "archive",
            "notify",
            PROCESSORS="archive",
            ARCHIVE_BUCKET=archive_bucket,
            ARCHIVE_DELETE_SOURCE="true",
        ),
    )
    notify = start_daemon(
        "notify.log",
        **stage(
            "notify",
            "process",
            PROCESSORS="webhook",
            WEBHOOK_URL=webhook_receiver.url + "/hook",
            WEBHOOK_SECRET=webhook_secret,
            AUDIT_URL=f"sqlite:///{tmp_path / 'notify-audit.db'}",
        ),
    )
    for daemon in (notify, archive):  # each waits for the one it follows to exist, saying so
        await until(lambda d=daemon: "(AFTER) does not exist" in d.log_text(), 30, "waiting for its upstream", daemon)
    process = start_daemon(
        "process.log", **stage("process", None, PROCESSORS="save,scan,image", SCAN_CLAMD_URL=clamd.url)
    )
    for daemon in (process, notify, archive):
        await wait_ready(daemon)

    settings = settings_for()
    events = await publish_uploads(settings, [clean, broken, infected])
    # `late`'s event is published before its object is back: process dead-letters it, not_found.
    [late_event] = await publish_uploads(settings, [late], publish=False)
    stored = s3_client.get_object(Bucket=bucket, Key=late_event.s3_data_key)["Body"].read()
    s3_client.delete_object(Bucket=bucket, Key=late_event.s3_data_key)
    nc_events = [*events, late_event]
    await publish_raw(nats_server.url, "file.uploads", [event_json(late_event)])
    await wait_settled(nats_server.url, 4, daemon=process, consumer="process")
    await wait_settled(nats_server.url, 1, daemon=notify, stream=RESULTS, consumer="notify")
    await wait_settled(nats_server.url, 2, daemon=archive, stream=RESULTS, consumer="archive")

    ok, cut, virus, _ = (e.event_id for e in nc_events)
    letters = {json.loads(m.data)["event_id"]: m.headers for m in await dead_letters(nats_server.url)}
    assert {k: (h["Uploads-Consumer"], h["Uploads-Error-Class"]) for k, h in letters.items()} == {
        cut: ("process", "unsupported_media"),
        virus: ("process", "infected"),
        late_event.event_id: ("process", "not_found"),
    }, "only process dead-lettered, and nothing it dead-lettered reached a later stage"
    assert [d.webhook_id for d in webhook_receiver.deliveries] == [ok]
    results = await results_of(nats_server.url)
    assert set(results) == {("process", ok), ("notify", ok), ("archive", ok)}
    by = {consumer: found[0] for (consumer, _), found in results.items()}
    assert {c: r["_subject"] for c, r in by.items()} == {
        "process": "file.processed.process",
        "notify": "file.processed.notify",
        "archive": "file.processed.archive",
    }
    assert by["process"]["processed_at"] <= by["notify"]["processed_at"] <= by["archive"]["processed_at"]

    # notify read only the event, yet reports the upload's facts and process's outputs.
    hook = webhook_receiver.deliveries[0].json["data"]
    digest = hashlib.sha256(clean.read_bytes()).hexdigest()
    assert by["notify"]["fetched"] == "event" and by["notify"]["sha256"] == digest
    assert hook["sha256"] == digest and hook["content_type"] == "image/png" and hook["original_filename"] == "photo.png"
    assert hook["outputs"]["scan"]["result"] == "clean"
    assert hook["outputs"]["image"]["renditions"] and hook["outputs"]["save"]["path"].endswith("photo.png")
    assert hook["upstream"]["process"]["processors"] == ["save", "scan", "image"]
    # archive follows notify, and sees both stages before it.
    assert by["archive"]["after"] == "notify" and list(by["archive"]["upstream"]) == ["process", "notify"]
    assert by["archive"]["upload"] == json.loads(event_json(events[0]))
    assert await objects(s3_client, archive_bucket) == {events[0].s3_data_key, events[0].s3_metadata_key}
    assert events[0].s3_data_key not in await objects(s3_client, bucket), (
        "ARCHIVE_DELETE_SOURCE, safe as the last stage"
    )

    # The cause fixed, the dead letter is replayed to process: it flows on to notify and archive, once.
    s3_client.put_object(Bucket=bucket, Key=late_event.s3_data_key, Body=stored)
    seq = next(
        m.seq for m in await dead_letters(nats_server.url) if json.loads(m.data)["event_id"] == late_event.event_id
    )
    replay = cli(daemon_env, "dlq", "replay", "--seq", str(seq))
    assert replay.returncode == 0 and "to file.uploads.replay.process" in replay.stdout, replay.stdout + replay.stderr
    await wait_settled(nats_server.url, 5, daemon=process, consumer="process")
    await until(
        lambda: _has(results_of(nats_server.url), ("archive", late_event.event_id)), 30, "late archived", archive
    )
    await wait_settled(nats_server.url, 2, daemon=notify, stream=RESULTS, consumer="notify")
    await wait_settled(nats_server.url, 3, daemon=archive, stream=RESULTS, consumer="archive")
    assert sorted(d.webhook_id for d in webhook_receiver.deliveries) == sorted([ok, late_event.event_id])
    results = await results_of(nats_server.url)
    assert all(len(found) == 1 for found in results.values()), "one result per upload per stage"
    assert {c for c, e in results if e == late_event.event_id} == {"process", "notify", "archive"}

    # notify's audit trail knows each upload it settled, though what it read was process's result event.
    with sqlite3.connect(tmp_path / "notify-audit.db") as db:
        audited = db.execute("SELECT event_id, email, filename, stream, outcome FROM audit_records").fetchall()
    assert sorted(audited) == sorted(
        (e.event_id, "user@example.com", name, RESULTS, "processed")
        for e, name in ((events[0], "photo.png"), (late_event, late.name))
    )

    status = cli(daemon_env | {"NATS_CONSUMER_NAME": "notify", "AFTER": "process"}, "status")
    assert status.returncode == 0, status.stderr
    assert "consumer notify (after process)" in status.stdout and "pending (lag behind process) 0" in status.stdout
    assert "archive" in status.stdout.split("pipeline")[1] and "after notify: pending 0 behind notify" in status.stdout
    for daemon in (archive, notify, process):
        assert daemon.terminate() == 0


async def _has(results, key) -> bool:
    return key in await results


def processed_by(daemon) -> int:
    return sum(1 for line in daemon.log_text().splitlines() if '"event": "processed"' in line)


async def test_three_replicas_of_a_middle_stage_share_its_work_and_a_sigkill_of_one_repeats_nothing_downstream(
    tmp_path, settings_for, start_daemon, nats_server, webhook_receiver, webhook_secret
):
    """notify runs as three replicas of one durable; one is killed mid-run. Every upload is notified and
    reaches archive once; a webhook is sent again only for what the killed replica held (the at-least-once
    window of a crash between the delivery and its checkpoint), with the same webhook-id."""
    webhook_receiver.respond = lambda _delivery: Answer(delay=0.1)
    process = start_daemon("process.log", **stage("process", None))
    await wait_ready(process)
    replica = {
        "PROCESSORS": "webhook",
        "WEBHOOK_URL": webhook_receiver.url + "/hook",
        "WEBHOOK_SECRET": webhook_secret,
        "ACK_WAIT": "3s",
        "MAX_IN_FLIGHT": "2",
        "FETCH_BATCH": "1",
    }
    replicas = [start_daemon(f"notify-{i}.log", **stage("notify", "process", **replica)) for i in range(3)]
    (tmp_path / "state").mkdir()
    after = start_daemon(
        "after.log", **stage("after", "notify", **plugins(tmp_path / "state", "uc_test_plugins:record"))
    )
    for daemon in (*replicas, after):
        await wait_ready(daemon)
    events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 30))
    await until(lambda: len(webhook_receiver.deliveries) >= 8, 60, "8 webhooks", replicas[0])
    replicas[0].proc.send_signal(signal.SIGKILL)
    replicas[0].proc.wait(10)
    await wait_settled(nats_server.url, 30, daemon=process, consumer="process")
    await wait_settled(nats_server.url, 30, daemon=replicas[1], stream=RESULTS, consumer="notify", timeout=90)
    await wait_settled(nats_server.url, 60, daemon=after, stream=RESULTS, consumer="after", timeout=60)

    ids = sorted(e.event_id for e in events)
    sent = [d.webhook_id for d in webhook_receiver.deliveries]
    assert sorted(set(sent)) == ids, "every upload notified"
    again = len(sent) - len(ids)
    assert again <= 2, f"{again} webhooks sent again: at most what the killed replica held (MAX_IN_FLIGHT=2)"
    assert {d.verified for d in webhook_receiver.deliveries} == {"ok"}
    results = await results_of(nats_server.url)
    for consumer in ("process", "notify", "after"):
        assert sorted(e for c, e in results if c == consumer) == ids, consumer
        assert all(len(v) == 1 for (c, _), v in results.items() if c == consumer), f"{consumer}: one result each"
    assert sorted(line.split()[0] for line in (tmp_path / "state" / "record.log").read_text().splitlines()) == ids
    shares = [processed_by(r) for r in replicas]
    assert all(n >= 1 for n in shares), f"each replica took some of the work: {shares}"
    assert sum(shares[1:]) + shares[0] >= 30
    for daemon in (after, *replicas[1:], process):
        assert daemon.terminate() == 0


def setup(env: dict[str, str], name: str, after: str | None = None, **extra: str) -> subprocess.CompletedProcess:
    variables = {**env, "NATS_CONSUMER_NAME": name, **extra}
    variables.pop("AFTER", None)
    if after:
        variables["AFTER"] = after
    return cli(variables, "setup")


async def test_setup_makes_a_stage_on_the_results_and_refuses_what_cannot_work(daemon_env, nats_server, bucket):
    """setup creates a stage's durable where its upstream's results are, and refuses, before creating
    anything: an upstream that does not exist, one that publishes no results, and a cycle."""
    missing = setup(daemon_env, "notify", "process")
    assert missing.returncode == 1
    assert "consumer process (AFTER) does not exist on FILE_UPLOADS or FILE_PROCESSED" in missing.stderr

    quiet = setup(daemon_env, "quiet", NATS_RESULT_SUBJECT="")
    assert quiet.returncode == 0, quiet.stderr
    refused = setup(daemon_env, "notify", "quiet")
    assert refused.returncode == 1 and "consumer quiet (AFTER) publishes no result events" in refused.stderr

    assert setup(daemon_env, "process").returncode == 0
    made = setup(daemon_env, "notify", "process")
    assert made.returncode == 0, made.stderr
    assert "created consumer notify on FILE_PROCESSED" in made.stdout
    assert "filter file.processed.process, file.processed.replay.notify" in made.stdout
    info = await consumer_info(nats_server.url, RESULTS, "notify")
    assert info.config.metadata["uploads_consumer_after"] == "process"
    assert info.config.metadata["uploads_consumer_results"] == "file.processed.notify"
    assert info.config.metadata["uploads_consumer_bucket"] == "notify_done", "where trace finds what it processed"
    assert setup(daemon_env, "archive", "notify").returncode == 0
    cycle = setup(daemon_env, "process", "archive")
    assert cycle.returncode == 1
    assert "AFTER=archive makes a cycle: process → archive → notify → process" in cycle.stderr, cycle.stderr
    again = setup(daemon_env, "notify", "process")
    assert again.returncode == 0 and "created" not in again.stdout, "a second run changes nothing"

    status = cli(daemon_env | {"NATS_CONSUMER_NAME": "archive", "AFTER": "notify"}, "status", "--json")
    assert status.returncode == 0, status.stderr
    figures = json.loads(status.stdout)
    assert figures["stream"]["name"] == RESULTS and figures["consumer"]["after"] == "notify"
    assert [(row["name"], row["after"]) for row in figures["pipeline"]] == [
        ("process", None),
        ("quiet", None),
        ("notify", "process"),
        ("archive", "notify"),
    ]


def test_after_names_one_other_consumer_and_needs_results(daemon_env):
    fan_in = cli(daemon_env | {"NATS_CONSUMER_NAME": "x", "AFTER": "a,b"}, "setup")
    assert fan_in.returncode == 2 and "AFTER: names one consumer" in fan_in.stderr
    itself = cli(daemon_env | {"NATS_CONSUMER_NAME": "x", "AFTER": "x"}, "setup")
    assert itself.returncode == 2 and "AFTER: names this consumer itself (x)" in itself.stderr
    blind = cli(daemon_env | {"NATS_CONSUMER_NAME": "x", "AFTER": "a", "NATS_RESULT_SUBJECT": ""}, "setup")
    assert blind.returncode == 2 and "NATS_RESULT_SUBJECT: is empty, but AFTER is set" in blind.stderr


async def test_deleting_the_upload_is_allowed_only_after_every_consumer_that_reads_it(daemon_env, nats_server, bucket):
    """ARCHIVE_DELETE_SOURCE: refused while another consumer reads the uploads side by side; allowed for
    the last stage, with a stage after it that reads only the event; and a consumer that would read the
    upload after it is refused in turn."""
    archive = {"PROCESSORS": "archive", "ARCHIVE_BUCKET": bucket + "-archive", "ARCHIVE_DELETE_SOURCE": "true"}
    assert setup(daemon_env, "process").returncode == 0
    side = setup(daemon_env, "archive", **archive)
    assert side.returncode == 1
    assert "ARCHIVE_DELETE_SOURCE), but consumer(s) process may still read it" in side.stderr, side.stderr
    last = setup(daemon_env, "archive", "process", **archive)
    assert last.returncode == 0, last.stderr
    tell = setup(
        daemon_env, "tell", "archive", PROCESSORS="webhook", WEBHOOK_URL="http://127.0.0.1:9/x", WEBHOOK_FORMAT="slack"
    )
    assert tell.returncode == 0, tell.stderr
    reader = setup(daemon_env, "thumbs")  # PROCESSORS=save: reads the plaintext, side by side
    assert reader.returncode == 1
    assert "consumer archive deletes the stored upload after its step (ARCHIVE_DELETE_SOURCE)" in reader.stderr


def test_processors_chain_shows_where_a_stage_reads(daemon_env):
    out = cli(daemon_env | {"NATS_CONSUMER_NAME": "notify", "AFTER": "process"}, "processors", "--chain")
    assert out.returncode == 0, out.stderr
    assert (
        "consumer notify: a stage after process: reads its results, file.processed.process on FILE_PROCESSED"
        in out.stdout
    )
    assert "results to file.processed.notify" in out.stdout
    head = json.loads(cli(daemon_env, "processors", "--chain", "--json").stdout)
    assert head["place"] == {
        "after": None,
        "stream": "FILE_UPLOADS",
        "reads": "file.uploads",
        "results": "file.processed.file_processor",
    }


# -- what a stage reads of its upstream's result event (no server needed)


def result_event(**changes) -> bytes:
    upload = {
        "event_id": "0ab35a7e-7a72-4e37-b34d-1045459d355f",
        "email": "user@example.com",
        "file_uuid": "1cbfac96-1cb1-45b2-a682-39c0de4ea705",
        "s3_data_key": "uploads/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/a.png.enc",
        "s3_metadata_key": "uploads/user@example.com/1cbfac96-1cb1-45b2-a682-39c0de4ea705/metadata.json",
        "bucket_name": "uploads",
        "timestamp": 1769395017042,
    }
    process = {
        "fetched": "plaintext",
        "original_filename": "a.png",
        "size": 48033,
        "sha256": "ab" * 32,
        "content_type": "image/png",
        "processors": ["scan"],
        "skipped": [],
        "outputs": {"scan": {"result": "clean"}},
        "processed_at": 1769395017000,
    }
    body = {
        "event_id": upload["event_id"],
        "file_uuid": upload["file_uuid"],
        "email": upload["email"],
        "status": "processed",
        "consumer": "notify",
        "fetched": "event",
        "original_filename": None,
        "size": None,
        "sha256": None,
        "content_type": None,
        "processors": ["webhook"],
        "skipped": [],
        "outputs": {"webhook": {"status": 200}},
        "processed_at": 1769395017042,
        "after": "process",
        "upload": upload,
        "upstream": {"process": process},
    }
    body.update(changes)
    return json.dumps(body).encode()


def test_a_stage_reads_the_upload_and_every_stage_before_it_from_its_upstreams_result():
    incoming = parse_result(result_event(), "notify")
    assert incoming.event.event_id == "0ab35a7e-7a72-4e37-b34d-1045459d355f"
    assert list(incoming.upstream) == ["process", "notify"], "nearest last"
    assert incoming.upstream["notify"]["outputs"] == {"webhook": {"status": 200}}
    ctx = ProcessingContext(
        event=incoming.event, download_path=Path("/x"), work_dir=Path("/x/w"), log=None, upstream=incoming.upstream
    )
    assert ctx.facts()["sha256"] == "ab" * 32 and ctx.facts()["fetched"] == "event"
    assert ctx.earlier_outputs() == {"scan": {"result": "clean"}, "webhook": {"status": 200}}


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"not json", "not a result event of notify (not JSON)"),
        (result_event(consumer="other"), "a result event of 'other', not of notify"),
        (result_event(upload=None), "without the upload (published by a version before stages)"),
        (result_event(event_id="1cbfac96-1cb1-45b2-a682-39c0de4ea705"), "names another upload than it carries"),
        (result_event(status="failed"), "not a result event of notify"),
        (result_event(upstream={"process": {"sha256": "ab" * 32}}), "what 'process' reported: fetched Field required"),
        (result_event(outputs=["webhook"]), "what 'notify' reported: outputs Input should be a valid dictionary"),
    ],
)
def test_anything_else_on_a_stages_subjects_is_an_invalid_message_saying_what_it_is(body, said):
    with pytest.raises(PermanentError) as caught:
        parse_result(body, "notify")
    assert caught.value.error_class is ErrorClass.INVALID_MESSAGE and said in caught.value.reason


async def test_a_stages_own_dead_letter_is_replayed_to_that_stage_alone_and_flows_on_once(
    tmp_path, settings_for, start_daemon, daemon_env, nats_server, webhook_receiver, webhook_secret
):
    """notify dead-letters an upload its receiver refused (400); replayed once the receiver takes it, it
    goes back to notify alone, on notify's replay subject in the result stream: process does not see it
    again, a sibling stage after process neither, and the stage after notify gets it once."""
    refused: set[str] = set()

    def answer(delivery):
        if delivery.webhook_id in refused:
            return Answer(status=400)
        return Answer()

    webhook_receiver.respond = answer
    (tmp_path / "state").mkdir()
    process = start_daemon("process.log", **stage("process", None))
    hook = {"PROCESSORS": "webhook", "WEBHOOK_URL": webhook_receiver.url + "/hook", "WEBHOOK_SECRET": webhook_secret}
    notify = start_daemon("notify.log", **stage("notify", "process", **hook))
    sibling = start_daemon(
        "sibling.log",
        **stage("sibling", "process", **plugins(tmp_path / "state", "uc_test_plugins:slow"), UC_TEST_SLOW_SECONDS="0"),
    )
    after = start_daemon(
        "after.log", **stage("after", "notify", **plugins(tmp_path / "state", "uc_test_plugins:record"))
    )
    for daemon in (process, notify, sibling, after):
        await wait_ready(daemon)
    _, second = await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
    refused.add(second.event_id)
    # (refused before its webhook can be sent: notify waits for process, which has to download it first)
    await wait_settled(nats_server.url, 2, daemon=process, consumer="process")
    await wait_settled(nats_server.url, 2, daemon=notify, stream=RESULTS, consumer="notify")
    await wait_settled(nats_server.url, 2, daemon=sibling, stream=RESULTS, consumer="sibling")
    [letter] = await dead_letters(nats_server.url)
    assert letter.headers["Uploads-Consumer"] == "notify" and letter.headers["Uploads-Stream"] == RESULTS
    assert letter.headers["Uploads-Error-Class"] == "processor_failed"
    assert json.loads(letter.data)["consumer"] == "process", "the dead letter is the result notify failed on"

    refused.clear()
    replay = cli(daemon_env, "dlq", "replay", "--all")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replayed 1 message (1 to file.processed.replay.notify)" in replay.stdout
    await until(lambda: _has(results_of(nats_server.url), ("after", second.event_id)), 30, "flowed on", after)
    await wait_settled(nats_server.url, 1, daemon=notify, stream=RESULTS, consumer="notify")
    results = await results_of(nats_server.url)
    assert {k: len(v) for k, v in results.items() if len(v) != 1} == {}, "one result per upload per consumer"
    assert {c for c, e in results if e == second.event_id} == {"process", "notify", "sibling", "after"}
    assert [d.webhook_id for d in webhook_receiver.deliveries].count(second.event_id) == 2, "refused, then sent"
    assert "duplicate acknowledged" not in process.log_text() + sibling.log_text(), "no one else saw the replay"
    assert await dead_letters(nats_server.url) == []
    for daemon in (after, sibling, notify, process):
        assert daemon.terminate() == 0
