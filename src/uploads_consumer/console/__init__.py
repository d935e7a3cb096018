"""The web console (`uploads-consumer console`) and the read model it shares with `trace`.

A process of its own, never a replica's: an aiohttp app (`app`) over a small read model — an upload's
timeline across every consumer and stage (`timeline`), the dead letters (`letters`), the consumers'
state (`state`) — that reads NATS and the audit store (`audit_source`), never the loop. Importing this
package imports nothing: `trace` takes the read model without the web server.
"""
