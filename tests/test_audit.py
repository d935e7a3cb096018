"""The audit trail (AUDIT_URL): one record per settlement, hash-chained per writer, in SQLite or a real
PostgreSQL; `audit verify`, `report` and `tail`; nothing lost while the store is down or the spool full."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from audit_support import AUDITOR_GRANTS, WRITER_GRANTS, audit_command, fill, pg_execute, sample, stored
from helpers import TESTS, make_files, provision_now, publish_raw, publish_uploads, until, wait_ready, wait_settled

from uploads_consumer import audit_commands
from uploads_consumer.audit.chain import ChainCheck, content_problem
from uploads_consumer.audit.record import ZERO_HASH, canonical, chained, record_hash
from uploads_consumer.audit.store import SqliteStore
from uploads_consumer.embedded import clean_environment, free_port
from uploads_consumer.producer import event_json

# --- the record, its canonical form and the chain ----------------------------------------------


def test_the_canonical_form_and_the_hash_of_a_record_are_the_contracts_example():
    [record] = chained(
        sample(1, event_id="0ab35a7e-7a72-4e37-b34d-1045459d355f", email="ana@example.com", filename="résumé.pdf"),
        "h/7/1a2b3c4d",
        0,
        ZERO_HASH,
    )
    expected = (
        '{"bucket":null,"consumer":"file_processor","content_type":null,"deliveries":1,"duration_ms":null,'
        '"email":"ana@example.com","error_class":null,"event_id":"0ab35a7e-7a72-4e37-b34d-1045459d355f",'
        '"file_uuid":null,"filename":"résumé.pdf","format":1,"host":"h","outcome":"processed","pid":7,'
        '"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","processors":["save"],'
        '"reason":null,"recorded_at":1769421017042,"seq":1,"sha256":null,"size":100,"skipped":[],'
        '"stream":"FILE_UPLOADS","stream_seq":1,"writer":"h/7/1a2b3c4d"}'
    )
    assert canonical(record) == expected.encode("utf-8")
    assert record["hash"] == hashlib.sha256(expected.encode("utf-8")).hexdigest()
    assert record["hash"] in (Path(__file__).parents[1] / "docs" / "contract.md").read_text()


def test_a_format_2_records_canonical_form_commits_to_its_personal_fields_as_the_contracts_example_does():
    salt = "000102030405060708090a0b0c0d0e0f"
    [entry] = sample(1, event_id="0ab35a7e-7a72-4e37-b34d-1045459d355f", email="ana@example.com", filename="résumé.pdf")
    email = hashlib.sha256(bytes.fromhex(salt) + b"email\0" + b"ana@example.com").hexdigest()
    filename = hashlib.sha256(bytes.fromhex(salt) + b"filename\0" + "résumé.pdf".encode()).hexdigest()
    entry.update(format=2, salt=salt, email_commitment=email, filename_commitment=filename, reason_commitment=None)
    [record] = chained([entry], "h/7/1a2b3c4d", 0, ZERO_HASH)
    expected = (
        '{"bucket":null,"consumer":"file_processor","content_type":null,"deliveries":1,"duration_ms":null,'
        f'"email_commitment":"{email}","error_class":null,"event_id":"0ab35a7e-7a72-4e37-b34d-1045459d355f",'
        f'"file_uuid":null,"filename_commitment":"{filename}","format":2,"host":"h","outcome":"processed","pid":7,'
        '"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","processors":["save"],'
        '"reason_commitment":null,"recorded_at":1769421017042,"seq":1,"sha256":null,"size":100,"skipped":[],'
        '"stream":"FILE_UPLOADS","stream_seq":1,"writer":"h/7/1a2b3c4d"}'
    )
    assert canonical(record) == expected.encode("utf-8")
    assert record["hash"] == hashlib.sha256(expected.encode("utf-8")).hexdigest()
    contract = (Path(__file__).parents[1] / "docs" / "contract.md").read_text()
    assert email in contract and filename in contract and record["hash"] in contract
    assert content_problem({**record, "erasure_id": None}, set()) is None


def test_each_record_carries_the_hash_of_the_one_before_it():
    records = chained(sample(3), "w", 0, ZERO_HASH)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert [r["prev_hash"] for r in records] == [ZERO_HASH, records[0]["hash"], records[1]["hash"]]
    assert all(r["hash"] == record_hash(r) for r in records)


async def test_verify_names_the_first_record_edited_deleted_or_reordered(tmp_path, settings_for, capsys):
    db = tmp_path / "audit.db"
    store = SqliteStore(db)
    await store.open()
    await store.append(chained(sample(6), "replica-a", 0, ZERO_HASH) + chained(sample(3), "replica-b", 0, ZERO_HASH))
    await store.close()
    settings = settings_for(AUDIT_URL=f"sqlite:///{db}")

    async def verify() -> tuple[int, str]:
        code = await audit_commands.audit_verify(settings, use_anchors=False)
        return code, capsys.readouterr().out

    code, out = await verify()
    assert (code, out.splitlines()[0]) == (0, "9 records in 2 chains verified")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_records SET size = 1 WHERE writer = 'replica-a' AND seq = 3")
    code, out = await verify()
    assert code == 1
    assert out.splitlines()[0] == "broken: writer replica-a seq 3: its content does not match its hash (edited)"
    assert "1 of 2 chains broken" in out

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_records SET size = 300 WHERE writer = 'replica-a' AND seq = 3")
        conn.execute("DELETE FROM audit_records WHERE writer = 'replica-a' AND seq = 4")
    code, out = await verify()
    assert (code, out.splitlines()[0]) == (
        1,
        "broken: writer replica-a seq 5: record 4 of this chain missing before it (deleted)",
    )

    # Two records swapped, each given a hash that matches its new content: the links give them away.
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["seq"]: dict(r) for r in conn.execute("SELECT * FROM audit_records WHERE writer = 'replica-b'")}
        for seq, other in ((1, 2), (2, 1)):
            moved = {**rows[seq], **{k: rows[other][k] for k in ("stream_seq", "recorded_at", "size")}}
            moved.update(processors=json.loads(moved["processors"]), skipped=json.loads(moved["skipped"]))
            conn.execute(
                "UPDATE audit_records SET stream_seq = ?, recorded_at = ?, size = ?, hash = ? "
                "WHERE writer = 'replica-b' AND seq = ?",
                (moved["stream_seq"], moved["recorded_at"], moved["size"], record_hash(moved), seq),
            )
    code, out = await verify()
    assert code == 1
    assert (
        "broken: writer replica-b seq 2: its prev_hash is not the hash of the record before it (reordered or rewritten)"
        in out.splitlines()
    )
    assert "2 of 2 chains broken" in out


def test_a_chain_that_does_not_start_at_one_is_broken():
    check = ChainCheck()
    for record in chained(sample(3), "w", 0, ZERO_HASH)[1:]:
        check.add(record)
    assert check.breaks[0].seq == 2 and "record 1 of this chain missing" in check.breaks[0].problem


async def test_verify_names_a_record_whose_list_column_is_not_json_and_checks_every_other_chain(tmp_path, daemon_env):
    db = tmp_path / "audit.db"
    a, b, c = (chained(sample(3), writer, 0, ZERO_HASH) for writer in ("replica-a", "replica-b", "replica-c"))
    await fill(f"sqlite:///{db}", a, b, c)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_records SET processors = 'not json' WHERE writer = 'replica-a' AND seq = 2")
        conn.execute("UPDATE audit_records SET size = 1 WHERE writer = 'replica-c' AND seq = 3")
    verified = audit_command({**daemon_env, "AUDIT_URL": f"sqlite:///{db}"}, "verify", "--no-anchors")
    assert verified.returncode == 1, verified.stderr
    assert verified.stdout.splitlines()[:3] == [
        "broken: writer replica-a seq 2: its processors column is not a JSON array of strings (edited)",
        "broken: writer replica-c seq 3: its content does not match its hash (edited)",
        "2 of 3 chains broken (9 records read)",
    ]


async def test_audit_tail_shows_a_record_whose_list_column_is_not_json(tmp_path, daemon_env):
    db = tmp_path / "audit.db"
    await fill(f"sqlite:///{db}", chained(sample(3), "w", 0, ZERO_HASH))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_records SET skipped = '[\"unclosed' WHERE seq = 2")
    tail = subprocess.Popen(
        [sys.executable, "-m", "uploads_consumer", "audit", "tail", "-n", "3", "--json"],
        env=clean_environment(**{**daemon_env, "AUDIT_URL": f"sqlite:///{db}"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        shown = [json.loads(await asyncio.to_thread(tail.stdout.readline) or "null") for _ in range(3)]
        assert [r and r["seq"] for r in shown] == [1, 2, 3], tail.stderr and tail.stderr.read()
        assert shown[1]["skipped"] == '["unclosed'  # as stored, for a person to see
    finally:
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(10) == 0


def test_an_audit_url_of_another_kind_is_a_configuration_error_that_does_not_echo_it(settings_for):
    from uploads_consumer.config import load_settings
    from uploads_consumer.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_settings(audit_url="mysql://root:hunter2@db/audit")
    assert refused.value.variable == "AUDIT_URL" and "hunter2" not in refused.value.reason


# --- through the daemon, on SQLite ------------------------------------------------------------


async def test_every_settlement_is_recorded_on_sqlite_and_the_report_adds_up(
    tmp_path, settings_for, start_daemon, nats_server, s3_client, bucket, daemon_env
):
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    settings = settings_for()
    daemon = start_daemon(
        AUDIT_URL=url, PROCESSORS="save,uc_test_plugins:flaky_once", PYTHONPATH=TESTS, UC_TEST_STATE_DIR=str(tmp_path)
    )
    await wait_ready(daemon, nats_server.url)
    files = make_files(tmp_path / "in", 3, size=3000)
    events = await publish_uploads(settings, files)
    await wait_settled(nats_server.url, 3, daemon=daemon)
    forbidden = events[0].model_copy(update={"bucket_name": "not-" + bucket})
    await publish_raw(nats_server.url, "file.uploads", [event_json(events[0]), b"not json", event_json(forbidden)])
    await wait_settled(nats_server.url, 6, daemon=daemon)
    assert daemon.metric("uploads_consumer_audit_records_total") == 9
    assert daemon.terminate() == 0

    records = await stored(settings_for(AUDIT_URL=url))
    assert Counter(r["outcome"] for r in records) == {"processed": 3, "retried": 3, "duplicate": 1, "dead_lettered": 2}
    assert {r["writer"] for r in records} == {records[0]["writer"]}
    assert records[0]["writer"].startswith(f"{records[0]['host']}/{daemon.proc.pid}/")
    by_event = {r["event_id"]: r for r in records if r["outcome"] == "processed"}
    for event, path in zip(events, files, strict=True):
        record = by_event[event.event_id]
        assert (record["file_uuid"], record["email"], record["bucket"]) == (event.file_uuid, event.email, bucket)
        assert (record["filename"], record["size"]) == (path.name, 3000)
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["content_type"] == "application/octet-stream"
        assert record["processors"] == ["save", "flaky_once"] and record["skipped"] == []
        assert record["deliveries"] == 2 and record["consumer"] == "file_processor" and record["duration_ms"] >= 0
    retried = [r for r in records if r["outcome"] == "retried"]
    assert {r["reason"] for r in retried} == {"flaky_once: not this time"}
    # A retry after the chain had begun says how far it got: the file was fetched and saved.
    sizes = {hashlib.sha256(path.read_bytes()).hexdigest(): path.stat().st_size for path in files}
    assert {r["sha256"]: r["size"] for r in retried} == sizes
    assert all((r["processors"], r["skipped"]) == (["save"], []) for r in retried)
    dead = {r["error_class"]: r for r in records if r["outcome"] == "dead_lettered"}
    assert dead["invalid_message"]["event_id"] is None and "not JSON" in dead["invalid_message"]["reason"]
    assert dead["forbidden"]["event_id"] == events[0].event_id and dead["forbidden"]["bucket"] == "not-" + bucket

    env = {**daemon_env, "AUDIT_URL": url}
    verified = audit_command(env, "verify")
    assert (verified.returncode, verified.stdout.splitlines()[0]) == (0, "9 records in 1 chain verified")
    report = json.loads(audit_command(env, "report", "--by", "outcome", "--json").stdout)
    assert report["total"] == {
        "records": 9,
        "uploads": 3,
        "bytes": 9000,
        "failures": 2,
        "retries": 3,
        "duplicates": 1,
    }
    assert [g["group"] for g in report["groups"]] == ["dead_lettered", "duplicate", "processed", "retried"]
    table = audit_command(env, "report").stdout.splitlines()
    assert table[1].split() == ["DAY", "RECORDS", "UPLOADS", "BYTES", "FAILURES", "RETRIES", "DUPLICATES"]
    assert table[-1].split() == ["total", "9", "3", "9,000", "2", "3", "1"]

    def groups(*args: str) -> dict[str, list[int]]:
        report = json.loads(audit_command(env, "report", "--json", *args).stdout)
        return {
            g["group"]: [g[k] for k in ("records", "uploads", "bytes", "failures", "retries")] for g in report["groups"]
        }

    # By user: the body that was not JSON has no uploader; the forged event names the real one.
    assert groups("--by", "user") == {"(none)": [1, 0, 0, 1, 0], "user@example.com": [8, 3, 9000, 1, 3]}
    # By type: what was sniffed, for the retried deliveries too (fetched before flaky_once failed).
    assert groups("--by", "type") == {"(unknown)": [3, 0, 0, 2, 0], "application/octet-stream": [6, 3, 9000, 0, 3]}
    with sqlite3.connect(db) as conn:  # someone makes an upload look smaller than it was
        [(seq,)] = conn.execute("SELECT seq FROM audit_records WHERE outcome = 'processed' ORDER BY seq LIMIT 1")
        conn.execute("UPDATE audit_records SET size = 10 WHERE seq = ?", (seq,))
    broken = audit_command(env, "verify")
    assert broken.returncode == 1
    assert broken.stdout.startswith(f"broken: writer {records[0]['writer']} seq {seq}: its content does not match")


async def test_a_locked_sqlite_store_holds_the_settlements_and_loses_nothing(
    tmp_path, settings_for, start_daemon, nats_server, daemon_env
):
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    daemon = start_daemon(AUDIT_URL=url)
    await wait_ready(daemon, nats_server.url)
    # Another process holds the write lock (a backup, a long report): past the store's 10 s busy
    # timeout each write fails, and the settlements wait with their records.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 2))
        await until(lambda: daemon.metric("uploads_consumer_audit_flush_errors_total"), 30, "a failed write", daemon)
        assert daemon.metric("uploads_consumer_messages_total", 'outcome="acked"') == 0, "acked without its record"
        assert "audit records cannot be written; the settlements wait" in daemon.log_text()
    finally:
        blocker.rollback()
        blocker.close()
    await wait_settled(nats_server.url, 2, daemon=daemon)
    assert daemon.terminate() == 0
    records = await stored(settings_for(AUDIT_URL=url))
    assert sorted(r["event_id"] for r in records) == sorted(e.event_id for e in events)
    assert {r["outcome"] for r in records} == {"processed"}
    verified = audit_command({**daemon_env, "AUDIT_URL": url}, "verify")
    assert (verified.returncode, verified.stdout.splitlines()[0]) == (0, "2 records in 1 chain verified")


async def test_a_dead_letter_after_some_steps_records_what_was_known_of_the_upload(
    tmp_path, settings_for, start_daemon, nats_server
):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    daemon = start_daemon(AUDIT_URL=url, PROCESSORS="save,uc_test_plugins:reject", PYTHONPATH=TESTS)
    await wait_ready(daemon, nats_server.url)
    [path] = make_files(tmp_path / "in", 1, size=2000)
    [event] = await publish_uploads(settings_for(), [path])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    assert daemon.terminate() == 0
    [record] = await stored(settings_for(AUDIT_URL=url))
    assert (record["outcome"], record["error_class"]) == ("dead_lettered", "processor_failed")
    assert (record["event_id"], record["filename"], record["size"]) == (event.event_id, path.name, 2000)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (record["content_type"], record["processors"], record["skipped"]) == (
        "application/octet-stream",
        ["save"],
        [],
    )


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_audit_tail_prints_the_last_records_then_follows_new_ones_until_stopped(tmp_path, daemon_env, stop):
    db = tmp_path / "audit.db"
    store = SqliteStore(db)
    await store.open()
    first = chained(sample(3), "w", 0, ZERO_HASH)
    await store.append(first)
    tail = subprocess.Popen(
        [sys.executable, "-m", "uploads_consumer", "audit", "tail", "-n", "2", "--json"],
        env=clean_environment(**{**daemon_env, "AUDIT_URL": f"sqlite:///{db}"}),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        shown = [json.loads(await asyncio.to_thread(tail.stdout.readline)) for _ in range(2)]
        assert [r["seq"] for r in shown] == [2, 3] and {k: shown[1][k] for k in first[2]} == first[2]
        [newer] = chained(sample(1, email="late@example.com"), "w", 3, first[-1]["hash"])
        await store.append([newer])
        assert json.loads(await asyncio.to_thread(tail.stdout.readline))["email"] == "late@example.com"
    finally:
        tail.send_signal(stop)  # also when started as a background job, with SIGINT ignored
        assert tail.wait(10) == 0
        await store.close()


# --- through the daemon, on PostgreSQL ----------------------------------------------------------


async def test_three_replicas_write_to_one_postgresql_as_an_append_only_role_and_every_chain_verifies(
    tmp_path, settings_for, start_daemon, nats_server, postgres, audit_db
):
    admin = postgres.url(database=audit_db)
    assert await audit_commands.audit_migrate(settings_for(AUDIT_URL=admin)) == 0
    await pg_execute(admin, *WRITER_GRANTS)
    writer_url = postgres.url("uploads_writer", audit_db, password="writer-secret-6d1f")
    await provision_now(settings_for())
    slow = {"PROCESSORS": "uc_test_plugins:slow,save", "PYTHONPATH": TESTS, "UC_TEST_SLOW_SECONDS": "0.2"}
    replicas = [
        start_daemon(f"replica-{i}.log", HTTP_PORT=str(free_port()), AUDIT_URL=writer_url, MAX_IN_FLIGHT="2", **slow)
        for i in range(3)
    ]
    for replica in replicas:
        await wait_ready(replica)
    files = make_files(tmp_path / "in", 30, size=1000)
    events = await publish_uploads(settings_for(), files)
    await wait_settled(nats_server.url, 30, daemon=replicas[0])
    await until(lambda: sum(r.metric("uploads_consumer_audit_spool_depth") for r in replicas) == 0, 20, "spools empty")
    for replica in replicas:
        assert replica.terminate() == 0
        assert "writer-secret-6d1f" not in replica.log_text()

    await pg_execute(admin, *AUDITOR_GRANTS)
    auditor_url = postgres.url("uploads_auditor", audit_db, password="auditor-secret-2b7c")
    settings = settings_for(AUDIT_URL=auditor_url)
    records = await stored(settings)
    assert sorted(r["event_id"] for r in records if r["outcome"] == "processed") == sorted(e.event_id for e in events)
    assert len({r["writer"] for r in records}) == 3, "each replica wrote a chain of its own"
    assert {r["pid"] for r in records} == {r.proc.pid for r in replicas}
    assert await audit_commands.audit_verify(settings) == 0
    report = await asyncio.to_thread(audit_command, {"AUDIT_URL": auditor_url}, "report", "--json")
    assert json.loads(report.stdout)["total"]["uploads"] == 30 and json.loads(report.stdout)["total"]["bytes"] == 30_000

    conn = await asyncpg.connect(writer_url)
    try:  # the daemons' role can only add records
        for statement in ("UPDATE audit_records SET size = 0", "DELETE FROM audit_records", "TRUNCATE audit_records"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
    assert not list((tmp_path / "downloads" / ".audit-spool").glob("*.db")), "every spool emptied and removed"


async def test_postgresql_stopped_mid_run_loses_no_upload_and_no_record(
    tmp_path, settings_for, start_daemon, nats_server, postgres, audit_db
):
    url = postgres.url(database=audit_db)
    settings = settings_for()
    await provision_now(settings)
    daemon = start_daemon(
        AUDIT_URL=url,
        PROCESSORS="uc_test_plugins:slow,save",
        PYTHONPATH=TESTS,
        UC_TEST_SLOW_SECONDS="0.1",
        MAX_IN_FLIGHT="1",  # about 10 uploads a second: the store is stopped while they flow
    )
    await wait_ready(daemon)
    events = await publish_uploads(settings, make_files(tmp_path / "in", 40, size=500))
    acked = lambda: daemon.metric("uploads_consumer_messages_total", 'outcome="acked"')  # noqa: E731
    await until(lambda: acked() >= 8, 30, "8 uploads acked", daemon)
    postgres.stop()
    try:
        at_stop = acked()
        await until(lambda: acked() >= at_stop + 8, 30, "8 more uploads acked with the store down", daemon)
        assert daemon.metric("uploads_consumer_audit_spool_depth") > 0
        assert daemon.metric("uploads_consumer_audit_flush_errors_total") > 0
    finally:
        postgres.start()
    await wait_settled(nats_server.url, 40, daemon=daemon)
    await until(lambda: daemon.metric("uploads_consumer_audit_spool_depth") == 0, 20, "the spool emptied", daemon)
    assert daemon.terminate() == 0
    log = daemon.log_text()
    assert "audit store unavailable; records wait in the spool" in log and "audit store available again" in log

    records = await stored(settings_for(AUDIT_URL=url))
    assert Counter(r["event_id"] for r in records) == {e.event_id: 1 for e in events}, "each upload exactly once"
    assert {r["outcome"] for r in records} == {"processed"}
    assert await audit_commands.audit_verify(settings_for(AUDIT_URL=url)) == 0


async def test_a_full_spool_holds_settlements_and_a_killed_writers_spool_is_taken_over_at_the_next_start(
    tmp_path, settings_for, start_daemon, nats_server, postgres, audit_db, downloads
):
    url = postgres.url(database=audit_db)
    settings = settings_for()
    assert await audit_commands.audit_migrate(settings_for(AUDIT_URL=url)) == 0
    await provision_now(settings_for(ACK_WAIT="3s"))
    events = await publish_uploads(settings, make_files(tmp_path / "in", 8, size=700))
    postgres.stop()
    try:
        first = start_daemon(AUDIT_URL=url, AUDIT_SPOOL_MAX="3", MAX_IN_FLIGHT="2", FETCH_BATCH="2")
        first.wait_http()
        await until(lambda: first.metric("uploads_consumer_audit_spool_depth") >= 3, 30, "a full spool", first)
        await asyncio.sleep(2)  # long enough for more to go, were anything let through
        assert first.metric("uploads_consumer_messages_total", 'outcome="acked"') == 2
        assert first.metric("uploads_consumer_messages_total", 'outcome="nacked"') == 0
        assert first.metric("uploads_consumer_audit_spool_depth") <= 3 + 2, "AUDIT_SPOOL_MAX + MAX_IN_FLIGHT at most"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        postgres.start()
    second = start_daemon("second.log", AUDIT_URL=url)
    await wait_settled(nats_server.url, 8, daemon=second, timeout=60)
    await until(lambda: second.metric("uploads_consumer_audit_spool_depth") == 0, 20, "the spools emptied", second)
    assert second.terminate() == 0
    assert "taking over the audit spool of a process that stopped" in second.log_text()

    records = await stored(settings_for(AUDIT_URL=url))
    processed = Counter(r["event_id"] for r in records if r["outcome"] == "processed")
    assert processed == {e.event_id: 1 for e in events}, "every upload recorded as processed, once"
    # The two held when the first was killed had their records already: redelivered, they are duplicates.
    assert Counter(r["outcome"] for r in records) == {"processed": 8, "duplicate": 2}
    assert {r["pid"] for r in records if r["outcome"] == "processed"} >= {first.proc.pid}
    assert await audit_commands.audit_verify(settings_for(AUDIT_URL=url)) == 0
    assert not list((downloads / ".audit-spool").glob("*.db"))


def test_the_default_spool_folders_of_two_consumers_are_apart(settings_for):
    a, b = (settings_for(NATS_CONSUMER_NAME=name).audit_spool_path for name in ("cons_a", "cons_b"))
    assert a != b and a.parent == b.parent


async def test_a_killed_consumers_spool_goes_only_to_a_process_writing_to_its_store(
    tmp_path, settings_for, start_daemon, nats_server, postgres, audit_db
):
    # cons_a writes to a database that does not exist yet (its store is down); cons_b to a healthy one.
    # Both keep their spools in one folder, the worst case (by default each consumer has its own).
    store_a, store_b = postgres.url(database=f"audit_{uuid.uuid4().hex[:10]}"), postgres.url(database=audit_db)
    shared = {"AUDIT_SPOOL_DIR": str(tmp_path / "spools")}
    await provision_now(settings_for(NATS_CONSUMER_NAME="cons_a"))
    await provision_now(settings_for(NATS_CONSUMER_NAME="cons_b"))
    events = await publish_uploads(settings_for(), make_files(tmp_path / "in", 3, size=600))
    first = start_daemon("a.log", NATS_CONSUMER_NAME="cons_a", AUDIT_URL=store_a, **shared)
    first.wait_http()
    await until(lambda: first.metric("uploads_consumer_audit_spool_depth") == 3, 30, "3 records spooled", first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    other = start_daemon("b.log", NATS_CONSUMER_NAME="cons_b", AUDIT_URL=store_b, HTTP_PORT=str(free_port()), **shared)
    other.wait_http()
    await wait_settled(nats_server.url, 3, consumer="cons_b", daemon=other)
    await until(lambda: other.metric("uploads_consumer_audit_spool_depth") == 0, 20, "cons_b's spool emptied", other)
    looked = ("audit spool of a process that wrote to another store", "taking over the audit spool")
    await until(lambda: any(said in other.log_text() for said in looked), 40, "a look at the spool", other)
    assert other.terminate() == 0
    assert "taking over" not in other.log_text()
    assert {r["consumer"] for r in await stored(settings_for(AUDIT_URL=store_b))} == {"cons_b"}

    await pg_execute(postgres.url(), f"CREATE DATABASE {store_a.rsplit('/', 1)[1]}")  # cons_a's store is back
    again = start_daemon("a2.log", NATS_CONSUMER_NAME="cons_a", AUDIT_URL=store_a, HTTP_PORT=str(free_port()), **shared)
    again.wait_http()
    await until(lambda: "taking over the audit spool" in again.log_text(), 40, "the spool taken over", again)
    await until(lambda: again.metric("uploads_consumer_audit_spool_depth") == 0, 20, "moved to its store", again)
    assert again.terminate() == 0
    records = await stored(settings_for(AUDIT_URL=store_a))
    assert sorted(r["event_id"] for r in records if r["pid"] == first.proc.pid) == sorted(e.event_id for e in events)
