"""The audit trail read at scale: `audit report` from the daily rollups (one or two keys, and a
consumer with no records), `audit show` of one upload or person, `audit export` as JSON lines or CSV;
on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json

from audit_support import audit_command, fill, recent

from uploads_consumer.audit.record import ZERO_HASH, chained
from uploads_consumer.audit.store import day_text, user_periods


def days_ago(n: int) -> str:
    import time

    return day_text(int(time.time() // 86400) - n)


async def test_a_report_of_a_consumer_without_records_exits_1_naming_the_consumers_that_have_some(
    store_url, settings_for, daemon_env
):
    notify = chained(recent(2, consumer="notify"), "w1", 0, ZERO_HASH)
    archive = chained(recent(1, consumer="archive"), "w2", 0, ZERO_HASH)
    await fill(store_url, notify, archive)
    env = {**daemon_env, "AUDIT_URL": store_url}
    for args in ((), ("--consumer", "nobody"), ("--json",)):
        report = audit_command(env, "report", *args)
        assert (report.returncode, report.stdout) == (1, ""), args
        who = "nobody" if "nobody" in args else "file_processor"
        assert report.stderr.startswith(f"uploads-consumer: consumer {who} has no records since "), report.stderr
        assert report.stderr.rstrip().endswith("consumers with records since then: archive (1), notify (2)")
    assert audit_command(env, "report", "--consumer", "notify").returncode == 0


async def test_a_report_groups_by_two_keys(store_url, settings_for, daemon_env):
    ana, ben = "ana@example.com", "ben@example.com"
    records = chained(
        recent(2, email=ana) + recent(1, days_ago=1, email=ana) + recent(1, email=ben, outcome="dead_lettered"),
        "w",
        0,
        ZERO_HASH,
    )
    await fill(store_url, records)
    env = {**daemon_env, "AUDIT_URL": store_url}
    expected = [
        {"group": [ana, days_ago(1)], "user": ana, "day": days_ago(1), "records": 1, "uploads": 1, "failures": 0},
        {"group": [ana, days_ago(0)], "user": ana, "day": days_ago(0), "records": 2, "uploads": 2, "failures": 0},
        {"group": [ben, days_ago(0)], "user": ben, "day": days_ago(0), "records": 1, "uploads": 0, "failures": 1},
    ]
    for by in (["--by", "user,day"], ["--by", "user", "--by", "day"]):
        report = audit_command(env, "report", *by, "--json")
        assert report.returncode == 0, report.stderr
        shown = json.loads(report.stdout)
        assert shown["by"] == "user,day"
        kept = ("group", "user", "day", "records", "uploads", "failures")
        assert [{k: g[k] for k in kept} for g in shown["groups"]] == expected
        assert shown["total"]["records"] == 4
    by_outcome = json.loads(audit_command(env, "report", "--by", "user,outcome", "--json").stdout)["groups"]
    assert [(g["user"], g["outcome"], g["records"], g["uploads"], g["bytes"]) for g in by_outcome] == [
        (ana, "processed", 3, 3, 100 + 200 + 100),  # each entry's sizes count from 100 again
        (ben, "dead_lettered", 1, 0, 0),
    ]
    table = audit_command(env, "report", "--by", "day,outcome").stdout.splitlines()
    assert table[1].split()[:3] == ["DAY", "OUTCOME", "RECORDS"]
    assert [line.split()[:3] for line in table[2:-1]] == [
        [days_ago(1), "processed", "1"],
        [days_ago(0), "dead_lettered", "1"],
        [days_ago(0), "processed", "2"],
    ]


async def test_a_report_counts_whole_utc_days_back_to_the_one_since_falls_on(store_url, settings_for, daemon_env):
    records = chained(recent(3) + recent(2, days_ago=8) + recent(1, days_ago=10), "w", 0, ZERO_HASH)
    await fill(store_url, records)
    env = {**daemon_env, "AUDIT_URL": store_url}

    def total(since: str) -> int:
        report = audit_command(env, "report", "--since", since, "--json")
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["since"] == days_ago(int(since.removesuffix("d")))
        return json.loads(report.stdout)["total"]["records"]

    assert [total(since) for since in ("7d", "8d", "9d", "10d")] == [3, 5, 5, 6]


UPLOAD = "5b0c1a52-5d8e-4a9b-9a3e-0c1c2f7e8d10"


async def test_show_prints_every_record_of_an_upload_or_a_person_across_consumers(store_url, settings_for, daemon_env):
    ana = {"email": "ana@example.com", "file_uuid": UPLOAD, "event_id": "e-1", "filename": "a.pdf"}
    retried = recent(1, days_ago=0.02, outcome="retried", reason="scan: clamd down", **ana)
    process = retried + recent(1, days_ago=0.01, **ana)
    notify = recent(1, days_ago=0.005, consumer="notify", **ana)
    other = recent(1, email="ana@example.com", file_uuid="0ab35a7e-7a72-4e37-b34d-1045459d355f", event_id="e-2")
    await fill(
        store_url,
        chained(process + other, "p", 0, ZERO_HASH),
        chained(notify, "n", 0, ZERO_HASH),
        chained(recent(2, email="ben@example.com"), "b", 0, ZERO_HASH),
    )
    env = {**daemon_env, "AUDIT_URL": store_url}

    shown = audit_command(env, "show", UPLOAD)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.splitlines()
    assert [line.split()[1:3] for line in out[:-1]] == [
        ["file_processor", "retried"],
        ["file_processor", "processed"],
        ["notify", "processed"],
    ]
    assert 'reason="scan: clamd down"' in out[0] and "filename=a.pdf" in out[1]
    assert out[-1] == "3 records of 1 upload, by file_processor, notify"
    as_json = [json.loads(line) for line in audit_command(env, "show", "e-1", "--json").stdout.splitlines()]
    assert [(r["writer"], r["seq"], r["file_uuid"]) for r in as_json] == [
        ("p", 1, UPLOAD),
        ("p", 2, UPLOAD),
        ("n", 1, UPLOAD),
    ]
    person = audit_command(env, "show", "ana@example.com").stdout.splitlines()
    assert person[-1] == "4 records of 2 uploads, by file_processor, notify"
    missing = audit_command(env, "show", "nobody@example.com")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no record has 'nobody@example.com' as its file_uuid, event_id or email" in missing.stderr


async def test_export_streams_the_records_since_as_json_lines_or_csv(store_url, settings_for, daemon_env):
    import csv
    import io

    old, new = recent(2, days_ago=10), recent(3, email="ana@example.com", filename='a "quoted", name.pdf')
    records = chained(old + new, "w", 0, ZERO_HASH)
    await fill(store_url, records)
    env = {**daemon_env, "AUDIT_URL": store_url}

    jsonl = audit_command(env, "export", "--since", "7d")
    assert jsonl.returncode == 0, jsonl.stderr
    exported = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [{k: r[k] for k in records[2]} for r in exported] == records[2:]
    assert len(audit_command(env, "export", "--since", "30d").stdout.splitlines()) == 5

    rows = list(csv.DictReader(io.StringIO(audit_command(env, "export", "--format", "csv").stdout)))
    assert [int(r["seq"]) for r in rows] == [3, 4, 5]
    assert rows[0]["filename"] == 'a "quoted", name.pdf' and rows[0]["hash"] == records[2]["hash"]
    assert json.loads(rows[0]["processors"]) == ["save"] and rows[0]["error_class"] == ""


def test_the_users_pyramid_covers_every_day_from_since_on_once():
    horizon = 21_000
    for since in range(20_000, 20_600):
        covered = []
        for days, first, end in user_periods(since):
            for period in range(first, end if end is not None else horizon // days):
                covered.extend(range(period * days, (period + 1) * days))
        assert sorted(covered) == list(range(since, covered[-1] + 1)), since
        assert len(user_periods(since)) <= 4
    assert user_periods(20429) == [(1, 20429, 20432), (4, 5108, 5112), (32, 639, 640), (256, 80, None)]
