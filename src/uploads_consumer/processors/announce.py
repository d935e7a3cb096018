"""What the processors that announce an upload to people (`webhook`'s Slack and Discord lines, `email`)
say about it: its name, its size in human units, and the transcript an earlier step made."""

from __future__ import annotations

from typing import Any

from uploads_consumer.processors import ProcessingContext


def upload_name(ctx: ProcessingContext) -> str:
    """The clean file name when the metadata was read; with the event alone, the stored name (the last
    part of `s3_data_key`, less `.enc`)."""
    name = ctx.facts()["original_filename"]
    return str(name) if name else ctx.event.stored_name


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} byte{'s' if size != 1 else ''}"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def transcription(ctx: ProcessingContext) -> dict[str, Any]:
    """What the first earlier `transcribe` step (or instance of it, `transcribe:fr`), here or in a
    stage before this consumer, with some text reported (`text`, `language`, …); empty when there is none."""
    for step, out in ctx.earlier_outputs().items():
        if step.partition(":")[0] == "transcribe" and isinstance(out.get("text"), str) and out["text"].strip():
            return dict(out)
    return {}
