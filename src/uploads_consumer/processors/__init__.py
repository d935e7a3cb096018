"""Processors: async callables run in order on the verified plaintext.

A processor receives a `ProcessingContext` and steers the outcome by raising the project's errors:
`RetryableError` (nak with backoff) or `PermanentError(ErrorClass.PROCESSOR_FAILED, ...)`
(dead-letter). Any other exception counts as transient. Built-ins and third-party processors are
registered under the entry-point group `uploads_consumer.processors`; `module:attribute` works too.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uploads_consumer.errors import ConfigError, describe

if TYPE_CHECKING:
    from uploads_consumer.config import Settings
    from uploads_consumer.envelope import EnvelopeMetadata
    from uploads_consumer.events import FileUploadEvent

ENTRY_POINT_GROUP = "uploads_consumer.processors"


@dataclass
class ProcessingContext:
    """What a processor sees. `plaintext_path` is verified plaintext; do not modify or move it."""

    event: FileUploadEvent
    metadata: EnvelopeMetadata
    plaintext_path: Path
    size: int
    sha256: str
    settings: Settings
    log: Any
    outputs: dict[str, Any] = field(default_factory=dict)

    def report(self, key: str, value: Any) -> None:
        """Record an output for the result event (e.g. where a file was saved)."""
        self.outputs[key] = value


Processor = Callable[[ProcessingContext], Awaitable[None]]


@dataclass(frozen=True)
class NamedProcessor:
    name: str
    run: Processor


def load_processor(name: str) -> NamedProcessor:
    """`save` (an entry point name) or `package.module:attribute` → the processor."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("PROCESSORS", f"cannot load {name!r}: {exc}") from None
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
            raise ConfigError(
                "PROCESSORS",
                f"unknown processor {name!r} (installed: {', '.join(known) or 'none'}; or use module:attribute)",
            )
        try:
            target = found[0].load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is a configuration problem
            raise ConfigError("PROCESSORS", f"cannot load {name!r}: {describe(exc)}") from None
    if not callable(target):
        raise ConfigError("PROCESSORS", f"{name!r} is not callable")
    return NamedProcessor(name=name, run=target)


def load_processors(names: tuple[str, ...]) -> list[NamedProcessor]:
    if not names:
        raise ConfigError("PROCESSORS", "must name at least one processor, e.g. save")
    return [load_processor(n) for n in names]
