"""The audit store's tables, in each backend's types, and the migrations that bring a database to them.

Version 1: `audit_records` (one row per record, its place in the chain a unique key) and
`audit_schema`. Version 2 adds what erasure, retention, lookups and reports need:
- format 2's columns (`salt`, the commitments) and `erasure_id` (the `forget` that emptied a record);
- indexes for event_id, file_uuid, email and (consumer, recorded_at);
- `audit_erasures` (each `forget` and `prune`: who, when, what, how many records);
- `audit_retention` (per chain, the last record retention removed, and its hash: where verify starts);
- the report's rollups, kept by a trigger in the transaction that inserts the records: per UTC day
  and content type `audit_daily`, and per uploader a pyramid of periods of 1, 4, 32 and 256 days
  (`audit_users_1d` … `audit_users_256d`), so that a report by user over a year reads a period of
  256 days and a few of 32, 4 and 1 — not 365 days of every user; each row holds FIGURES;
- `audit_schema.store_id`, a random name of the store, which a spool file records (spool.py).

The daemons' role needs no grant on the rollups: on PostgreSQL the trigger runs as the tables' owner.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 2
DAY_MS = 86_400_000
USER_PERIODS = (1, 4, 32, 256)  # days: each a multiple of the one before, counted from 1970-01-01
NO_EMAIL, FORGOTTEN_EMAIL = "", " "  # rollup keys no uploader's email can be (an email is never blank)
NO_TYPE = ""


def users_table(days: int) -> str:
    return f"audit_users_{days}d"


ROLLUPS = {  # table: (its period column, its length in days, its key below the consumer and the period)
    "audit_daily": ("day", 1, "content_type"),
    **{users_table(days): ("period", days, "email") for days in USER_PERIODS},
}
FIGURES = ("records", "uploads", "bytes", "failures", "retries", "duplicates")
"""What a rollup row holds of its records: how many, the processed ones and their size, the dead-lettered,
retried and duplicate ones (the outcome is not in the key: a user's year is one row, not four)."""


def figures(row: str = "") -> tuple[str, ...]:
    """FIGURES as expressions over one record (`row`: `NEW.` in a trigger)."""
    outcome, size = f"{row}outcome", f"COALESCE({row}size, 0)"
    return (
        "1",
        f"CASE WHEN {outcome} = 'processed' THEN 1 ELSE 0 END",
        f"CASE WHEN {outcome} = 'processed' THEN {size} ELSE 0 END",
        f"CASE WHEN {outcome} = 'dead_lettered' THEN 1 ELSE 0 END",
        f"CASE WHEN {outcome} = 'retried' THEN 1 ELSE 0 END",
        f"CASE WHEN {outcome} = 'duplicate' THEN 1 ELSE 0 END",
    )


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends in the DDL."""

    name: str
    integer: str
    big: str
    identity: str
    random_id: str  # an SQL expression: 32 random hex digits


SQLITE = Dialect("sqlite", "INTEGER", "INTEGER", "INTEGER PRIMARY KEY", "lower(hex(randomblob(16)))")
POSTGRES = Dialect(
    "postgresql",
    "INTEGER",
    "BIGINT",
    "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "md5(random()::text || clock_timestamp()::text)",
)


def _version_1(d: Dialect) -> list[str]:
    i, b = d.integer, d.big
    return [
        "CREATE TABLE audit_schema (version INTEGER NOT NULL)",
        "INSERT INTO audit_schema (version) VALUES (0)",
        f"""CREATE TABLE audit_records (
            id {d.identity},
            format {i} NOT NULL, writer TEXT NOT NULL, seq {b} NOT NULL, prev_hash TEXT NOT NULL,
            recorded_at {b} NOT NULL, consumer TEXT NOT NULL, host TEXT NOT NULL, pid {i} NOT NULL,
            stream TEXT NOT NULL, stream_seq {b} NOT NULL, deliveries {i} NOT NULL,
            event_id TEXT, file_uuid TEXT, email TEXT, filename TEXT, bucket TEXT,
            size {b}, content_type TEXT, sha256 TEXT,
            outcome TEXT NOT NULL, error_class TEXT, reason TEXT, duration_ms {b},
            processors TEXT NOT NULL, skipped TEXT NOT NULL, hash TEXT NOT NULL,
            UNIQUE (writer, seq)
        )""",
        "CREATE INDEX audit_records_recorded_at ON audit_records (recorded_at)",
    ]


def rollup_rows(source: str, email: str = "email") -> dict[str, str]:
    """Per rollup, the SELECT that sums `source`'s rows into its keys (GROUP BY and ORDER BY its key:
    concurrent writers then lock the rows they share in one order)."""
    sums = ", ".join(f"SUM({f})" for f in figures())
    return {
        table: f"SELECT consumer, {_keys(table, email)}, {sums} FROM {source} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        for table in ROLLUPS
    }


def _keys(table: str, email: str = "email", row: str = "") -> str:
    """A rollup's period and key, as expressions over a record's columns (`row`: `NEW.` in a trigger)."""
    _, days, key = ROLLUPS[table]
    column = (
        f"COALESCE({row}content_type, '{NO_TYPE}')"
        if key == "content_type"
        else f"COALESCE({row}{email}, '{NO_EMAIL}')"
    )
    return f"{row}recorded_at / {DAY_MS * days}, {column}"


def rollup_upsert(table: str) -> str:
    """INSERT … ON CONFLICT that adds rows (consumer, period, key, FIGURES…) into `table`."""
    period, _, key = ROLLUPS[table]
    added = ", ".join(f"{f} = {table}.{f} + excluded.{f}" for f in FIGURES)
    return (
        f"INSERT INTO {table} (consumer, {period}, {key}, {', '.join(FIGURES)}) {{rows}} "
        f"ON CONFLICT (consumer, {period}, {key}) DO UPDATE SET {added}"
    )


def _rollup_tables(d: Dialect) -> list[str]:
    statements = []
    counts = ", ".join(f"{f} {d.big} NOT NULL" for f in FIGURES)
    for table, (period, _, key) in ROLLUPS.items():
        statements.append(
            f"CREATE TABLE {table} (consumer TEXT NOT NULL, {period} {d.integer} NOT NULL, {key} TEXT NOT NULL, "
            f"{counts}, PRIMARY KEY (consumer, {period}, {key}))"
        )
        # The records already there (a store upgraded from version 1).
        statements.append(rollup_upsert(table).format(rows=rollup_rows("audit_records")[table]))
    return statements


def _rollup_trigger(d: Dialect) -> list[str]:
    if d is SQLITE:  # row by row: SQLite has no statement triggers
        one = ", ".join(figures("NEW."))
        body = "; ".join(
            rollup_upsert(table).format(rows=f"VALUES (NEW.consumer, {_keys(table, row='NEW.')}, {one})")
            for table in ROLLUPS
        )
        return [f"CREATE TRIGGER audit_rollups AFTER INSERT ON audit_records BEGIN {body}; END"]
    # One pass per INSERT (or COPY) statement over the rows it added; ON CONFLICT DO NOTHING adds none
    # for a record already there. As the owner (SECURITY DEFINER): the daemons' role may only insert records.
    body = "; ".join(rollup_upsert(t).format(rows=rows) for t, rows in rollup_rows("added").items())
    return [
        f"""CREATE FUNCTION audit_rollups() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
            SET search_path FROM CURRENT AS $$ BEGIN {body}; RETURN NULL; END $$""",
        """CREATE TRIGGER audit_rollups AFTER INSERT ON audit_records REFERENCING NEW TABLE AS added
            FOR EACH STATEMENT EXECUTE FUNCTION audit_rollups()""",
    ]


def _version_2(d: Dialect) -> list[str]:
    b = d.big
    added = ["salt TEXT", *(f"{name}_commitment TEXT" for name in ("email", "filename", "reason")), f"erasure_id {b}"]
    return [
        *(f"ALTER TABLE audit_records ADD COLUMN {column}" for column in added),
        "CREATE INDEX audit_records_event_id ON audit_records (event_id)",
        "CREATE INDEX audit_records_file_uuid ON audit_records (file_uuid)",
        "CREATE INDEX audit_records_email ON audit_records (email)",
        "CREATE INDEX audit_records_consumer_recorded_at ON audit_records (consumer, recorded_at)",
        f"""CREATE TABLE audit_erasures (
            id {d.identity}, erased_at {b} NOT NULL, erased_by TEXT NOT NULL, what TEXT NOT NULL,
            records {b} NOT NULL, note TEXT
        )""",
        f"""CREATE TABLE audit_retention (
            writer TEXT PRIMARY KEY, seq {b} NOT NULL, hash TEXT NOT NULL, recorded_at {b} NOT NULL,
            pruned_at {b} NOT NULL
        )""",
        *_rollup_tables(d),
        *_rollup_trigger(d),
        "ALTER TABLE audit_schema ADD COLUMN store_id TEXT",
        f"UPDATE audit_schema SET store_id = {d.random_id}",
    ]


def migrations(d: Dialect) -> dict[int, list[str]]:
    """Per version, the statements that bring the version before it there."""
    return {1: _version_1(d), 2: _version_2(d)}
