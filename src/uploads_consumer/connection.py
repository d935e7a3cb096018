"""Connecting to NATS with the configured servers, credentials and TLS."""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from uploads_consumer.config import Settings
from uploads_consumer.errors import ConfigError, UploadsError, describe
from uploads_consumer.provision import subject_matches


def servers(settings: Settings) -> list[str]:
    return [s.strip() for s in settings.nats_url.split(",") if s.strip()]


def redacted_servers(settings: Settings) -> str:
    """NATS_URL's servers for a message: comma-separated, credentials hidden."""
    return ", ".join(redact_url(u) for u in servers(settings))


def redact_url(url: str) -> str:
    """nats://user:pass@host → nats://***@host, for messages (also without a scheme: user:pass@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url  # nats-py accepts host:port without a scheme, credentials included
    if "@" in rest:
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
    return url


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("NATS_TLS_CA", f"cannot load {settings.nats_tls_ca} ({_reason(exc)})") from None
    if settings.nats_tls_cert:
        try:
            ctx.load_cert_chain(
                str(settings.nats_tls_cert), str(settings.nats_tls_key) if settings.nats_tls_key else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "NATS_TLS_CERT",
                f"cannot load the certificate and key ({_reason(exc)}); check NATS_TLS_CERT and NATS_TLS_KEY",
            ) from None
    return ctx


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__


def _check_secret_file(variable: str, path: Path, what: str, *markers: str) -> None:
    """nats-py reads these files only when it connects, and a wrong one fails obscurely (a .creds
    file without its JWT block even loops forever): check them now, naming the file, never its content."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path} ({exc.strerror})") from None
    if not all(marker in text for marker in markers):
        raise ConfigError(variable, f"{path} is not {what}")


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments. Raises ConfigError for an unreadable TLS, .creds or nkey file."""
    opts: dict[str, Any] = {"servers": servers(settings), "name": name, "inbox_prefix": settings.nats_inbox_prefix}
    if settings.nats_user:
        opts["user"] = settings.nats_user
    if settings.nats_password:
        opts["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token:
        opts["token"] = settings.nats_token.get_secret_value()
    if settings.nats_creds:
        _check_secret_file(
            "NATS_CREDS",
            settings.nats_creds,
            "a .creds file (user JWT and nkey seed blocks)",
            "BEGIN NATS USER JWT",
            "BEGIN USER NKEY SEED",
        )
        opts["user_credentials"] = str(settings.nats_creds)
    if settings.nats_nkey:
        _check_secret_file("NATS_NKEY", settings.nats_nkey, "a user nkey seed (SU...)", "SU")
        opts["nkeys_seed"] = str(settings.nats_nkey)
    tls = tls_context(settings)
    if tls is not None:
        opts["tls"] = tls
    return opts


_DENIED = re.compile(r'Permissions Violation for (Publish|Subscription) to "?([^"\s]+)"?', re.IGNORECASE)


def denial(exc: BaseException, known: Sequence[str] = ()) -> tuple[str, str] | None:
    """("publish" or "subscribe", subject) when the server refused this client a permission, else None.
    NATS does not answer a request whose publish it refused: the requester only times out.

    nats-py lowers the case of the server's error, subject included, and NATS subjects have a case: the
    subject is given back as the first of `known` (subjects or patterns the caller may use) it matches,
    written as that one is."""
    match = _DENIED.search(str(exc))
    if match is None:
        return None
    kind = "publish" if match.group(1).lower() == "publish" else "subscribe"
    subject = match.group(2)
    # A subject itself before a pattern that takes it in (`$JS.API.STREAM.INFO.FILE_UPLOADS`, not `…INFO.*`).
    for pattern in sorted(known, key=lambda k: "*" in k or ">" in k):
        if subject_matches(pattern.lower(), subject.lower()):
            return kind, pattern
    return kind, subject


def known_subjects(settings: Settings, streams: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Every subject or pattern a role of this consumer uses, as `setup --print-permissions` writes them."""
    from uploads_consumer import permissions

    sets = [permissions.daemon(settings, streams), permissions.operator(settings), permissions.admin(settings, streams)]
    s = settings
    named = [
        s.nats_stream_name,
        s.nats_result_stream_name,
        s.dlq_stream_name,
        *(f"KV_{b}" for b in [s.dedupe_bucket] if b),
    ]
    reads = [f"$JS.API.STREAM.{verb}.{name}" for name in named for verb in ("INFO", "MSG.GET")]
    return [*reads, *(subject for p in sets for subject in (*p.publish, *p.subscribe))]


def grant_hint(kind: str, subject: str, settings: Settings) -> str:
    """What to allow, and where to find the whole set."""
    if kind == "subscribe" and subject.startswith(settings.nats_inbox_prefix + "."):
        return (
            f"allow subscribing to {settings.nats_inbox_prefix}.> (replies to its requests), or set "
            "NATS_INBOX_PREFIX to a prefix it may subscribe to"
        )
    return f"allow {kind} on {subject}; every permission a role needs: uploads-consumer setup --print-permissions"


class NatsUnavailable(UploadsError):
    """A one-shot command could not connect."""


def describe_connect_error(exc: BaseException, settings: Settings) -> str:
    """One line saying why a connection failed, and what to check when it will not fix itself."""
    text = describe(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted ({exc.verify_message}); NATS_TLS_CA must name the CA that signed it"
    if isinstance(exc, ssl.SSLError) and any(k in (exc.reason or "") for k in ("CERTIFICATE", "UNKNOWN_CA")):
        return f"TLS: the server refused the client certificate ({exc.reason.lower()}); check NATS_TLS_CERT and NATS_TLS_KEY"
    if "authorization violation" in str(exc).lower():
        return (
            "the server refused the credentials (Authorization Violation); check NATS_USER/NATS_PASSWORD, "
            "NATS_TOKEN, NATS_CREDS, NATS_NKEY or the user:pass in NATS_URL"
        )
    uses_tls = settings.nats_tls_ca or settings.nats_tls_cert or any(u.startswith("tls://") for u in servers(settings))
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and uses_tls:
        # With TLS 1.3 a server checks the client certificate after the handshake and may just hang up
        # (reset, broken pipe or lost connection, whichever the client sees first: one description for all).
        return "TLS: the server hung up while we connected; it may not accept the client certificate (check NATS_TLS_CERT and NATS_TLS_KEY)"
    return text


async def connect_once(
    settings: Settings,
    name: str,
    timeout: float = 5,
    on_denied: Callable[[tuple[str, str]], None] | None = None,
) -> Client:
    """For short-lived commands: try each server twice, then fail with one clear line. `on_denied` hears
    each permission the server refuses the connection (see `command_connection`)."""
    problems: list[BaseException] = []
    options = connect_options(settings, name)  # a bad TLS/.creds/nkey file is a ConfigError (exit 2)

    known = known_subjects(settings) if on_denied is not None else []

    async def remember(exc: Exception) -> None:  # nats-py's default prints a traceback per attempt
        if (refused := denial(exc, known)) is not None and on_denied is not None:
            on_denied(refused)
        else:
            problems.append(exc)

    try:
        return await nats.connect(
            **options,
            connect_timeout=timeout,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # nats-py treats 0 as "forever" when choosing a server
            reconnect_time_wait=0.2,
            error_cb=remember,
        )
    except Exception as exc:  # noqa: BLE001
        cause = problems[-1] if problems else exc
        raise NatsUnavailable(
            f"cannot reach NATS at {redacted_servers(settings)}: {describe_connect_error(cause, settings)}"
        ) from None


@contextlib.asynccontextmanager
async def command_connection(settings: Settings, command: str, role: str) -> AsyncIterator[Client]:
    """The connection of one command (`status`, `dlq list`, ...), closed at the end. NATS does not answer
    a request it refuses this user: what would end as `nats: timeout` says instead which permission is
    missing and which role the command needs. A server without JetStream is said plainly too."""
    refused: list[tuple[str, str]] = []
    nc = await connect_once(settings, f"uploads-consumer-{command.replace(' ', '-')}", on_denied=refused.append)
    try:
        yield nc
    except ServiceUnavailableError as exc:
        if no_jetstream(exc):
            raise NatsUnavailable(no_jetstream_reason(settings)) from None
        raise
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        if not refused:
            raise
        kind, subject = refused[-1]
        raise UploadsError(
            f"NATS refused this user {kind} on {subject}: `{command}` needs the {role} role's permissions "
            f"(uploads-consumer setup --print-permissions --role {role})"
        ) from exc
    finally:
        await nc.close()


def no_jetstream(exc: BaseException) -> bool:
    """Whether a JetStream request failed because nothing answers JetStream's API at all: a server
    started without JetStream (no responders; nats-py's ServiceUnavailableError with no description)."""
    return isinstance(exc, ServiceUnavailableError) and not exc.description


def no_jetstream_reason(settings: Settings) -> str:
    return (
        f"the server at {redacted_servers(settings)} has no JetStream: start nats-server with -js "
        "(or `jetstream {}` in its configuration)"
    )


async def require_jetstream(js: JetStreamContext, settings: Settings) -> None:
    """For one-shot commands: a server without JetStream is said plainly (NatsUnavailable), not as
    `ServiceUnavailableError … description='None'` or `no response from stream`."""
    try:
        await js.account_info()
    except Exception as exc:
        if no_jetstream(exc):
            raise NatsUnavailable(no_jetstream_reason(settings)) from None
        raise
