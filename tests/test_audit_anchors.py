"""Anchors (contract 12.5): each writer's chain head kept in a JetStream stream of its own, which refuses
deletes; published by the real daemon every AUDIT_ANCHOR_INTERVAL and at a clean stop; `audit verify`
names a chain that ends before its anchor (truncated), one whose hashes no longer reach it (rewritten),
and refuses, with the public key, an anchor not signed with its private key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from audit_support import audit_command, fill, recent, stored
from helpers import make_files, publish_uploads, until, wait_ready, wait_settled
from nats.js.errors import APIError

from uploads_consumer.audit.anchors import Anchor, Signer, ensure_anchor_stream, keygen
from uploads_consumer.audit.record import ZERO_HASH, chained, record_hash
from uploads_consumer.audit.store import store_for
from uploads_consumer.embedded import clean_environment


async def anchors_in(url: str, stream: str = "AUDIT_ANCHORS") -> list[dict]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        if not info.state.messages:
            return []
        return [
            json.loads((await js.get_msg(stream, seq)).data)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await nc.close()


async def publish_anchor(settings, writer: str, seq: int, hash: str, signing_key: str | None = None) -> None:
    """An anchor as a daemon of `settings` publishes it (signed with `signing_key` when given)."""
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await ensure_anchor_stream(js, settings)
        anchor = Anchor(writer, settings.nats_consumer_name, seq, hash, 1769421017042)
        if signing_key is not None:
            anchor = Signer(signing_key).sign(anchor)
        await js.publish(f"audit.anchors.{settings.nats_consumer_name}", anchor.body())
    finally:
        await nc.close()


def lines(done: subprocess.CompletedProcess) -> list[str]:
    return done.stdout.splitlines()


# --- the stream -------------------------------------------------------------------------------------


async def test_setup_makes_an_anchor_stream_that_refuses_a_delete_and_a_purge(tmp_path, daemon_env, nats_server):
    env = clean_environment(**{**daemon_env, "AUDIT_URL": f"sqlite:///{tmp_path / 'audit.db'}"})
    setup = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "setup"], env=env, capture_output=True, text=True, timeout=60
    )
    assert setup.returncode == 0, setup.stderr
    [line] = [line for line in setup.stdout.splitlines() if "AUDIT_ANCHORS" in line]
    assert line.startswith("created stream AUDIT_ANCHORS (subject audit.anchors.>, deny delete, deny purge")
    assert line.endswith(
        "needs to publish to audit.anchors.file_processor (with its replies, _INBOX.>), and nothing more on this stream"
    )
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.publish("audit.anchors.file_processor", b"{}")
        with pytest.raises(APIError):
            await js.delete_msg("AUDIT_ANCHORS", 1)
        with pytest.raises(APIError):
            await js.purge_stream("AUDIT_ANCHORS")
        assert (await js.stream_info("AUDIT_ANCHORS")).state.messages == 1
    finally:
        await nc.close()


# --- published by the daemon ---------------------------------------------------------------------------


async def test_the_daemon_anchors_its_chain_every_interval(tmp_path, settings_for, start_daemon, nats_server):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    daemon = start_daemon(AUDIT_URL=url, AUDIT_ANCHOR_INTERVAL="1s")
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 3))
    await wait_settled(nats_server.url, 3, daemon=daemon)
    # While it runs: an anchor per interval in which the chain moved, the last one its head.
    [*_, head] = await stored(settings_for(AUDIT_URL=url))

    async def anchored() -> list[dict]:
        anchors = await anchors_in(nats_server.url)
        return anchors if anchors and anchors[-1]["seq"] == head["seq"] else []

    anchors = await until(anchored, 10, "the chain's head anchored", daemon)
    assert anchors[-1]["writer"] == head["writer"] and anchors[-1]["consumer"] == "file_processor"
    assert anchors[-1]["hash"] == head["hash"]
    assert len({a["seq"] for a in anchors}) == len(anchors), "an anchor only when the chain moved"
    assert daemon.metric("uploads_consumer_audit_anchors_total") == len(anchors)
    assert daemon.proc.poll() is None, "published while running, not at the stop"
    assert daemon.terminate() == 0


async def test_a_chain_cut_after_the_anchor_the_daemon_left_at_its_clean_stop_is_named_truncated(
    tmp_path, settings_for, start_daemon, nats_server, daemon_env
):
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    private, public = keygen()
    daemon = start_daemon(AUDIT_URL=url, AUDIT_ANCHOR_INTERVAL="1h", AUDIT_SIGNING_KEY=private)  # only the last
    await wait_ready(daemon, nats_server.url)
    await publish_uploads(settings_for(), make_files(tmp_path / "in", 4))
    await wait_settled(nats_server.url, 4, daemon=daemon)
    assert daemon.metric("uploads_consumer_audit_anchors_total") == 0
    assert daemon.terminate() == 0
    [anchor] = await anchors_in(nats_server.url)
    writer = anchor["writer"]
    assert anchor["seq"] == 4
    assert described_by_the_asyncapi_document(anchor) == [] and set(anchor) >= {"key", "signature"}
    env = {**daemon_env, "AUDIT_URL": url, "AUDIT_VERIFY_KEY": public}
    assert lines(audit_command(env, "verify"))[:2] == [
        "4 records in 1 chain verified",
        "anchors: 1 anchor read from AUDIT_ANCHORS (signatures checked with 1 key); 1 of 1 chain anchored; "
        "0 records stored after their chain's last anchor, which no anchor covers yet",
    ]

    with sqlite3.connect(db) as conn:  # the chain's last two records removed: no gap is left in it
        conn.execute("DELETE FROM audit_records WHERE seq > 2")
    assert audit_command(env, "verify", "--no-anchors").returncode == 0
    verified = audit_command(env, "verify")
    assert verified.returncode == 1
    at = anchor_time(anchor)
    assert lines(verified)[:2] == [
        f"truncated: writer {writer} seq 4: the chain ends at seq 2, before its anchor of seq 4 ({at}): "
        "records 3-4 removed",
        "1 of 1 chain broken (2 records read)",
    ]


def described_by_the_asyncapi_document(anchor: dict) -> list[str]:
    """What the AsyncAPI document (docs/asyncapi.yaml) finds wrong with a published anchor."""
    import jsonschema
    import yaml

    document = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml").read_text())
    root = {"$ref": "#/components/schemas/AuditAnchor", "components": document["components"]}
    schema = document["components"]["schemas"]["AuditAnchor"]
    unknown = [f"{name}: not in the document" for name in anchor if name not in schema["properties"]]
    return unknown + [e.message for e in jsonschema.Draft7Validator(root).iter_errors(anchor)]


def anchor_time(anchor: dict) -> str:
    from uploads_consumer.audit.store import utc

    return utc(anchor["at"])


# --- verify against anchors ----------------------------------------------------------------------------


async def rewrite_from(settings, writer: str, seq: int) -> None:
    """Change record `seq`'s size and recompute its hash and every later one: the chain still holds."""
    store = store_for(settings)
    await store.open()
    try:
        records = [r async for r in store.chains() if r["writer"] == writer]
        prev = records[seq - 2]["hash"] if seq > 1 else ZERO_HASH
        for record in records[seq - 1 :]:
            record["prev_hash"] = prev
            if record["seq"] == seq:
                record["size"] = 1
            record["hash"] = prev = record_hash(record)
            await store._execute(
                "UPDATE audit_records SET size = $1, prev_hash = $2, hash = $3 WHERE writer = $4 AND seq = $5",
                record["size"],
                record["prev_hash"],
                record["hash"],
                writer,
                record["seq"],
            )
    finally:
        await store.close()


async def test_every_hash_rewritten_from_a_record_on_is_named_rewritten(store_url, settings_for, daemon_env):
    settings = settings_for(AUDIT_URL=store_url)
    records = chained(recent(6, email="ana@example.com"), "w", 0, ZERO_HASH)
    await fill(store_url, records)
    await publish_anchor(settings, "w", 6, records[-1]["hash"])
    env = {**daemon_env, "AUDIT_URL": store_url}
    assert audit_command(env, "verify").returncode == 0

    await rewrite_from(settings, "w", 3)
    assert audit_command(env, "verify", "--no-anchors").returncode == 0, "the chain holds on its own"
    verified = audit_command(env, "verify")
    assert verified.returncode == 1
    assert lines(verified)[0] == (
        "rewritten: writer w seq 6: its hash is not the one anchored at 2026-01-26T09:50:17.042Z: "
        "the chain was rewritten up to this record"
    )


async def test_an_anchor_not_signed_with_the_key_is_refused(tmp_path, settings_for, daemon_env):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    settings = settings_for(AUDIT_URL=url)
    private, public = keygen()
    records = chained(recent(3), "w", 0, ZERO_HASH)
    await fill(url, records)
    await publish_anchor(settings, "w", 3, records[-1]["hash"], signing_key=private)
    # Whoever may publish to the subject claims the chain went on to seq 9, unsigned and with another key.
    await publish_anchor(settings, "w", 9, "f" * 64)
    await publish_anchor(settings, "w", 8, "e" * 64, signing_key=keygen()[0])
    env = {**daemon_env, "AUDIT_URL": url}

    with_key = audit_command(env, "verify", "--public-key", public)
    assert with_key.returncode == 1
    assert lines(with_key)[:3] == [
        "forged: writer w seq 9: anchor message 2 is refused: it is not signed",
        "forged: writer w seq 8: anchor message 3 is refused: its signature does not verify with the key given",
        "1 of 1 chain broken (3 records read)",
    ]
    assert "truncated" not in with_key.stdout, "a refused anchor counts for nothing"
    assert "signatures checked with 1 key" in with_key.stdout
    assert "truncated: writer w seq 9" in audit_command(env, "verify").stdout  # without the key, taken at its word
    from_env = audit_command({**env, "AUDIT_VERIFY_KEY": public}, "verify")
    assert from_env.stdout == with_key.stdout


async def test_a_signing_key_that_is_not_one_is_a_configuration_error(start_daemon, tmp_path):
    daemon = start_daemon(AUDIT_URL=f"sqlite:///{tmp_path / 'audit.db'}", AUDIT_SIGNING_KEY="bm90IGEga2V5")
    assert daemon.proc.wait(30) == 2
    assert "AUDIT_SIGNING_KEY: must decode to 32 bytes" in daemon.log_text()
    assert "bm90IGEga2V5" not in daemon.log_text()


def test_keygen_prints_a_pair_that_signs_and_verifies():
    done = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "audit", "keygen"],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    values = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert set(values) == {"AUDIT_SIGNING_KEY", "AUDIT_VERIFY_KEY"}
    from uploads_consumer.audit.anchors import signature_problem, verify_keys

    anchor = Signer(values["AUDIT_SIGNING_KEY"]).sign(Anchor("w", "c", 1, "0" * 64, 1))
    assert signature_problem(anchor, verify_keys([values["AUDIT_VERIFY_KEY"]], "AUDIT_VERIFY_KEY")) is None


TAMPERING = {
    "edited after the anchor": (
        "UPDATE audit_records SET size = 1 WHERE seq = 5",
        "broken: writer w seq 5: its content does not match its hash (edited)",
    ),
    "its last records removed": (
        "DELETE FROM audit_records WHERE seq >= 4",
        "truncated: writer w seq 4: the chain ends at seq 3, before its anchor of seq 4",
    ),
    "the anchored record removed": (
        "DELETE FROM audit_records WHERE seq = 4",
        "broken: writer w seq 4: record 4 of this chain, anchored, is missing (deleted)",
    ),
}


@pytest.mark.parametrize("tampering", TAMPERING, ids=list(TAMPERING))
async def test_an_incremental_verify_reads_each_chain_from_its_last_anchor_and_sees(
    tmp_path, settings_for, daemon_env, tampering
):
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    settings = settings_for(AUDIT_URL=url)
    records = chained(recent(6), "w", 0, ZERO_HASH)
    await fill(url, records, chained(recent(2), "unanchored", 0, ZERO_HASH))
    await publish_anchor(settings, "w", 4, records[3]["hash"])
    env = {**daemon_env, "AUDIT_URL": url}
    clean = audit_command(env, "verify", "--incremental")
    assert clean.returncode == 0
    assert lines(clean)[0] == "5 records in 2 chains verified", "w from seq 4, and the chain without an anchor whole"
    assert lines(clean)[-1].startswith("incremental: 3 records before their chain's last anchor not read again")

    statement, named = TAMPERING[tampering]
    with sqlite3.connect(db) as conn:
        conn.execute(statement)
    verified = audit_command(env, "verify", "--incremental")
    assert verified.returncode == 1 and lines(verified)[0].startswith(named)


async def test_an_incremental_verify_sees_a_rewrite_up_to_the_anchor_but_not_an_older_edit(
    tmp_path, settings_for, daemon_env
):
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    settings = settings_for(AUDIT_URL=url)
    records = chained(recent(6), "w", 0, ZERO_HASH)
    await fill(url, records)
    await publish_anchor(settings, "w", 4, records[3]["hash"])
    env = {**daemon_env, "AUDIT_URL": url}
    with sqlite3.connect(db) as conn:  # an old record's content changed, its hash left as it was
        conn.execute("UPDATE audit_records SET size = 1 WHERE seq = 2")
    assert audit_command(env, "verify", "--incremental").returncode == 0, "the records before the anchor are not read"
    assert (
        lines(audit_command(env, "verify"))[0] == "broken: writer w seq 2: its content does not match its hash (edited)"
    )
    await rewrite_from(settings, "w", 2)  # now with every hash recomputed from there on
    verified = audit_command(env, "verify", "--incremental")
    assert verified.returncode == 1 and lines(verified)[0].startswith("rewritten: writer w seq 4: its hash is not")
