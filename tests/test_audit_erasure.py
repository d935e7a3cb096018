"""Erasure and retention (contract 12.6): `audit forget` removes a person's personal fields and every
chain still verifies (format 2 commits to them with a salt), while any other edit still fails; `audit
prune` removes whole chain prefixes older than AUDIT_RETENTION, leaving markers verify starts from,
and a deletion elsewhere still fails; a store of format 1 records keeps verifying after the upgrade.
On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json

import asyncpg
from audit_support import audit_command, fill, recent, sample, stored
from test_audit_anchors import publish_anchor

from uploads_consumer.audit.record import PERSONAL, ZERO_HASH, chained
from uploads_consumer.audit.schema import POSTGRES, SQLITE, migrations
from uploads_consumer.audit.store import store_at

ANA, BEN = "ana@example.com", "ben@example.com"


async def execute(url: str, sql: str, *args) -> None:
    """A change made behind the trail's back, straight in the database."""
    if url.startswith("sqlite:"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql.replace("$1", "?").replace("$2", "?"), args)
    else:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()


def verify(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    done = audit_command(env, "verify", "--no-anchors", *args)
    return done.returncode, done.stdout.splitlines()


# --- forget --------------------------------------------------------------------------------------------


async def test_forget_then_verify_passes_and_an_edit_after_the_forget_still_fails(store_url, settings_for, daemon_env):
    settings = settings_for(AUDIT_URL=store_url)
    entries = recent(3, email=ANA, filename="ana-passport.pdf", reason="ana-passport.pdf: not a PDF")
    entries[1].update(file_uuid="5b0c1a52-5d8e-4a9b-9a3e-0c1c2f7e8d10")
    await fill(store_url, chained(entries + recent(2, email=BEN, filename="ben.txt"), "w", 0, ZERO_HASH))
    env = {**daemon_env, "AUDIT_URL": store_url}

    forgot = audit_command(env, "forget", "--email", ANA, "--note", "request 2026-114")
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout.startswith("forgot the email, file name and reason of 3 records (erasure 1)")
    records = await stored(settings)
    assert [{k: r[k] for k in PERSONAL} for r in records[:3]] == [dict.fromkeys(PERSONAL)] * 3
    assert all(r["salt"] is None and r["email_commitment"] for r in records[:3])
    assert (records[3]["email"], records[3]["filename"]) == (BEN, "ben.txt")
    code, out = verify(env)
    assert (code, out[0]) == (0, "5 records in 1 chain verified")
    assert audit_command(env, "show", ANA).returncode == 1, "nothing of her is left to find"
    by_user = audit_command(env, "report", "--by", "user", "--json").stdout
    assert ANA not in by_user and {g["group"] for g in json.loads(by_user)["groups"]} == {"(forgotten)", BEN}
    erasures = audit_command(env, "erasures", "--json").stdout.splitlines()
    [erasure] = [json.loads(line) for line in erasures]
    assert (erasure["what"], erasure["records"], erasure["note"]) == ("email", 3, "request 2026-114")
    assert "@" in erasure["erased_by"] and ANA not in erasures[0]
    again = audit_command(env, "forget", "--email", ANA)
    assert again.returncode == 1 and "no record in the store has this email" in again.stderr

    await execute(store_url, "UPDATE audit_records SET size = 1 WHERE seq = 2")  # a forgotten record edited
    code, out = verify(env)
    assert (code, out[0]) == (1, "broken: writer w seq 2: its content does not match its hash (edited)")
    await execute(store_url, "UPDATE audit_records SET size = 200 WHERE seq = 2")
    assert verify(env)[0] == 0
    await execute(store_url, "UPDATE audit_records SET email = $1 WHERE seq = 4", "mallory@example.com")
    assert verify(env)[1][0] == "broken: writer w seq 4: its email does not match its commitment (edited)"


async def test_personal_fields_removed_outside_forget_break_the_chain(store_url, settings_for, daemon_env):
    await fill(store_url, chained(recent(2, email=BEN), "w", 0, ZERO_HASH))
    await execute(store_url, "UPDATE audit_records SET email = NULL, salt = NULL WHERE seq = 2")
    code, out = verify({**daemon_env, "AUDIT_URL": store_url})
    assert (code, out[0]) == (
        1,
        "broken: writer w seq 2: its personal fields were removed outside `audit forget` (edited)",
    )


async def test_forget_by_file_uuid_keeps_the_persons_other_uploads(store_url, settings_for, daemon_env):
    settings = settings_for(AUDIT_URL=store_url)
    one, other = "5b0c1a52-5d8e-4a9b-9a3e-0c1c2f7e8d10", "0ab35a7e-7a72-4e37-b34d-1045459d355f"
    await fill(
        store_url,
        chained(recent(2, email=ANA, file_uuid=one) + recent(1, email=ANA, file_uuid=other), "w", 0, ZERO_HASH),
    )
    env = {**daemon_env, "AUDIT_URL": store_url}
    assert audit_command(env, "forget", "--file-uuid", one).returncode == 0
    assert [r["email"] for r in await stored(settings)] == [None, None, ANA]
    assert verify(env)[0] == 0
    [erasure] = [json.loads(line) for line in audit_command(env, "erasures", "--json").stdout.splitlines()]
    assert erasure["what"] == f"file_uuid {one}"


# --- retention -----------------------------------------------------------------------------------------


async def test_retention_then_verify_passes_and_a_deletion_in_the_middle_still_fails(
    store_url, settings_for, daemon_env
):
    settings = settings_for(AUDIT_URL=store_url)
    w = chained(recent(5, days_ago=40) + recent(3, days_ago=1), "w", 0, ZERO_HASH)
    v = chained(recent(2, days_ago=40), "v", 0, ZERO_HASH)  # every record old: the whole chain goes
    await fill(store_url, w, v)
    await publish_anchor(settings, "w", 8, w[-1]["hash"])
    await publish_anchor(settings, "v", 2, v[-1]["hash"])
    env = {**daemon_env, "AUDIT_URL": store_url, "AUDIT_RETENTION": "30d"}

    dry = audit_command(env, "prune", "--dry-run")
    assert (dry.returncode, dry.stdout.split(" older")[0]) == (0, "would remove 7 records")
    pruned = audit_command(env, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("removed 7 records older than ") and pruned.stdout.rstrip().endswith(
        "from 2 chains"
    )
    assert [(r["writer"], r["seq"]) for r in await stored(settings)] == [("w", 6), ("w", 7), ("w", 8)]
    verified = audit_command(env, "verify")  # the anchors of both chains too: retention is no tampering
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.startswith("3 records in 1 chain verified\nanchors: 2 anchors read")
    assert "; 2 of 2 chains anchored; 0 records stored after" in verified.stdout
    [erasure] = [json.loads(line) for line in audit_command(env, "erasures", "--json").stdout.splitlines()]
    assert erasure["records"] == 7 and erasure["what"].startswith("retention: records before ")
    report = json.loads(audit_command(env, "report", "--since", "60d", "--json").stdout)
    assert report["total"]["records"] == 3, "the daily figures of the days removed went with them"

    await execute(store_url, "DELETE FROM audit_records WHERE writer = 'w' AND seq = 7")
    code, out = verify(env)
    assert (code, out[0]) == (1, "broken: writer w seq 8: record 7 of this chain missing before it (deleted)")


async def test_a_deletion_at_the_start_of_a_chain_without_retention_is_tampering(store_url, settings_for, daemon_env):
    await fill(store_url, chained(recent(3, days_ago=40), "w", 0, ZERO_HASH))
    await execute(store_url, "DELETE FROM audit_records WHERE seq = 1")
    code, out = verify({**daemon_env, "AUDIT_URL": store_url})
    assert (code, out[0]) == (1, "broken: writer w seq 2: record 1 of this chain missing before it (deleted)")


async def test_prune_keeps_a_chain_from_its_first_record_that_does_not_verify(store_url, settings_for, daemon_env):
    settings = settings_for(AUDIT_URL=store_url)
    await fill(store_url, chained(recent(5, days_ago=40), "w", 0, ZERO_HASH))
    await execute(store_url, "UPDATE audit_records SET size = 1 WHERE seq = 3")
    pruned = audit_command({**daemon_env, "AUDIT_URL": store_url, "AUDIT_RETENTION": "30d"}, "prune")
    assert pruned.returncode == 1
    assert pruned.stdout.splitlines()[1] == (
        "kept: writer w from seq 3: its content does not match its hash (edited); `audit verify` says more"
    )
    assert [r["seq"] for r in await stored(settings)] == [3, 4, 5], "the edit is still there to be found"


def test_prune_without_a_retention_is_a_configuration_error(daemon_env, tmp_path):
    done = audit_command({**daemon_env, "AUDIT_URL": f"sqlite:///{tmp_path / 'a.db'}"}, "prune")
    assert done.returncode == 2 and "AUDIT_RETENTION: not set" in done.stderr


# --- the upgrade ---------------------------------------------------------------------------------------


async def a_version_1_store(url: str, records: list[dict]) -> None:
    """The tables an uploads-consumer before schema 2 made, holding its (format 1) records."""
    columns = [c for c in records[0] if c != "hash"] + ["hash"]
    statements = [
        *migrations(SQLITE if url.startswith("sqlite:") else POSTGRES)[1],
        "UPDATE audit_schema SET version = 1",
    ]
    if url.startswith("sqlite:"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            for statement in statements:
                conn.execute(statement)
            for r in records:
                values = [json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in columns]
                conn.execute(
                    f"INSERT INTO audit_records ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values
                )
        return
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        for r in records:
            values = [json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in columns]
            await conn.execute(f"INSERT INTO audit_records ({', '.join(columns)}) VALUES ({marks})", *values)
    finally:
        await conn.close()


async def test_an_old_format_store_keeps_verifying_after_the_upgrade(store_url, daemon_env):
    old = chained(sample(3, email=ANA, filename="a.pdf") + sample(1, email=BEN), "old/1/aaaa", 0, ZERO_HASH)
    await a_version_1_store(store_url, old)
    env = {**daemon_env, "AUDIT_URL": store_url}
    migrated = audit_command(env, "migrate")
    assert (migrated.returncode, migrated.stdout) == (0, "audit schema at version 2\n")
    await fill(store_url, chained(recent(2, email=ANA), "new/2/bbbb", 0, ZERO_HASH))
    code, out = verify(env)
    assert (code, out[0]) == (0, "6 records in 2 chains verified")
    report = json.loads(audit_command(env, "report", "--since", "400d", "--by", "user", "--json").stdout)
    assert {g["group"]: g["records"] for g in report["groups"]} == {ANA: 5, BEN: 1}, "the old records counted"

    assert audit_command(env, "forget", "--email", ANA).returncode == 0
    code, out = verify(env)
    assert code == 0 and out[0] == "6 records in 2 chains verified"
    assert out[1] == (
        "forgotten: 3 format 1 records had personal fields forgotten: their place in their chain is checked, "
        "their content no longer can be"
    )
    await execute(store_url, "UPDATE audit_records SET size = 1 WHERE writer = 'old/1/aaaa' AND seq = 4")
    assert verify(env)[1][0] == "broken: writer old/1/aaaa seq 4: its content does not match its hash (edited)"


async def test_the_daily_figures_count_a_batch_sent_twice_once(store_url, daemon_env):
    records = chained(recent(4, email=ANA), "w", 0, ZERO_HASH)  # of 100, 200, 300 and 400 bytes
    await fill(store_url, records, records)  # the batch sent again after a lost answer
    report = json.loads(audit_command({**daemon_env, "AUDIT_URL": store_url}, "report", "--json").stdout)
    assert (report["total"]["records"], report["total"]["bytes"]) == (4, 1000)
    store = store_at(store_url)
    await store.open()
    try:
        assert len([r async for r in store.chains()]) == 4
    finally:
        await store.close()
