"""Processors: the plugin interface, and loading the chain that PROCESSORS names.

A processor runs on the verified plaintext of one upload and steers the outcome by raising the
project's errors: `RetryableError` (nak with backoff, or its own `delay`) or `PermanentError`
(dead-letter with its class). Any other exception counts as transient. A processor that finds, once
running, that an upload is not for it raises `StepSkipped(reason)`: the step is skipped, as when its
content types do not match, and the chain goes on. Two shapes are accepted:

- a plain **async function** `async def proc(ctx: ProcessingContext) -> None`: runs on every
  content type, has no settings of its own and no lifecycle;
- a subclass of **`Processor`**: declares its own settings (`settings_class`, read from variables
  prefixed with its name: `TRANSCRIBE_MODEL` for `transcribe`), the content types it applies to,
  whether its effect is external (then a completed run is recorded per event and not repeated on
  redelivery), and gets `start()` / `close()` for heavy resources (a model, a client session).

Built-ins and third-party processors are registered under the entry-point group
`uploads_consumer.processors`; `module:attribute` works too. Only the processors PROCESSORS names
are loaded, configured and started; a missing or invalid variable is a ConfigError (exit 2).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry
from pydantic import ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from uploads_consumer.config import CsvList
from uploads_consumer.errors import ConfigError, describe, one_line

if TYPE_CHECKING:
    from uploads_consumer.envelope import EnvelopeMetadata
    from uploads_consumer.events import FileUploadEvent

ENTRY_POINT_GROUP = "uploads_consumer.processors"
ALL_TYPES = ("*/*",)


class StepSkipped(Exception):
    """Raised by a running processor when the upload is not for it after all (a video without an
    audio track for `transcode`): the step counts as skipped, like a content type it does not apply
    to, what it reported so far is dropped, and the chain goes on. `reason` is one line, logged."""

    def __init__(self, reason: str) -> None:
        self.reason = one_line(reason)
        super().__init__(self.reason)


class ProcessingContext:
    """What a processor sees for one upload.

    `plaintext_path` is verified plaintext: read it, never modify or move it. `work_dir` is a
    private folder for this message (mode 0700, made when first asked for, removed after the
    chain); files a processor leaves there for later ones go in `files` (e.g. `files["audio"]`,
    the WAV that `transcode` made). `outputs` holds what earlier processors reported, by processor
    name; `report()` adds to the current one's. `skipped` names the earlier steps that were skipped,
    with why (their content types, or the `StepSkipped` they raised).
    """

    def __init__(
        self,
        *,
        event: FileUploadEvent,
        metadata: EnvelopeMetadata,
        plaintext_path: Path,
        size: int,
        sha256: str,
        content_type: str,
        download_path: Path,
        work_dir: Path,
        log: Any,
        outputs: dict[str, dict[str, Any]] | None = None,
        files: dict[str, Path] | None = None,
        skipped: dict[str, str] | None = None,
        current: str = "",
    ) -> None:
        self.event = event
        self.metadata = metadata
        self.plaintext_path = plaintext_path
        self.size = size
        self.sha256 = sha256
        self.content_type = content_type
        self.download_path = download_path
        self._work_dir = work_dir
        self._work_dir_made = False
        self.log = log
        self.outputs: dict[str, dict[str, Any]] = outputs if outputs is not None else {}
        self.files: dict[str, Path] = files if files is not None else {}
        self.skipped: dict[str, str] = skipped if skipped is not None else {}
        self.current = current

    @property
    def work_dir(self) -> Path:
        # Made on first use: most chains never need one, and a folder per upload costs syscalls.
        if not self._work_dir_made:
            self._work_dir.mkdir(mode=0o700, exist_ok=True)
            self._work_dir_made = True
        return self._work_dir

    @property
    def work_dir_made(self) -> bool:
        return self._work_dir_made

    def report(self, key: str, value: Any) -> None:
        """Record an output of the running processor; it appears in the result event under its name."""
        self.outputs.setdefault(self.current, {})[key] = value


Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class ProcessorEnvironment:
    """What the daemon lends processors: no secrets of its own, no settings beyond these."""

    download_path: Path
    """DECRYPT_DOWNLOAD_PATH, resolved: where output files belong ({email}/{file_uuid}/ under it)."""
    chain: tuple[str, ...]
    """The names of the processors in the chain, in order (`processor_name` of each PROCESSORS entry)."""
    max_retry_delay: float
    """The longest RETRY_BACKOFF delay: a cap for delays a processor asks for (e.g. Retry-After)."""
    registry: CollectorRegistry
    """The daemon's metrics registry, for metrics of a processor's own."""
    publish: Publish | None = None
    """JetStream publish that waits for the stream's acknowledgement (subject, body, headers);
    raises RetryableError when the message was not stored. None where no NATS connection exists."""


class ProcessorSettings(BaseSettings):
    """Base of a processor's settings: field `model` of processor `transcribe` is TRANSCRIBE_MODEL.

    Every processor has `content_types` ({NAME}_CONTENT_TYPES): MIME globs it runs on; empty means
    the processor's own default. Subclass it and add fields (pydantic types, validators) as needed.
    A variable set but empty counts as unset, except for the fields named in `empty_is_a_value`.
    """

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)
    empty_is_a_value: ClassVar[frozenset[str]] = frozenset()

    content_types: CsvList = ()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        # An exported-but-empty variable means "unset", as for the daemon's own variables.
        if value == "" and info.field_name is not None and info.field_name not in cls.empty_is_a_value:
            field = cls.model_fields[info.field_name]
            if field.is_required():
                raise ValueError("is required (it is set but empty)")
            return field.get_default(call_default_factory=True)
        return value


class Processor:
    """Base class for processors with settings, resources or an external effect.

    The daemon makes one instance per process: `__init__` must be cheap and must not fail for
    reasons other than configuration; `start()` loads heavy resources (a missing model or binary
    raises ConfigError naming the variable); `run()` handles one upload and may be called for
    several uploads at once; `close()` releases resources at shutdown.
    """

    settings_class: ClassVar[type[ProcessorSettings]] = ProcessorSettings
    content_types: ClassVar[tuple[str, ...]] = ALL_TYPES
    """Default MIME globs this processor applies to; {NAME}_CONTENT_TYPES overrides them."""
    external_effect: ClassVar[bool] = False
    """True when a run has an effect outside the process (a message sent, a webhook delivered):
    a completed run is then recorded per event, and on redelivery its outputs are reused instead."""

    def __init__(self, name: str, settings: ProcessorSettings, env: ProcessorEnvironment) -> None:
        self.name = name
        self.settings = settings
        self.env = env

    async def start(self) -> None:
        """Load heavy resources; raise ConfigError(variable, problem) when one is missing."""

    async def run(self, ctx: ProcessingContext) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what start() took."""

    def streams(self) -> list[tuple[str, str]]:
        """(stream, subject) pairs this processor publishes to: `setup` creates the missing ones."""
        return []


@dataclass(frozen=True)
class LoadedProcessor:
    """One link of the chain, whatever shape it was declared in."""

    name: str
    run: Callable[[ProcessingContext], Awaitable[None]]
    content_types: tuple[str, ...]
    external_effect: bool = False
    instance: Processor | None = None

    def applies_to(self, content_type: str) -> bool:
        return matches_any(content_type, self.content_types)

    async def start(self) -> None:
        if self.instance is not None:
            await self.instance.start()

    async def close(self) -> None:
        if self.instance is not None:
            await self.instance.close()

    def streams(self) -> list[tuple[str, str]]:
        return self.instance.streams() if self.instance is not None else []


def matches_any(content_type: str, globs: tuple[str, ...]) -> bool:
    """`audio/mpeg` against globs such as `audio/*`, `video/mp4`, `*/*`; no globs matches everything."""
    if not globs:
        return True
    bare = content_type.split(";", 1)[0].strip().lower()
    return any(fnmatch.fnmatchcase(bare, glob.strip().lower()) for glob in globs)


def variable_prefix(name: str) -> str:
    """The prefix of a processor's variables: `transcribe` → `TRANSCRIBE_`, `my-audit` → `MY_AUDIT_`."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper() + "_"


def load_settings_for(name: str, settings_class: type[ProcessorSettings]) -> ProcessorSettings:
    """Read `{PREFIX}*` variables into the processor's settings; a problem names the variable, never its value."""
    prefix = variable_prefix(name)
    try:
        return settings_class(_env_prefix=prefix)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field_name = str(first["loc"][0]) if first["loc"] else ""
        variable = (prefix + field_name).upper() if field_name else prefix + "*"
        message = "is required" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        raise ConfigError(variable, message) from None


def _resolve(name: str) -> Any:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("PROCESSORS", f"cannot load {name!r}: {exc}") from None
        return target
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise ConfigError(
            "PROCESSORS",
            f"unknown processor {name!r} (installed: {', '.join(installed_names()) or 'none'}; or use module:attribute)",
        )
    try:
        return found[0].load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin (or a missing extra) is a configuration problem
        raise ConfigError("PROCESSORS", f"cannot load {name!r}: {describe(exc)}") from None


def installed_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def processor_name(spec: str) -> str:
    """The name a chain entry goes by: the entry-point name, or the attribute of `module:attribute`."""
    return spec.rpartition(":")[2].rpartition(".")[2] if ":" in spec else spec


def load_processor(spec: str, env: ProcessorEnvironment) -> LoadedProcessor:
    """`save` (an entry-point name) or `package.module:attribute` → a configured processor (not started)."""
    target = _resolve(spec)
    name = processor_name(spec)
    if inspect.isclass(target) and issubclass(target, Processor):
        settings = load_settings_for(name, target.settings_class)
        instance = target(name, settings, env)
        return LoadedProcessor(
            name=name,
            run=instance.run,
            content_types=tuple(settings.content_types) or target.content_types,
            external_effect=target.external_effect,
            instance=instance,
        )
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None)):  # noqa: B004
        settings = load_settings_for(name, ProcessorSettings)
        return LoadedProcessor(name=name, run=target, content_types=tuple(settings.content_types) or ALL_TYPES)
    if callable(target):
        raise ConfigError(
            "PROCESSORS",
            f"{spec!r} is not an async function (define it with `async def`) nor a Processor subclass",
        )
    raise ConfigError("PROCESSORS", f"{spec!r} is not callable")


def load_processors(specs: tuple[str, ...], env: ProcessorEnvironment) -> list[LoadedProcessor]:
    if not specs:
        raise ConfigError("PROCESSORS", "must name at least one processor, e.g. save")
    chain = [load_processor(spec, env) for spec in specs]
    names = [p.name for p in chain]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError("PROCESSORS", f"names {', '.join(twice)} more than once")
    return chain


def describe_installed() -> list[dict[str, Any]]:
    """Every installed processor with its variables (for `uploads-consumer processors`)."""
    out: list[dict[str, Any]] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry: dict[str, Any] = {"name": ep.name, "target": ep.value}
        try:
            target = ep.load()
        except Exception as exc:  # noqa: BLE001 - e.g. its extra is not installed: say so, list the rest
            entry["error"] = describe(exc)
            out.append(entry)
            continue
        doc = inspect.getdoc(target) or ""
        entry["summary"] = doc.split("\n\n", 1)[0].replace("\n", " ")
        settings_class = target.settings_class if inspect.isclass(target) and issubclass(target, Processor) else None
        defaults = target.content_types if settings_class is not None else ALL_TYPES
        prefix = variable_prefix(ep.name)
        variables = []
        for field_name, info in (settings_class or ProcessorSettings).model_fields.items():
            if field_name == "content_types":
                default = ",".join(defaults)
            elif info.is_required():
                default = None
            else:
                default = _show_default(info.get_default(call_default_factory=True))
            variables.append(
                {
                    "variable": prefix + field_name.upper(),
                    "default": default,
                    "required": info.is_required(),
                    "description": info.description or "",
                }
            )
        entry["variables"] = variables
        entry["external_effect"] = bool(getattr(target, "external_effect", False))
        out.append(entry)
    return out


def _show_default(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return ""
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return str(value)
