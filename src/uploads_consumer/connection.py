"""Connecting to NATS with the configured servers, credentials and TLS."""

from __future__ import annotations

import ssl
from typing import Any

import nats
from nats.aio.client import Client

from uploads_consumer.config import Settings
from uploads_consumer.errors import UploadsError


def servers(settings: Settings) -> list[str]:
    return [s.strip() for s in settings.nats_url.split(",") if s.strip()]


def redact_url(url: str) -> str:
    """nats://user:pass@host → nats://***@host, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
    if settings.nats_tls_cert:
        ctx.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key) if settings.nats_tls_key else None)
    return ctx


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    opts: dict[str, Any] = {"servers": servers(settings), "name": name}
    if settings.nats_user:
        opts["user"] = settings.nats_user
    if settings.nats_password:
        opts["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token:
        opts["token"] = settings.nats_token.get_secret_value()
    if settings.nats_creds:
        opts["user_credentials"] = str(settings.nats_creds)
    if settings.nats_nkey:
        opts["nkeys_seed"] = str(settings.nats_nkey)
    tls = tls_context(settings)
    if tls is not None:
        opts["tls"] = tls
    return opts


class NatsUnavailable(UploadsError):
    """A one-shot command could not connect."""


async def connect_once(settings: Settings, name: str, timeout: float = 5) -> Client:
    """For short-lived commands: try each server twice, then fail with one clear line."""
    problems: list[BaseException] = []

    async def remember(exc: Exception) -> None:  # nats-py's default prints a traceback per attempt
        problems.append(exc)

    try:
        return await nats.connect(
            **connect_options(settings, name),
            connect_timeout=timeout,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # nats-py treats 0 as "forever" when choosing a server
            reconnect_time_wait=0.2,
            error_cb=remember,
        )
    except Exception as exc:  # noqa: BLE001
        cause = problems[-1] if problems else exc
        urls = ", ".join(redact_url(u) for u in servers(settings))
        raise NatsUnavailable(f"cannot reach NATS at {urls}: {type(cause).__name__}: {cause}") from None
