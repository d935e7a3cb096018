"""Who may use the console, and as what: users, sessions, CSRF tokens and the sign-in throttle.

Three ways in, as the operator configures it:
- CONSOLE_USERS_FILE: `name:hash[:role]` lines, bcrypt hashes (htpasswd's `-B` output works as it is),
  signed in with a form; a session cookie then carries the user (HttpOnly, SameSite=Strict);
- CONSOLE_TRUSTED_PROXY: a request from one of those addresses names its user in a header (the proxy
  signed them in); the role is the users file's for that name, else `viewer`;
- neither: the console is open to whoever reaches it, as `operator`, which it allows on loopback only
  (and only for requests naming a loopback host: a page of another site cannot rebind its name here).

Roles: `viewer` reads every page; `operator` also replays dead letters. Every POST carries the session's
CSRF token. Failed sign-ins are counted per name and per address: from the fifth within 15 minutes,
each further attempt is refused for a while (30 s, doubling up to 15 minutes), the right password too.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from uploads_consumer.config import Settings
from uploads_consumer.errors import ConfigError

ROLES = ("viewer", "operator")
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
FREE_FAILURES = 4
FAILURE_WINDOW = 15 * 60.0
FIRST_LOCK = 30.0
LONGEST_LOCK = 15 * 60.0


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: bytes | None = None
    """None: signs in through the trusted proxy only."""

    @property
    def may_replay(self) -> bool:
        return self.role == "operator"


def load_users(path: Path) -> dict[str, User]:
    """CONSOLE_USERS_FILE: `name:hash[:role]` a line; `#` comments and blank lines ignored. ConfigError naming
    the line (never its hash) for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("CONSOLE_USERS_FILE", f"cannot read {path} ({exc.strerror})") from None
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ConfigError("CONSOLE_USERS_FILE", f"line {number} is not name:hash or name:hash:role")
        name, hashed, role = parts[0], parts[1], parts[2] if len(parts) == 3 else "viewer"
        if role not in ROLES:
            raise ConfigError("CONSOLE_USERS_FILE", f"line {number}: the role must be viewer or operator")
        if hashed and not hashed.startswith(BCRYPT_PREFIXES):
            raise ConfigError("CONSOLE_USERS_FILE", f"line {number}: not a bcrypt hash ($2b$…; htpasswd -nB {name})")
        if name in users:
            raise ConfigError("CONSOLE_USERS_FILE", f"line {number}: {name} is listed twice")
        users[name] = User(name, role, hashed.encode() if hashed else None)
    return users


def hash_password(password: str, rounds: int = 12) -> str:
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def _networks(entries: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(entry, strict=False) for entry in entries]
    except ValueError as exc:
        raise ConfigError("CONSOLE_TRUSTED_PROXY", f"not an address or network ({exc})") from None


def is_loopback_bind(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass
class Session:
    token: str
    csrf: str
    user: User | None
    expires: float


@dataclass
class Throttle:
    """Failed sign-ins per key (a name, an address): when each failed, and until when it is locked."""

    failures: dict[str, list[float]] = field(default_factory=dict)
    locked: dict[str, float] = field(default_factory=dict)

    def wait(self, keys: list[str]) -> float:
        """Seconds before these keys may try again; 0 when they may now."""
        now = time.monotonic()
        return max([0.0, *(self.locked.get(k, 0.0) - now for k in keys)])

    def failed(self, keys: list[str]) -> None:
        now = time.monotonic()
        for key in keys:
            recent = [t for t in self.failures.get(key, []) if now - t < FAILURE_WINDOW] + [now]
            self.failures[key] = recent
            beyond = len(recent) - FREE_FAILURES
            if beyond > 0:
                self.locked[key] = now + min(LONGEST_LOCK, FIRST_LOCK * 2 ** (beyond - 1))
        if len(self.failures) > 100_000:  # a flood of names: keep the newest only
            for key in sorted(self.failures, key=lambda k: self.failures[k][-1])[:50_000]:
                self.failures.pop(key, None)
                self.locked.pop(key, None)

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self.failures.pop(key, None)
            self.locked.pop(key, None)


class Gate:
    """The console's users, sessions and throttle."""

    def __init__(self, settings: Settings) -> None:
        self.users = load_users(settings.console_users_file) if settings.console_users_file else {}
        self.proxies = _networks(settings.console_trusted_proxy)
        self.proxy_header = settings.console_proxy_user_header
        self.open = not settings.console_users_file and not self.proxies
        """No authentication configured: loopback only, everyone an operator."""
        if self.open and not is_loopback_bind(settings.console_bind):
            raise ConfigError(
                "CONSOLE_BIND",
                f"is {settings.console_bind}, not loopback, and no one would have to sign in: set "
                "CONSOLE_USERS_FILE (uploads-consumer console user NAME) or CONSOLE_TRUSTED_PROXY, or bind 127.0.0.1",
            )
        self.sessions: dict[str, Session] = {}
        self.throttle = Throttle()
        # A hash of nothing anyone knows, at the users' own cost: an unknown name takes as long to refuse as
        # a known one (no telling them apart by time).
        costs = [int(u.password_hash.split(b"$")[2]) for u in self.users.values() if u.password_hash]
        self._unknown = hash_password(secrets.token_hex(16), max(costs, default=12)).encode() if self.users else b""

    # -- sessions

    def new_session(self, user: User | None) -> Session:
        self._expire()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, time.time() + SESSION_SECONDS)
        self.sessions[session.token] = session
        return session

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self.sessions.get(token)
        if session is None or session.expires < time.time():
            self.sessions.pop(token or "", None)
            return None
        return session

    def end(self, token: str | None) -> None:
        self.sessions.pop(token or "", None)

    def _expire(self) -> None:
        """Past MAX_SESSIONS, the expired ones go, then the oldest: a flood of clients costs no more memory."""
        if len(self.sessions) <= MAX_SESSIONS:
            return
        now = time.time()
        for token in [t for t, s in self.sessions.items() if s.expires < now]:
            del self.sessions[token]
        for token in sorted(self.sessions, key=lambda t: self.sessions[t].expires)[: len(self.sessions) - MAX_SESSIONS]:
            del self.sessions[token]

    @staticmethod
    def csrf_ok(session: Session | None, token: str | None) -> bool:
        return session is not None and bool(token) and hmac.compare_digest(session.csrf, token or "")

    # -- who is asking

    def from_proxy(self, peer: str | None, header_value: str | None) -> User | None:
        """The user a trusted proxy names; None when the request is not from one, or names nobody."""
        if not self.proxies or not peer or not header_value:
            return None
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return None
        if not any(address in network for network in self.proxies):
            return None
        name = header_value.strip()
        if not name or len(name) > 200:
            return None
        listed = self.users.get(name)
        return User(name, listed.role if listed else "viewer")

    async def sign_in(self, name: str, password: str, address: str) -> tuple[User | None, float]:
        """(the user, 0) when the password is right; (None, seconds to wait) when refused for now, else (None, 0)."""
        import bcrypt

        keys = [f"name:{name.lower()}", f"address:{address}"]
        wait = self.throttle.wait(keys)
        if wait > 0:
            return None, wait
        user = self.users.get(name)
        hashed = user.password_hash if user is not None and user.password_hash else self._unknown
        if not hashed:  # no users file: only the proxy signs anyone in
            self.throttle.failed(keys)
            return None, 0.0
        right = await asyncio.to_thread(bcrypt.checkpw, password.encode()[:72], hashed)
        if right and user is not None and user.password_hash:
            self.throttle.succeeded(keys)
            return user, 0.0
        self.throttle.failed(keys)
        return None, 0.0
