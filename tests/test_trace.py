"""`uploads-consumer trace`: one upload's timeline across every consumer and stage, held against what the
daemons themselves say they did (their logs), for uploads processed, in flight, pending, dead-lettered
and acknowledged as duplicates; read from the streams alone, and with the audit trail."""

from __future__ import annotations

import json
import uuid

import pytest
from console_world import HOSTILE_NAME, World, build_world


@pytest.fixture
async def world(tmp_path, daemon_env, start_daemon, settings_for, s3_client, bucket) -> World:
    return await build_world(tmp_path, daemon_env, start_daemon, settings_for, s3_client, bucket)


def trace(world: World, *args: str, audit: bool = False) -> dict:
    out = world.cli("trace", *args, "--json", **({} if audit else {"AUDIT_URL": ""}))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def states(timeline: dict) -> dict[str, str]:
    return {c["name"]: c["state"] for c in timeline["consumers"]}


def consumer(timeline: dict, name: str) -> dict:
    (found,) = [c for c in timeline["consumers"] if c["name"] == name]
    return found


async def test_trace_gives_each_consumers_state_as_the_daemons_themselves_report_it(world):
    ok, held, missing = world.uploads["ok"], world.uploads["held"], world.uploads["missing"]
    said = world.daemon_outcomes()
    s = world.seqs
    assert said["process"] == {
        f"{ok.event_id}@{s['ok']}": "processed",
        f"{held.event_id}@{s['held']}": "processed",
        f"{missing.event_id}@{s['missing']}": "dead_lettered",
        f"{ok.event_id}@{s['duplicate']}": "duplicate",
    }
    assert list(said["notify"].values()) == ["processed"], "held is still in flight"

    for audit in (False, True):
        timeline = trace(world, ok.file_uuid, audit=audit)
        assert states(timeline) == {"process": "processed", "notify": "processed", "later": "pending"}
        upload = timeline["upload"]
        assert (upload["event_id"], upload["seq"], upload["filename"]) == (ok.event_id, s["ok"], HOSTILE_NAME)
        # The duplicate's message: in the audit trail; the streams alone know only the one processed.
        assert upload["other_seqs"] == ([s["duplicate"]] if audit else [])
        saved = consumer(timeline, "process")["outputs"]["save"]["path"]
        assert saved.endswith(f"/{ok.file_uuid}/{HOSTILE_NAME}"), saved
        assert consumer(timeline, "notify")["outputs"] == {"gate": {"gate": "passed"}}
        assert consumer(timeline, "notify")["message_seq"] == consumer(timeline, "process")["result_seq"]
        assert [d["outcome"] for d in consumer(timeline, "process")["deliveries"]] == (
            ["processed", "duplicate"] if audit else ["processed"]
        )

        timeline = trace(world, held.event_id, audit=audit)
        assert states(timeline) == {"process": "processed", "notify": "in_flight", "later": "pending"}

        timeline = trace(world, missing.file_uuid, audit=audit)
        assert states(timeline) == {"process": "dead_lettered", "notify": "not_reached", "later": "pending"}
        process = consumer(timeline, "process")
        assert (process["error_class"], process["replayable"]) == ("not_found", True)
        assert "process did not complete it" in consumer(timeline, "notify")["note"]

        timeline = trace(world, "--seq", str(s["duplicate"]), audit=audit)
        assert timeline["upload"]["event_id"] == ok.event_id
        assert states(timeline)["process"] == "duplicate"
        assert timeline["found_by"] == "its sequence"


async def test_trace_finds_an_upload_without_reading_the_stream_and_says_how(world):
    ok = world.uploads["ok"]
    by_file = trace(world, ok.file_uuid)
    assert by_file["found_by"].startswith("the consumers' records")
    assert by_file["source"] == "streams"
    assert trace(world, ok.event_id)["upload"]["seq"] == by_file["upload"]["seq"]
    with_audit = trace(world, ok.file_uuid, audit=True)
    assert with_audit["source"] == "audit trail and streams"
    assert all(d["duration_ms"] is not None for d in consumer(with_audit, "process")["deliveries"])


async def test_trace_of_an_unknown_or_malformed_id_exits_1_with_one_line(world):
    unknown = world.cli("trace", str(uuid.uuid4()), AUDIT_URL="")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert len(unknown.stderr.strip().splitlines()) == 1 and "no upload" in unknown.stderr
    bad = world.cli("trace", "not-an-id")
    assert bad.returncode == 1 and "is not a file_uuid or an event_id" in bad.stderr
    gone = world.cli("trace", "--seq", "999")
    assert gone.returncode == 1 and "no upload sequence 999 in FILE_UPLOADS" in gone.stderr
