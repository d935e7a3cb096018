"""The audit trail (AUDIT_URL): one hash-chained record for every settlement.

What the settle path and the daemon's wiring use is here; the rest is one module per concern:
`record` (fields, canonical form, chain), `chain` (verify's check), `trail` (the writer the settler
calls), `store` (SQLite and PostgreSQL), `spool` (a PostgreSQL writer's local journal; `open_trail`).
"""

from uploads_consumer.audit.spool import open_trail
from uploads_consumer.audit.trail import Audit, Delivered, NoAudit, Outcome, Settlement

__all__ = ["Audit", "Delivered", "NoAudit", "Outcome", "Settlement", "open_trail"]
