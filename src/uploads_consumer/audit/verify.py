"""`audit verify`: every chain walked (chain.py), then held against its anchors (anchors.py).

Against its anchors, a chain is
- **truncated** when it ends before the seq of its last anchor: its last records were removed;
- **rewritten** when the record at an anchored seq has another hash than the anchor says: the
  records up to it were rewritten, even with every later hash recomputed so that the chain holds.
With the public key given, an anchor that does not verify (unsigned, or signed with another key)
is refused (**forged**) and counts for nothing. What no anchor can show: records stored after their
chain's last anchor (at most AUDIT_ANCHOR_INTERVAL of one writer's, plus what was still in its spool).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from uploads_consumer.audit.anchors import Anchor, decode_anchors, signature_problem
from uploads_consumer.audit.chain import Break, ChainCheck, Head
from uploads_consumer.audit.record import ZERO_HASH, Record
from uploads_consumer.audit.store import Store, utc


@dataclass
class Verification:
    check: ChainCheck
    breaks: list[Break] = field(default_factory=list)
    anchors_read: int | None = None
    """None: anchors not read."""
    anchors_refused: int = 0
    anchored_chains: int = 0
    known_chains: int = 0
    not_reread: int = 0
    """With `incremental`: the records before each chain's last anchor, not read."""
    """With records, or emptied by retention, or only anchored (every record removed)."""
    unanchored_records: int = 0

    @property
    def ok(self) -> bool:
        return not self.breaks


def _accepted(
    raw: list[tuple[int, bytes]], keys: list[Ed25519PublicKey] | None, breaks: list[Break]
) -> dict[str, dict[int, Anchor]]:
    """Per writer and seq, the anchors to hold the chains against; a break for each refused."""
    by_writer, unreadable = decode_anchors(raw)
    breaks.extend(Break("-", 0, text, "forged") for text in unreadable)
    accepted: dict[str, dict[int, Anchor]] = {}
    for writer, anchors in by_writer.items():
        for stream_seq, anchor in anchors:
            problem = signature_problem(anchor, keys) if keys is not None else None
            if problem is not None:
                breaks.append(Break(writer, anchor.seq, f"anchor message {stream_seq} is refused: {problem}", "forged"))
                continue
            accepted.setdefault(writer, {})[anchor.seq] = anchor
    return accepted


def _against_anchors(
    writer: str, anchors: dict[int, Anchor], last: Head, marker: Head | None, seen: dict[int, str]
) -> Break | None:
    top = anchors[max(anchors)]
    if top.seq > last.seq:
        gone = f"record {top.seq}" if top.seq == last.seq + 1 else f"records {last.seq + 1}-{top.seq}"
        ends = f"ends at seq {last.seq}" if last.seq else "has no record left"
        return Break(
            writer,
            top.seq,
            f"the chain {ends}, before its anchor of seq {top.seq} ({utc(top.at)}): {gone} removed",
            "truncated",
        )
    for seq in sorted(anchors):
        anchor = anchors[seq]
        if marker is not None and seq <= marker.seq:
            held = marker.hash if seq == marker.seq else None  # before it: removed by retention
        else:
            held = seen.get(seq)  # None: the record is missing, which the walk names
        if held is not None and held != anchor.hash:
            return Break(
                writer,
                seq,
                f"its hash is not the one anchored at {utc(anchor.at)}: the chain was rewritten up to this record",
                "rewritten",
            )
    return None


PAGE = 10_000  # records per query when a chain is read from its last anchor


async def _pages(store: Store, writer: str, after: int) -> AsyncIterator[list[Record]]:
    """A writer's records after seq `after`, a page per query: from an anchor they are few, and one
    query each costs less than a cursor's transaction."""
    while page := await store.chain_slice(writer, after, 1 << 62, PAGE):
        yield page
        after = page[-1]["seq"]


async def _walk_from_anchors(
    store: Store, check: ChainCheck, accepted: dict[str, dict[int, Anchor]], markers: dict[str, Head]
) -> int:
    """Each chain from its last anchor on (the whole chain when it has none); the records before it
    are not read, and their number is returned."""
    skipped = 0
    for writer in await store.writers():
        marker = markers.get(writer)
        start = marker.seq if marker else 0
        top = max(accepted[writer]) if writer in accepted else 0
        if top <= start:  # no anchor past the marker: the whole chain, a page at a time
            async for page in _pages(store, writer, start):
                for record in page:
                    check.add(record)
            continue
        pages = _pages(store, writer, top - 1)
        first_page: list[Record] = await anext(pages, [])
        if not first_page or first_page[0]["seq"] != top:
            last = await store.last_seq(writer)
            check.chains += 1
            check.heads[writer] = Head(last, "")  # before the anchor: truncated; past it: the anchored one is gone
            if last > top:
                check.breaks.append(Break(writer, top, f"record {top} of this chain, anchored, is missing (deleted)"))
            continue
        skipped += top - start - 1
        check.resume_at(first_page[0])
        for record in first_page[1:]:
            check.add(record)
        async for page in pages:
            for record in page:
                check.add(record)
    return skipped


async def verify(
    store: Store,
    raw_anchors: list[tuple[int, bytes]] | None,
    keys: list[Ed25519PublicKey] | None,
    incremental: bool = False,
) -> Verification:
    """Walk every chain of `store`; with anchors (the anchor stream's messages), hold each against them.
    `incremental`: each chain only from its last anchor on (see `_walk_from_anchors`)."""
    markers = await store.markers()
    breaks: list[Break] = []
    accepted = _accepted(raw_anchors, keys, breaks) if raw_anchors is not None else {}
    check = ChainCheck(starts=markers, erasures=await store.erasure_ids(), at={w: set(a) for w, a in accepted.items()})
    skipped = 0
    if incremental:
        skipped = await _walk_from_anchors(store, check, accepted, markers)
    else:
        async for record in store.chains():
            check.add(record)
    result = Verification(check, breaks=[*check.breaks], not_reread=skipped)
    if raw_anchors is None:
        return result
    result.anchors_read = len(raw_anchors)
    result.anchors_refused = len(breaks)
    broken = {b.writer for b in check.breaks}
    writers = sorted({*check.heads, *markers, *accepted})
    result.known_chains = len(writers)
    for writer in writers:
        marker = markers.get(writer)
        last = check.heads.get(writer) or marker or Head(0, ZERO_HASH)
        anchors = accepted.get(writer)
        if not anchors:
            result.unanchored_records += last.seq - (marker.seq if marker else 0)
            continue
        result.anchored_chains += 1
        result.unanchored_records += max(0, last.seq - max(anchors))
        found = _against_anchors(writer, anchors, last, marker, check.seen.get(writer, {}))
        if found is not None and (found.kind == "truncated" or writer not in broken):
            result.breaks.append(found)
    result.breaks.extend(breaks)
    return result
