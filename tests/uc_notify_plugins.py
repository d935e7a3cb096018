"""Stand-ins the notification tests chain before `webhook` (tests/ on PYTHONPATH)."""

from __future__ import annotations

TRANSCRIPT = "Good morning everyone and welcome to the quarterly review of the uploads service and its notifications"


async def transcribe(ctx) -> None:
    """Reports what the `transcribe` processor reports (text, language) without recognising anything."""
    ctx.report("text", TRANSCRIPT)
    ctx.report("language", "en")
