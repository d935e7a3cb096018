"""Processors: the plugin interface, and loading the chain that PROCESSORS names.

A processor runs on one upload and steers the outcome by raising the project's errors:
`RetryableError` (nak with backoff, or its own `delay`) or `PermanentError` (dead-letter with its
class). Any other exception counts as transient. A processor that finds, once running, that an
upload is not for it raises `StepSkipped(reason)`: the step is skipped, as when its content types
do not match, and the chain goes on. Two shapes are accepted:

- a plain **async function** `async def proc(ctx: ProcessingContext) -> None`: runs on every
  content type, has no settings of its own and no lifecycle;
- a subclass of **`Processor`**: declares its own settings (`settings_class`, read from variables
  prefixed with its name: `TRANSCRIBE_MODEL` for `transcribe`), what it reads of an upload
  (`needs`: the event, the stored object, or the verified plaintext), the content types it applies
  to, whether its effect is external (then a completed run is recorded per event and not repeated
  on redelivery), and gets `start()` / `close()` for heavy resources (a model, a client session).

Built-ins and third-party processors are registered under the entry-point group
`uploads_consumer.processors`; `module:attribute` works too. `name:instance` (`webhook:ops`) runs
another instance of a processor with settings of its own (`WEBHOOK_OPS_*`, falling back to
`WEBHOOK_*`). Only the processors PROCESSORS names are loaded, configured and started; a missing
or invalid variable is a ConfigError (exit 2).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from uploads_consumer import tracing
from uploads_consumer.config import CsvList, format_duration, format_size, parse_duration, parse_size
from uploads_consumer.errors import ConfigError, ErrorClass, PermanentError, describe, one_line
from uploads_consumer.permissions import AwsGrant

if TYPE_CHECKING:
    from uploads_consumer.envelope import EnvelopeMetadata
    from uploads_consumer.events import FileUploadEvent

ENTRY_POINT_GROUP = "uploads_consumer.processors"
ALL_TYPES = ("*/*",)
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class Need(IntEnum):
    """What a processor reads of an upload. The pipeline fetches the most that a step still to run
    needs, and nothing more: a chain of `event` steps makes no S3 request at all."""

    EVENT = 1
    """The upload event alone (checked, and looked up for duplicates, like any other)."""
    OBJECT = 2
    """Also the stored, still-encrypted object: its `metadata.json` read and checked, its size and
    ETag (a HEAD request). The object's bytes are not read."""
    PLAINTEXT = 3
    """Also the object downloaded, decrypted and tag-verified: its path, size, SHA-256 and content type."""

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: Any) -> Need:
        if isinstance(value, cls):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            raise ValueError(f"needs must be event, object or plaintext, not {value!r}") from None


@dataclass(frozen=True)
class StoredObject:
    """The upload's encrypted object as stored (from a HEAD request), for steps that need `object`."""

    bucket: str
    key: str
    size: int
    etag: str
    """As S3 returns it, quotes removed: the MD5 of a single-part upload, `md5-N` of a multipart one."""
    metadata_key: str


class StepSkipped(Exception):
    """Raised by a running processor when the upload is not for it after all (a video without an
    audio track for `transcode`): the step counts as skipped, like a content type it does not apply
    to, what it reported so far is dropped, and the chain goes on. `reason` is one line, logged."""

    def __init__(self, reason: str) -> None:
        self.reason = one_line(reason)
        super().__init__(self.reason)


tracing.not_a_failure(StepSkipped)  # its span is marked skipped, not failed


class ProcessingContext:
    """What a processor sees for one upload.

    What is there depends on what the chain needs (`fetched`): the event always; with `object`, the
    metadata and `stored` (the encrypted object's size and ETag); with `plaintext`, also
    `plaintext_path` — verified plaintext: read it, never modify or move it — and its `size`,
    `sha256` and `content_type`. Reading what was not fetched raises: declare `needs`. `work_dir`
    is a private folder for this message (mode 0700, made when first asked for, removed after the
    chain); files a processor leaves there for later ones go in `files` (e.g. `files["audio"]`,
    the WAV that `transcode` made). `outputs` holds what earlier processors reported, by processor
    name; `report()` adds to the current one's. `skipped` names the earlier steps that were skipped,
    with why (their content types, or the `StepSkipped` they raised). In a stage (AFTER), `upstream`
    holds what each consumer before this one reported of the upload (its facts, `processors` and
    `outputs`), by consumer name, the nearest last; `earlier_outputs()` merges them with `outputs`.
    """

    def __init__(
        self,
        *,
        event: FileUploadEvent,
        download_path: Path,
        work_dir: Path,
        log: Any,
        metadata: EnvelopeMetadata | None = None,
        stored: StoredObject | None = None,
        plaintext_path: Path | None = None,
        size: int | None = None,
        sha256: str | None = None,
        content_type: str | None = None,
        outputs: dict[str, dict[str, Any]] | None = None,
        files: dict[str, Path] | None = None,
        skipped: dict[str, str] | None = None,
        current: str = "",
        upstream: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.event = event
        self._metadata = metadata
        self._stored = stored
        self._plaintext_path = plaintext_path
        self._size = size
        self._sha256 = sha256
        self._content_type = content_type
        self.fetched = (
            Need.PLAINTEXT if plaintext_path is not None else Need.OBJECT if metadata is not None else Need.EVENT
        )
        """What was fetched of this upload for the chain."""
        self.download_path = download_path
        self._work_dir = work_dir
        self._work_dir_made = False
        self.log = log
        self.outputs: dict[str, dict[str, Any]] = outputs if outputs is not None else {}
        self.files: dict[str, Path] = files if files is not None else {}
        self.skipped: dict[str, str] = skipped if skipped is not None else {}
        self.current = current
        self.upstream: Mapping[str, Mapping[str, Any]] = upstream if upstream is not None else {}

    def _fetched(self, value: Any, what: str, need: Need) -> Any:
        if value is None:
            raise PermanentError(
                ErrorClass.PROCESSOR_FAILED,
                f"processor {self.current} read {what}, which a step that needs {need} gets, but the chain "
                f"fetched only the {self.fetched}: the processor must declare needs = Need.{need.name}",
            )
        return value

    @property
    def metadata(self) -> EnvelopeMetadata:
        meta: EnvelopeMetadata = self._fetched(self._metadata, "the metadata", Need.OBJECT)
        return meta

    @property
    def stored(self) -> StoredObject:
        stored: StoredObject = self._fetched(self._stored, "the stored object", Need.OBJECT)
        return stored

    @property
    def plaintext_path(self) -> Path:
        path: Path = self._fetched(self._plaintext_path, "the plaintext", Need.PLAINTEXT)
        return path

    @property
    def size(self) -> int:
        size: int = self._fetched(self._size, "the plaintext's size", Need.PLAINTEXT)
        return size

    @property
    def sha256(self) -> str:
        digest: str = self._fetched(self._sha256, "the plaintext's sha256", Need.PLAINTEXT)
        return digest

    @property
    def content_type(self) -> str:
        kind: str = self._fetched(self._content_type, "the content type", Need.PLAINTEXT)
        return kind

    def facts(self) -> dict[str, Any]:
        """What is known of the upload, as the result event and the webhook report it: `fetched`, and
        `original_filename` and `size` (from the metadata) from `object` on, `sha256` and
        `content_type` with the plaintext. Where this consumer did not fetch them, a stage takes them from
        the nearest stage before it that did; None where no one did."""
        meta = self._metadata
        facts: dict[str, Any] = {
            "fetched": str(self.fetched),
            "original_filename": meta.clean_filename if meta is not None else None,
            "size": self._size if self._size is not None else meta.original_size if meta is not None else None,
            "sha256": self._sha256,
            "content_type": self._content_type,
        }
        for before in reversed(list(self.upstream.values())):
            for fact in ("original_filename", "size", "sha256", "content_type"):
                if facts[fact] is None and before.get(fact) is not None:
                    facts[fact] = before[fact]
        return facts

    def earlier_outputs(self) -> dict[str, Any]:
        """What every earlier step reported, by step name: the stages' before this consumer (a step of a
        nearer stage wins over one of the same name further up), then this chain's own."""
        merged: dict[str, Any] = {}
        for before in self.upstream.values():
            outputs = before.get("outputs")
            if isinstance(outputs, dict):
                merged.update(outputs)
        merged.update(self.outputs)
        return merged

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


Publish = Callable[[str, bytes, dict[str, str]], Awaitable[int | None]]
"""(subject, body, headers) → the message's sequence in the stream that stored it."""


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
    """The daemon's metrics registry, for metrics of a processor's own (see `counter`)."""
    publish: Publish | None = None
    """JetStream publish that waits for the stream's acknowledgement (subject, body, headers);
    raises RetryableError when the message was not stored. None where no NATS connection exists."""
    consumer: str = "file_processor"
    """NATS_CONSUMER_NAME, the durable this process reads for: a label of every metric."""
    s3: Callable[[], Any] | None = None
    """The daemon's S3 client for the upload store (aioboto3: the configured endpoint, credentials and
    retries), usable from `start()` on; for steps that need `object`. None where there is none."""
    after: str | None = None
    """AFTER: the consumer this one follows (a stage), whose steps' outputs reach this chain
    (`ProcessingContext.upstream`); None for a consumer of the upload stream."""
    _metrics: dict[str, Counter] = field(default_factory=dict, compare=False, repr=False)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter on the daemon's registry, labelled `consumer` first, made once however many
        processors (or instances of one) ask for it. Use `.labels(env.consumer, ...)`."""
        if name not in self._metrics:
            self._metrics[name] = Counter(name, documentation, ["consumer", *labelnames], registry=self.registry)
        return self._metrics[name]


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
    needs: ClassVar[Need] = Need.PLAINTEXT
    """What it reads of an upload: `Need.EVENT`, `Need.OBJECT` or `Need.PLAINTEXT` (the default)."""
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

    async def recorded(self, ctx: ProcessingContext) -> None:
        """Called once a successful run is recorded (a step with an external effect is checkpointed by
        then): for a last action that must not come before, such as deleting what was copied. It is
        not retried — the step will not run again — so it must leave nothing lost when it fails."""

    @property
    def removes_upload(self) -> bool:
        """True when `recorded()` deletes the stored upload: the daemon then refuses to start a chain in
        which a later step reads it, or one without step checkpoints (a redelivery would find it gone)."""
        return False

    async def close(self) -> None:
        """Release what start() took."""

    def streams(self) -> list[tuple[str, str]]:
        """(stream, subject) pairs this processor publishes to: `setup` creates the missing ones."""
        return []

    def grants(self, uploads: tuple[str, ...]) -> list[AwsGrant]:
        """What it needs of S3 besides reading the upload (`needs`), for `setup --print-permissions`;
        `uploads`: the ARNs of the stored uploads (`arn:aws:s3:::BUCKET/uploads/*`)."""
        return []


@dataclass(frozen=True)
class LoadedProcessor:
    """One link of the chain, whatever shape it was declared in."""

    name: str
    run: Callable[[ProcessingContext], Awaitable[None]]
    content_types: tuple[str, ...]
    external_effect: bool = False
    instance: Processor | None = None
    needs: Need = Need.PLAINTEXT
    removes_upload: bool = False

    @property
    def need(self) -> Need:
        """What the pipeline must fetch for this step: its `needs`, or the plaintext when it applies to
        some content types only (the type is sniffed from the plaintext)."""
        return self.need_for(type_known=False)

    def need_for(self, type_known: bool) -> Need:
        """`need`, where the content type may already be known (a stage whose upstream sniffed it)."""
        return self.needs if type_known or all_types(self.content_types) else Need.PLAINTEXT

    def applies_to(self, content_type: str | None) -> bool:
        """Whether it runs on a file of this type; without a type (not fetched), it applies."""
        return content_type is None or matches_any(content_type, self.content_types)

    async def start(self) -> None:
        if self.instance is not None:
            await self.instance.start()

    async def recorded(self, ctx: ProcessingContext) -> None:
        if self.instance is not None:
            await self.instance.recorded(ctx)

    async def close(self) -> None:
        if self.instance is not None:
            await self.instance.close()

    def streams(self) -> list[tuple[str, str]]:
        return self.instance.streams() if self.instance is not None else []

    def grants(self, uploads: tuple[str, ...]) -> list[AwsGrant]:
        return self.instance.grants(uploads) if self.instance is not None else []


def all_types(globs: tuple[str, ...]) -> bool:
    """Whether the globs match every content type."""
    return not globs or any(glob.strip() in ("*", "*/*") for glob in globs)


def matches_any(content_type: str, globs: tuple[str, ...]) -> bool:
    """`audio/mpeg` against globs such as `audio/*`, `video/mp4`, `*/*`; no globs matches everything."""
    if not globs:
        return True
    bare = content_type.split(";", 1)[0].strip().lower()
    return any(fnmatch.fnmatchcase(bare, glob.strip().lower()) for glob in globs)


def variable_prefix(name: str) -> str:
    """The prefix of a processor's variables: `transcribe` → `TRANSCRIBE_`, `my-audit` → `MY_AUDIT_`."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper() + "_"


def variable_prefixes(name: str) -> tuple[str, ...]:
    """Where a processor's variables are read, first match first: `webhook` → (`WEBHOOK_`,);
    the instance `webhook:ops` → (`WEBHOOK_OPS_`, `WEBHOOK_`)."""
    kind, _, instance = name.partition(":")
    return (variable_prefix(name), variable_prefix(kind)) if instance else (variable_prefix(name),)


def variable_for(name: str, field_name: str) -> str:
    """A setting's variable(s), for messages: `WEBHOOK_SECRET`; for `webhook:ops`,
    `WEBHOOK_OPS_SECRET or WEBHOOK_SECRET`."""
    return " or ".join(prefix + field_name.upper() for prefix in variable_prefixes(name))


def _read_prefixed(settings_class: type[ProcessorSettings], prefix: str) -> dict[str, Any]:
    """The variables set under `prefix`, by field; an empty one counts as unset unless empty is a value."""
    found = EnvSettingsSource(settings_class, case_sensitive=False, env_prefix=prefix)()
    return {k: v for k, v in found.items() if v != "" or k in settings_class.empty_is_a_value}


def setting_sources(name: str, settings_class: type[ProcessorSettings]) -> dict[str, str]:
    """For each field that is set, the variable it is read from (an instance's own, else its kind's)."""
    sources: dict[str, str] = {}
    for prefix in reversed(variable_prefixes(name)):
        for field_name in _read_prefixed(settings_class, prefix):
            sources[field_name] = prefix + field_name.upper()
    return sources


def load_settings_for(name: str, settings_class: type[ProcessorSettings]) -> ProcessorSettings:
    """Read the processor's variables into its settings (an instance's own first, then its kind's:
    `WEBHOOK_OPS_URL`, else `WEBHOOK_URL`); a problem names the variable, never its value."""
    prefixes = variable_prefixes(name)
    own = _read_prefixed(settings_class, prefixes[0])
    fallback = {
        k: v for prefix in prefixes[:0:-1] for k, v in _read_prefixed(settings_class, prefix).items() if k not in own
    }
    try:
        # Given values outrank the environment, which is read with the instance's own prefix.
        return settings_class(_env_prefix=prefixes[0], **fallback)
    except ValidationError as exc:
        # Every problem at once (two required variables unset: both named), the first as the variable.
        problems = [
            _problem(name, settings_class, error, fallback)
            for error in exc.errors(include_input=False, include_url=False)
        ]
        (variable, message), rest = problems[0], problems[1:]
        raise ConfigError(variable, "; ".join([message, *(f"{v}: {m}" for v, m in rest)])) from None


def _problem(
    name: str, settings_class: type[ProcessorSettings], error: Any, fallback: dict[str, Any]
) -> tuple[str, str]:
    """(the variable, what is wrong with it) for one validation error of a processor's settings."""
    prefixes = variable_prefixes(name)
    field_name = str(error["loc"][0]) if error["loc"] else ""
    if not field_name:
        variable = prefixes[0] + "*"
    elif field_name in fallback:
        variable = setting_sources(name, settings_class).get(field_name, prefixes[-1] + field_name.upper())
    else:
        variable = prefixes[0] + field_name.upper()
        if len(prefixes) > 1 and error["type"] == "missing":
            variable += f" (or {prefixes[-1]}{field_name.upper()})"
    message = "is required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
    return variable, message


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


@dataclass(frozen=True)
class ChainEntry:
    """One entry of PROCESSORS, taken apart."""

    target: str
    """What is loaded: an entry-point name (`webhook`) or `module:attribute`."""
    name: str
    """The name it goes by: `webhook`, `webhook:ops`, `Notify`, `Notify:eu` (outputs, metrics, variables)."""


def parse_entry(spec: str) -> ChainEntry:
    """`webhook`, `webhook:ops` (an instance of an installed processor), `module:attribute`, or
    `module:attribute:instance`. An installed processor's name wins over a module of that name."""
    parts = spec.split(":")
    if not all(parts):
        raise ConfigError("PROCESSORS", f"{spec!r}: an empty part (a ':' too many?)")
    if len(parts) == 1 or parts[0] in installed_names():
        if len(parts) > 2:
            raise ConfigError("PROCESSORS", f"{spec!r}: expected NAME or NAME:INSTANCE")
        target, kind, instance = parts[0], parts[0], parts[1] if len(parts) == 2 else ""
    elif len(parts) in (2, 3):
        target, kind = ":".join(parts[:2]), parts[1].rpartition(".")[2]
        instance = parts[2] if len(parts) == 3 else ""
    else:
        raise ConfigError("PROCESSORS", f"{spec!r}: expected module:attribute or module:attribute:INSTANCE")
    if instance and not _INSTANCE.match(instance):
        raise ConfigError(
            "PROCESSORS", f"{spec!r}: an instance name is letters, digits, '_' and '-', starting with a letter or digit"
        )
    return ChainEntry(target=target, name=f"{kind}:{instance}" if instance else kind)


def processor_name(spec: str) -> str:
    """The name a chain entry goes by: the entry-point name or the attribute of `module:attribute`,
    with `:instance` when it names one."""
    return parse_entry(spec).name


def load_processor(spec: str, env: ProcessorEnvironment) -> LoadedProcessor:
    """`save` (an entry-point name), `webhook:ops` (an instance) or `package.module:attribute` → a
    configured processor (not started)."""
    entry = parse_entry(spec)
    target = _resolve(entry.target)
    name = entry.name
    if inspect.isclass(target) and issubclass(target, Processor):
        settings = load_settings_for(name, target.settings_class)
        instance = target(name, settings, env)
        return LoadedProcessor(
            name=name,
            run=instance.run,
            content_types=tuple(settings.content_types) or target.content_types,
            external_effect=target.external_effect,
            instance=instance,
            needs=Need.parse(target.needs),
            removes_upload=instance.removes_upload,
        )
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None)):  # noqa: B004
        settings = load_settings_for(name, ProcessorSettings)
        try:  # a function may say what it needs, as an attribute: `notify.needs = "event"`
            needs = Need.parse(getattr(target, "needs", Need.PLAINTEXT))
        except ValueError as exc:
            raise ConfigError("PROCESSORS", f"{spec!r}: {exc}") from None
        return LoadedProcessor(
            name=name, run=target, content_types=tuple(settings.content_types) or ALL_TYPES, needs=needs
        )
    if callable(target):
        raise ConfigError(
            "PROCESSORS",
            f"{spec!r} is not an async function (define it with `async def`) nor a Processor subclass",
        )
    raise ConfigError("PROCESSORS", f"{spec!r} is not callable")


def chain_need(
    chain: Sequence[LoadedProcessor], allowed_content_types: tuple[str, ...] = (), type_known: bool = False
) -> Need:
    """What the pipeline fetches for these steps: the most any of them needs; the plaintext when
    ALLOWED_CONTENT_TYPES must be checked (the type is sniffed from it), unless the type is known."""
    need = max((p.need_for(type_known) for p in chain), default=Need.EVENT)
    return Need.PLAINTEXT if allowed_content_types and not type_known else need


def load_processors(
    specs: tuple[str, ...], env: ProcessorEnvironment, checkpoints: bool = True
) -> list[LoadedProcessor]:
    """The chain PROCESSORS names, configured; `checkpoints`: whether steps are checkpointed
    (DEDUPE_BUCKET not empty)."""
    if not specs:
        raise ConfigError("PROCESSORS", "must name at least one processor, e.g. save")
    chain = [load_processor(spec, env) for spec in specs]
    names = [p.name for p in chain]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError("PROCESSORS", f"names {', '.join(twice)} more than once")
    for i, step in enumerate(chain):
        if not step.removes_upload:
            continue
        if not checkpoints:
            raise ConfigError(
                "DEDUPE_BUCKET",
                f"is empty, but {step.name} deletes the stored upload after its step: without step "
                "checkpoints a redelivery would find the upload gone",
            )
        if readers := [later.name for later in chain[i + 1 :] if later.need >= Need.OBJECT]:
            raise ConfigError(
                "PROCESSORS",
                f"{step.name} deletes the stored upload after its step, so it must come after every step "
                f"that reads it ({', '.join(readers)} comes after it)",
            )
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
                default = _show_default(info.get_default(call_default_factory=True), info.metadata)
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
        entry["needs"] = str(Need.parse(getattr(target, "needs", Need.PLAINTEXT)))
        out.append(entry)
    return out


def describe_chain(specs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each entry of PROCESSORS: its name, what it needs, and where each of its variables is read
    from (the instance's own, its kind's, or the default). Values are never shown."""
    out: list[dict[str, Any]] = []
    for spec in specs:
        entry: dict[str, Any] = {"entry": spec}
        try:
            parsed = parse_entry(spec)
            target = _resolve(parsed.target)
        except ConfigError as exc:
            entry["error"] = exc.reason
            out.append(entry)
            continue
        is_class = inspect.isclass(target) and issubclass(target, Processor)
        settings_class = target.settings_class if is_class else ProcessorSettings
        sources = setting_sources(parsed.name, settings_class)
        prefixes = variable_prefixes(parsed.name)
        entry.update(
            name=parsed.name,
            target=parsed.target,
            needs=str(Need.parse(getattr(target, "needs", Need.PLAINTEXT))),
            variables=[
                {
                    "variable": prefixes[0] + field_name.upper(),
                    "falls_back_to": [p + field_name.upper() for p in prefixes[1:]],
                    "from": sources.get(field_name),
                    "required": info.is_required(),
                }
                for field_name, info in settings_class.model_fields.items()
            ],
        )
        out.append(entry)
    return out


def _show_default(value: Any, metadata: Sequence[Any] = ()) -> str:
    """A setting's default as the docs write it: a duration as `10m`, a size as `5GiB`, a list with commas."""
    parsers = {getattr(m, "func", None) for m in metadata}
    if parse_duration in parsers and value is not None:
        return format_duration(parse_duration(value))
    if parse_size in parsers and value is not None:
        return format_size(parse_size(value))
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return ""
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return str(value)
