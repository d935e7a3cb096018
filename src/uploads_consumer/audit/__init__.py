"""The audit trail (AUDIT_URL): one hash-chained record for every settlement.

What the settle path and the daemon's wiring use is here; the rest is one module per concern:
`record` (fields, formats, canonical form, chain), `trail` (the writer the settler calls), `store`
and `schema` (SQLite and PostgreSQL), `spool` (a PostgreSQL writer's local journal; `open_trail`),
`anchors` (chain heads kept in NATS), `chain` and `verify` (audit verify), `retention` (audit prune).
"""

from uploads_consumer.audit.anchors import ensure_anchor_stream
from uploads_consumer.audit.spool import open_trail
from uploads_consumer.audit.trail import Audit, Delivered, NoAudit, Outcome, Settlement

__all__ = ["Audit", "Delivered", "NoAudit", "Outcome", "Settlement", "ensure_anchor_stream", "open_trail"]
