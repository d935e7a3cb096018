"""`uploads-consumer console`: the web console, an aiohttp app of server-rendered pages (Jinja2, every
value escaped) over the read model. A small vendored script refreshes the overview and selects letters;
every page works without it. Its own process: the daemons never serve it.

Pages: the overview (every consumer and stage, refreshed in the background by state.py), an upload's
timeline (timeline.py) found by file_uuid, event_id, sequence or email, the dead letters (filter, read,
replay with a confirmation), and usage from the audit trail. Security: auth.py, and the headers every
response carries (a Content-Security-Policy allowing no inline script, no framing).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web
from nats.aio.client import Client

from uploads_consumer.config import Settings
from uploads_consumer.connection import connect_options, describe_connect_error
from uploads_consumer.console.auth import Gate, Session, User
from uploads_consumer.console.charts import columns, rows, size_text
from uploads_consumer.console.letters import DeadLetter, letter_of
from uploads_consumer.console.state import ConsoleState
from uploads_consumer.console.timeline import Sources, TimelineBuilder, utc_ms
from uploads_consumer.deadletter import header_text
from uploads_consumer.errors import ConfigError, UploadsError, describe
from uploads_consumer.events import upload_of
from uploads_consumer.observability import get_logger, setup_logging
from uploads_consumer.replay import replay_dead_letters
from uploads_consumer.stages import read_pipeline
from uploads_consumer.stream_reader import Seen, scan

log = get_logger("uploads_consumer.console")

HERE = Path(__file__).parent
COOKIE = "uc_session"
PUBLIC = ("/login", "/static/", "/healthz")
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
LETTERS_SHOWN = 200
HEADERS = {
    # No inline script, no script from elsewhere, no framing; styles and the script from this origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
USAGE_SPANS = {"7d": 7, "30d": 30, "90d": 90}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Console:
    """The app's state: settings, who may come in, what was read, the audit trail."""

    def __init__(self, settings: Settings, audit: Any = None) -> None:
        check_settings(settings)
        self.settings = settings
        self.gate = Gate(settings)
        self.state = ConsoleState(settings)
        self.audit = audit
        self.nc: Client | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value is text unless a template says otherwise, which none does
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["size"] = size_text
        self.templates.globals["size_text"] = size_text
        self.templates.globals["plain"] = str
        self.templates.filters["utc"] = utc_ms
        self.templates.globals["json"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False)
        self._email_scan = asyncio.Lock()

    @property
    def js(self) -> Any:
        return self.state.js

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers, self._who, self._csrf], client_max_size=64 * 1024)
        app.router.add_get("/", self.overview)
        app.router.add_get("/overview/consumers", self.overview_rows)
        app.router.add_get("/search", self.search)
        app.router.add_get("/upload", self.upload_by_seq)
        app.router.add_get("/upload/{key}", self.upload)
        app.router.add_get("/dead-letters", self.dead_letters)
        app.router.add_get("/dead-letters/{seq:\\d+}", self.dead_letter)
        app.router.add_post("/dead-letters/replay", self.replay)
        app.router.add_get("/usage", self.usage)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_static("/static/", HERE / "static", show_index=False, follow_symlinks=False)
        return app

    # -- middlewares

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and aiohttp's own errors carry them too
            for name, value in HEADERS.items():
                exc.headers.setdefault(name, value)
            raise
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        # How long the page took here, for a browser's developer tools and bench/console.py.
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - began) * 1000:.1f}"
        return response

    @web.middleware
    async def _who(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        gate = self.gate
        if gate.open and request.host.rsplit(":", 1)[0] not in LOCAL_HOSTS and request.host not in LOCAL_HOSTS:
            # Without sign-in, only a loopback name: another site's page rebinding its name here reads nothing.
            return self._page(request, "error.html", status=421, message="This console answers loopback names only.")
        session = gate.session(request.cookies.get(COOKIE))
        user = gate.from_proxy(request.remote, request.headers.get(gate.proxy_header))
        if user is None and gate.open:
            user = User("local", "operator")
        if user is not None and (session is None or session.user is None or session.user.name != user.name):
            session = gate.new_session(user)
            request["new_session"] = session
        elif session is not None:
            user = session.user
        request["session"] = session
        request["user"] = user
        if user is None and not request.path.startswith(PUBLIC):
            if request.method == "GET":
                raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
            return self._page(request, "error.html", status=401, message="Sign in first.")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _keep(request, exc)
            raise
        _keep(request, response)
        return response

    @web.middleware
    async def _csrf(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            form = await request.post()
            token = form.get("csrf")
            if not self.gate.csrf_ok(request.get("session"), token if isinstance(token, str) else None):
                log.warning("console refused a POST without its CSRF token", path=request.path, remote=request.remote)
                return self._page(
                    request,
                    "error.html",
                    status=403,
                    message="Refused: this form's CSRF token is missing or wrong. Reload the page and try again.",
                )
        return await handler(request)

    # -- rendering

    def _page(self, request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
        session: Session | None = request.get("session")
        user: User | None = request.get("user")
        snapshot = self.state.snapshot
        text = self.templates.get_template(template).render(
            user=user,
            csrf=session.csrf if session is not None else "",
            path=request.path,
            problem=snapshot.problem,
            connected=self.js is not None,
            refreshed=utc_ms(int(snapshot.at * 1000)) if snapshot.at else None,
            refresh_seconds=self.settings.console_refresh,
            audit=self.audit is not None,
            **context,
        )
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")

    def _need_nats(self, request: web.Request) -> web.Response | None:
        if self.js is None:
            return self._page(request, "error.html", status=503, message="Not connected to NATS yet.")
        return None

    # -- overview

    async def overview(self, request: web.Request) -> web.Response:
        snapshot = self.state.snapshot
        return self._page(request, "overview.html", rows=snapshot.rows, took_ms=snapshot.took_ms, title="Overview")

    async def overview_rows(self, request: web.Request) -> web.Response:
        return self._page(request, "_consumers.html", rows=self.state.snapshot.rows)

    # -- uploads

    async def search(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "").strip()
        if UUID.match(query):
            raise web.HTTPSeeOther(f"/upload/{query.lower()}")
        if query.isdigit():
            raise web.HTTPSeeOther(f"/upload?seq={query}")
        if "@" in query and len(query) <= 320:
            return await self._person(request, query)
        return self._page(
            request,
            "search.html",
            query=query,
            uploads=None,
            title="Search",
            how=None,
            message="Enter a file_uuid, an event_id, a stream sequence or an email." if query else None,
        )

    async def _person(self, request: web.Request, email: str) -> web.Response:
        """That person's uploads: from the audit trail's index, else from the dead letters and a scan of the
        upload stream (one at a time: it reads the whole stream)."""
        uploads: dict[str, dict[str, Any]] = {}
        if self.audit is not None:
            for record in await self.audit.lookup(email):
                if record["email"] != email or not record["file_uuid"]:
                    continue
                entry = uploads.setdefault(
                    record["file_uuid"],
                    {
                        "file_uuid": record["file_uuid"],
                        "first": record["recorded_at"],
                        "filename": None,
                        "outcomes": {},
                    },
                )
                entry["filename"] = entry["filename"] or record["filename"]
                entry["outcomes"][record["consumer"]] = record["outcome"]
            how = "the audit trail"
        else:
            if (refused := self._need_nats(request)) is not None:
                return refused
            needle = json.dumps(email)[1:-1].encode()
            found: list[Seen] = []
            began = time.monotonic()

            def visit(seen: Seen) -> bool:
                if needle in seen.data:
                    event = upload_of(seen.data)
                    if event is not None and event.email == email:
                        found.append(seen)
                return False

            async with self._email_scan:
                read = await scan(self.js, self.settings.nats_stream_name, visit, subject=self.settings.nats_subject)
            for seen in found:
                event = upload_of(seen.data)
                assert event is not None
                uploads.setdefault(
                    event.file_uuid,
                    {
                        "file_uuid": event.file_uuid,
                        "first": seen.time_ns // 1_000_000,
                        "filename": event.stored_name,
                        "outcomes": {},
                    },
                )
            for letter in self.state.letters.letters.values():
                if letter.email == email and letter.file_uuid:
                    entry = uploads.setdefault(
                        letter.file_uuid,
                        {"file_uuid": letter.file_uuid, "first": None, "filename": None, "outcomes": {}},
                    )
                    entry["outcomes"][letter.consumer] = "dead_lettered"
            how = f"a scan of {read} messages of {self.settings.nats_stream_name} ({time.monotonic() - began:.1f} s) and the dead letters; set AUDIT_URL for an index"
        listed = sorted(uploads.values(), key=lambda u: u["first"] or 0, reverse=True)
        return self._page(
            request, "search.html", query=email, uploads=listed, how=how, message=None, title="Uploads of a person"
        )

    async def upload(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not UUID.match(key):
            return self._page(request, "error.html", status=404, message="Not a file_uuid or an event_id.")
        return await self._timeline(request, key.lower(), None)

    async def upload_by_seq(self, request: web.Request) -> web.Response:
        seq = request.query.get("seq", "")
        if not seq.isdigit():
            return self._page(request, "error.html", status=404, message="Give a stream sequence.")
        return await self._timeline(request, None, int(seq))

    async def _timeline(self, request: web.Request, key: str | None, seq: int | None) -> web.Response:
        if (refused := self._need_nats(request)) is not None:
            return refused
        topology = await read_pipeline(self.js, self.settings)
        sources = Sources(self.js, self.settings, topology, self.state.letters, self.audit)
        timeline = await TimelineBuilder(sources).build(key, seq)
        if timeline is None:
            what = f"sequence {seq}" if seq is not None else key
            return self._page(request, "error.html", status=404, message=f"No upload {what} was found.")
        trace_url = None
        trace_id = timeline.upload.trace_id or next((c.trace_id for c in timeline.consumers if c.trace_id), None)
        if self.settings.console_trace_url and trace_id:
            trace_url = self.settings.console_trace_url.replace("{trace_id}", trace_id)
        return self._page(request, "upload.html", t=timeline, trace_url=trace_url, trace_id=trace_id, title="Upload")

    # -- dead letters

    async def dead_letters(self, request: web.Request) -> web.Response:
        consumer = request.query.get("consumer") or None
        error_class = request.query.get("class") or None
        letters = self.state.letters.of(consumer, error_class)
        counts = self.state.letters.by_class()
        consumers = sorted(set(counts) | set(self.state.snapshot.topology.nodes))
        classes = sorted({c for per in counts.values() for c in per})
        return self._page(
            request,
            "dead_letters.html",
            letters=letters[:LETTERS_SHOWN],
            total=len(letters),
            consumers=consumers,
            classes=classes,
            consumer=consumer,
            error_class=error_class,
            title="Dead letters",
        )

    async def dead_letter(self, request: web.Request) -> web.Response:
        if (refused := self._need_nats(request)) is not None:
            return refused
        seq = int(request.match_info["seq"])
        try:
            msg = await self.js.get_msg(self.settings.dlq_stream_name, seq=seq)
        except Exception:  # noqa: BLE001 - gone (replayed), or never there
            return self._page(
                request, "error.html", status=404, message=f"No dead letter {seq} (replayed, or never there)."
            )
        letter = letter_of(seq, msg.headers or {}, msg.data or b"", self.settings)
        headers = {k: header_text(v) for k, v in (msg.headers or {}).items()}
        try:
            body = json.dumps(json.loads(msg.data or b""), indent=2, ensure_ascii=False)
        except ValueError:
            body = (msg.data or b"").decode("utf-8", "replace")
        return self._page(
            request, "dead_letter.html", letter=letter, headers=headers, body=body, title=f"Dead letter {seq}"
        )

    async def replay(self, request: web.Request) -> web.Response:
        user: User = request["user"]
        if not user.may_replay:
            log.warning("console refused a replay to a viewer", user=user.name)
            return self._page(request, "error.html", status=403, message="Viewers cannot replay: an operator can.")
        if (refused := self._need_nats(request)) is not None:
            return refused
        form = await request.post()
        letters = self._chosen(form)
        if not letters:
            return self._page(request, "error.html", status=400, message="No dead letter chosen (or they are gone).")
        if form.get("confirmed") != "yes":
            return self._page(request, "confirm.html", letters=letters, form=form, title="Replay?")
        by_seq = {x.seq: x for x in letters}

        async def record_first(msg: Any, consumer: str, subject: str) -> None:
            letter = by_seq[msg.seq]
            if self.audit is not None:
                await self.audit.record_replay(letter, user.name, subject)

        report = await replay_dead_letters(self.js, self.settings, sorted(by_seq), before=record_first)
        for done in report.replayed:
            letter = by_seq[done.seq]
            log.info(
                "dead letter replayed from the console",
                user=user.name,
                dead_letter_seq=done.seq,
                consumer=done.consumer,
                subject=done.subject,
                event_id=letter.event_id,
                file_uuid=letter.file_uuid,
                error_class=letter.error_class,
            )
        for not_done in report.not_replayed:
            log.warning(
                "dead letter not replayed", user=user.name, dead_letter_seq=not_done.seq, reason=not_done.reason
            )
        await self.state.letters.refresh(self.js)
        return self._page(request, "replayed.html", report=report, letters=by_seq, title="Replayed")

    def _chosen(self, form: Any) -> list[DeadLetter]:
        index = self.state.letters
        if form.get("all_of_class") == "yes":
            consumer, error_class = form.get("consumer") or None, form.get("error_class") or None
            if consumer is None or error_class is None:
                return []
            return sorted(index.of(str(consumer), str(error_class)), key=lambda x: x.seq)
        seqs = {int(v) for v in form.getall("seq", []) if isinstance(v, str) and v.isdigit()}
        return [index.letters[s] for s in sorted(seqs) if s in index.letters]

    # -- usage

    async def usage(self, request: web.Request) -> web.Response:
        consumers = sorted(self.state.snapshot.topology.nodes) or [self.settings.nats_consumer_name]
        consumer = request.query.get("consumer") or self.settings.nats_consumer_name
        span = request.query.get("since", "7d")
        report = await self._report(consumer, USAGE_SPANS.get(span, 7)) if self.audit is not None else None
        return self._page(
            request,
            "usage.html",
            report=report,
            consumers=consumers,
            consumer=consumer,
            since=span,
            spans=USAGE_SPANS,
            title="Usage",
        )

    async def _report(self, consumer: str, days: int) -> dict[str, Any]:
        """The audit report by day, type and user, with the charts drawn from it."""
        since_ms = int((time.time() - days * 86400) * 1000)
        by_day, by_type, by_user = await asyncio.gather(
            self.audit.report(since_ms, "day", consumer),
            self.audit.report(since_ms, "type", consumer),
            self.audit.report(since_ms, "user", consumer),
        )
        types = sorted(by_type, key=lambda g: -g["uploads"])
        top_users = sorted(by_user, key=lambda g: (-g["uploads"], str(g["group"])))[:10]
        return {
            "days": by_day,
            "types": types,
            "users": top_users,
            "uploads_chart": columns([(str(g["group"]), int(g["uploads"])) for g in by_day]),
            "bytes_chart": columns([(str(g["group"]), int(g["bytes"])) for g in by_day]),
            "types_chart": rows([(str(g["group"]), int(g["uploads"])) for g in types[:10]]),
            "users_chart": rows([(str(g["group"]), int(g["uploads"])) for g in top_users]),
        }

    # -- signing in

    async def login_page(self, request: web.Request) -> web.Response:
        if request.get("user") is not None:
            raise web.HTTPSeeOther("/")
        session = request.get("session")
        if session is None:
            session = self.gate.new_session(None)
            request["new_session"] = session
            request["session"] = session
        return self._page(
            request, "login.html", next=_safe_next(request.query.get("next")), message=None, title="Sign in"
        )

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        target = _safe_next(str(form.get("next", "/")))
        user, wait = await self.gate.sign_in(name, password, request.remote or "-")
        if wait > 0:
            log.warning(
                "console sign-in refused for now", user=name[:100], remote=request.remote, retry_after_s=round(wait)
            )
            response = self._page(
                request,
                "login.html",
                status=429,
                next=target,
                title="Sign in",
                message=f"Too many failed attempts: try again in {int(wait) + 1} s.",
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        if user is None:
            log.warning("console sign-in failed", user=name[:100], remote=request.remote)
            return self._page(
                request, "login.html", status=401, next=target, message="Wrong name or password.", title="Sign in"
            )
        self.gate.end(request.cookies.get(COOKIE))  # a new session: no fixation
        session = self.gate.new_session(user)
        log.info("console sign-in", user=user.name, role=user.role, remote=request.remote)
        response = web.HTTPSeeOther(target)
        _set_cookie(request, response, session)
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        self.gate.end(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def healthz(self, request: web.Request) -> web.Response:
        snapshot = self.state.snapshot
        fresh = snapshot.at and time.time() - snapshot.at < 3 * self.settings.console_refresh + 10
        if self.js is None or not fresh:
            return web.Response(status=503, text="not ready: " + (snapshot.problem or "NATS not read yet"))
        return web.Response(text="ok")


def _keep(request: web.Request, response: web.StreamResponse) -> None:
    """The cookie of a session made for this request (HttpOnly, SameSite=Strict; Secure over https)."""
    fresh: Session | None = request.get("new_session")
    if fresh is not None:
        _set_cookie(request, response, fresh)


def _set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
    response.set_cookie(COOKIE, session.token, httponly=True, samesite="Strict", secure=secure, path="/")


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this console, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return quote(target, safe="/?=&%-_.~")


def check_settings(settings: Settings) -> None:
    """What the console refuses to start with (exit 2), besides the users file (auth.Gate)."""
    url = settings.console_trace_url
    if url is not None and (not url.startswith(("http://", "https://")) or "{trace_id}" not in url):
        raise ConfigError("CONSOLE_TRACE_URL", "must be an http(s) URL with {trace_id} in it")


async def _connect(settings: Settings, console: Console, stopping: asyncio.Event) -> None:
    """Connect to NATS, again and again until it answers; then the state follows it."""
    import nats

    said = None
    while not stopping.is_set():
        try:
            nc = await nats.connect(
                **connect_options(settings, "uploads-consumer-console"),
                connect_timeout=5,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=2,
            )
        except Exception as exc:  # noqa: BLE001
            problem = describe_connect_error(exc, settings)
            if problem != said:
                log.warning("console cannot reach NATS; retrying", error=problem)
                said = problem
            console.state.snapshot.problem = f"cannot reach NATS: {problem}"
            try:
                await asyncio.wait_for(stopping.wait(), 2)
            except TimeoutError:
                pass
            continue
        console.nc = nc
        console.state.js = nc.jetstream(timeout=10)
        log.info("console connected to NATS")
        return


async def serve(settings: Settings) -> int:
    """Run the console until SIGTERM or SIGINT."""
    setup_logging(settings.log_level, settings.log_format)
    audit = None
    if settings.audit_url is not None:
        from uploads_consumer.console.audit_source import AuditSource

        audit = AuditSource(settings)
    console = Console(settings, audit)
    if audit is not None:
        try:
            await audit.open()
        except (UploadsError, OSError) as exc:
            raise ConfigError("AUDIT_URL", f"the console cannot open the audit trail ({describe(exc)})") from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runner = web.AppRunner(console.app(), access_log=None)  # no access log: a search's query can be an email
    await runner.setup()
    site = web.TCPSite(runner, settings.console_bind, settings.console_port)
    await site.start()
    log.info(
        "console listening",
        address=f"http://{settings.console_bind}:{settings.console_port}/",
        sign_in="open (loopback)" if console.gate.open else "users file" if console.gate.users else "trusted proxy",
        users=len(console.gate.users),
    )
    await _connect(settings, console, stopping)
    refresher = asyncio.create_task(console.state.run(stopping))
    await stopping.wait()
    refresher.cancel()
    await asyncio.gather(refresher, return_exceptions=True)
    await runner.cleanup()
    if console.nc is not None:
        await console.nc.close()
    if audit is not None:
        await audit.close()
    log.info("console stopped")
    return 0
