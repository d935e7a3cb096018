"""What a backend of `transcribe` returns: the text, its language, the audio's length and timed segments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]

    @property
    def word_count(self) -> int:
        return len(self.text.split())
