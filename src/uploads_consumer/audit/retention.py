"""`audit prune`: AUDIT_RETENTION applied, in whole chain prefixes.

Per chain, the records older than the cutoff, from its start up to its first record that is not (a
clock that went back keeps the rest for a later run). Each slice is checked as verify checks it
before it goes — retention never removes a record that does not verify, nor anything after it, so
it cannot bury tampering — then deleted in one transaction that also moves the chain's marker
(`audit_retention`: the last record removed and its hash, where verify then starts the chain). The
rollups of the days before the cutoff go too, and the run is recorded in `audit_erasures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uploads_consumer.audit.chain import Break, ChainCheck, Head
from uploads_consumer.audit.record import ZERO_HASH
from uploads_consumer.audit.schema import DAY_MS
from uploads_consumer.audit.store import Store, utc

SLICE = 10_000  # records per transaction


@dataclass
class Pruned:
    records: int = 0
    chains: int = 0
    kept: list[Break] = field(default_factory=list)
    """Per chain whose prefix does not verify: its first broken record (it and all after it stay)."""


async def prune(store: Store, cutoff_ms: int, by: str, now_ms: int, dry_run: bool = False) -> Pruned:
    """Remove every chain's prefix of records older than `cutoff_ms`; `dry_run`: only count them."""
    result = Pruned()
    plan = await store.prunable(cutoff_ms)
    if not plan:
        return result
    markers = await store.markers()
    if dry_run:
        for writer, through in plan:
            result.records += through - markers.get(writer, Head(0, ZERO_HASH)).seq
            result.chains += 1
        return result
    erasures = await store.erasure_ids()
    erasure = await store.begin_prune(f"retention: records before {utc(cutoff_ms)}", by, now_ms)
    for writer, through in plan:
        start = markers.get(writer, Head(0, ZERO_HASH))
        check = ChainCheck(starts={writer: start}, erasures=erasures)
        after, removed = start.seq, 0
        while after < through:
            records = await store.chain_slice(writer, after, through, SLICE)
            if not records:
                break
            good = []
            for record in records:
                check.add(record)
                if check.breaks:
                    break
                good.append(record)
            if good:
                removed += await store.remove_prefix(good[-1], now_ms, erasure)
                after = good[-1]["seq"]
            if check.breaks:
                result.kept.append(check.breaks[0])
                break
        if removed:
            result.records += removed
            result.chains += 1
    await store.drop_rollups_before(cutoff_ms // DAY_MS)
    return result
