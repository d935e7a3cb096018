from uploads_consumer.cli import entry

raise SystemExit(entry())
