"""Least privilege, against a real nats-server whose users have exactly the sets
`uploads-consumer setup --print-permissions` prints: the admin's setup, the daemons (a consumer of the
upload stream and a stage after it), the operator's commands. And what a missing permission looks like:
said, naming the subject, never a silent stall or a bare timeout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import dead_letters, make_files, publish_raw, publish_uploads, until, wait_ready, wait_settled

from uploads_consumer import permissions
from uploads_consumer.config import Settings
from uploads_consumer.embedded import NatsServer, free_port

PASSWORD = "pw-for-tests"


def cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def printed(env: dict[str, str], role: str) -> str:
    """The role's block as `setup --print-permissions` prints it, for the consumer `env` configures."""
    out = cli(env, "setup", "--print-permissions", "--role", role)
    assert out.returncode == 0, out.stderr
    return out.stdout


def user(name: str, block: str) -> str:
    # The printed text goes into the server's configuration as it is: that is how an operator uses it.
    return f"    {{ user: {name}, password: {PASSWORD}\n{block}\n    }}"


def server_with(tmp_path: Path, users: dict[str, str]) -> NatsServer:
    conf = tmp_path / "nats.conf"
    conf.write_text(
        "authorization {\n  users = [\n" + "\n".join(user(name, block) for name, block in users.items()) + "\n  ]\n}\n"
    )
    return NatsServer(tmp_path / "nats", extra_args=["-c", str(conf)])


def as_user(env: dict[str, str], server: NatsServer, name: str, **extra: str) -> dict[str, str]:
    return {**env, "NATS_URL": server.url, "NATS_USER": name, "NATS_PASSWORD": PASSWORD, **extra}


def url_of(server: NatsServer, name: str) -> str:
    return server.url.replace("nats://", f"nats://{name}:{PASSWORD}@")


def violations(server: NatsServer) -> list[str]:
    return [line for line in server.log_path.read_text().splitlines() if "Violation" in line]


@pytest.fixture
def roles(daemon_env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The environment of each job: the consumer of the upload stream, and a stage after it."""
    process = {**daemon_env, "AUTO_SETUP": "false"}
    notify = {
        **process,
        "NATS_CONSUMER_NAME": "notify",
        "AFTER": "file_processor",
        "PROCESSORS": "webhook",
        "WEBHOOK_URL": "http://127.0.0.1:9/hook",
        "WEBHOOK_FORMAT": "slack",
        "HTTP_PORT": str(free_port()),
    }
    return {"process": process, "notify": notify}


async def test_each_role_works_with_exactly_the_permissions_setup_prints(
    tmp_path, roles, settings_for, webhook_receiver, start_daemon
):
    process, notify = roles["process"], roles["notify"]
    notify["WEBHOOK_URL"] = webhook_receiver.url + "/hook"
    for env in (process, notify):  # audited: the daemons anchor their chains, the operator verifies them
        env["AUDIT_URL"] = f"sqlite:///{tmp_path / 'audit.db'}"
    users = {
        # One user per role: the admin's two sets (one per consumer) as one.
        "admin": _union(printed(process, "admin"), printed(notify, "admin")),
        "daemon": printed(process, "daemon"),
        "stage": printed(notify, "daemon"),
        "operator": printed(process, "operator"),
        # The backend's own: publishing uploads (not one of ours; as a deployment would give it).
        "backend": 'permissions: { publish: { allow: ["file.uploads"] }, subscribe: { allow: ["_INBOX.>"] } }',
    }
    with server_with(tmp_path, users) as server:
        for env in (process, notify):
            made = cli(as_user(env, server, "admin"), "setup")
            assert made.returncode == 0 and "warning" not in made.stdout, made.stdout + made.stderr
        daemons = [
            start_daemon("process.log", **as_user(process, server, "daemon")),
            start_daemon("notify.log", **as_user(notify, server, "stage")),
        ]
        for daemon in daemons:
            await wait_ready(daemon)
        backend = settings_for(NATS_URL=url_of(server, "backend"))
        events = await publish_uploads(backend, make_files(tmp_path / "in", 3))
        await publish_raw(url_of(server, "backend"), "file.uploads", [b'{"test":"message"}'])
        admin = url_of(server, "admin")
        await wait_settled(admin, 4, daemon=daemons[0])
        await wait_settled(admin, 3, daemon=daemons[1], stream="FILE_PROCESSED", consumer="notify")
        assert sorted(d.webhook_id for d in webhook_receiver.deliveries) == sorted(e.event_id for e in events)

        operator = as_user(process, server, "operator")
        status = await until(lambda: _status_ready(operator), 10, "status showing the replica ready")
        assert "replicas                      1 reporting" in status, status
        keys = cli(operator, "keys", "check")
        assert keys.returncode == 0 and "checked 3 uploads: 3 current" in keys.stdout, keys.stdout + keys.stderr
        listed = cli(operator, "dlq", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout)["error_class"] == "invalid_message"
        replayed = cli(operator, "dlq", "replay", "--all")
        assert replayed.returncode == 0 and "to file.uploads.replay.file_processor" in replayed.stdout, replayed.stderr
        await until(lambda: _one_letter_again(url_of(server, "operator")), 30, "dead-lettered again", daemons[0])
        traced = cli(operator, "trace", events[0].file_uuid, "--json")
        assert traced.returncode == 0, traced.stderr
        assert {c["name"]: c["state"] for c in json.loads(traced.stdout)["consumers"]} == {
            "file_processor": "processed",
            "notify": "processed",
        }
        probe = cli(operator, "trace", "--seq", "4", "--json")
        assert probe.returncode == 0 and '"state": "dead_lettered"' in probe.stdout, probe.stderr
        await _the_console_reads_and_replays(operator, start_daemon, events[0].file_uuid, url_of(server, "operator"))
        for daemon in daemons:
            assert daemon.http_get("/readyz")[0] == 200
            assert daemon.terminate() == 0  # a clean stop anchors each chain's head
            assert "NATS refused" not in daemon.log_text() and "anchor not published" not in daemon.log_text()
        verified = cli(operator, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # The two daemons' chains, anchored at their clean stops; the console's (its replay's record) is not
        # anchored, and verify counts that record among those no anchor covers.
        assert "; 2 of 3 chains anchored; 1 record stored after their chain's last anchor" in verified.stdout, (
            verified.stdout
        )
        assert violations(server) == []


async def _the_console_reads_and_replays(operator: dict[str, str], start_daemon, file_uuid: str, url: str) -> None:
    """The console with the operator's user: its overview, an upload's timeline, and a replay."""
    import http.cookiejar
    import urllib.parse
    import urllib.request

    port = str(free_port())
    console = start_daemon(
        "console.log",
        args=["console"],
        **{**operator, "CONSOLE_PORT": port, "HTTP_PORT": port, "CONSOLE_REFRESH": "1s"},
    )
    console.wait_http(30)
    await until(lambda: console.http_get("/healthz")[0] == 200, 30, "the console read NATS", console)
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    base = f"http://127.0.0.1:{port}"
    assert "file_processor" in browser.open(base + "/").read().decode()
    assert "notify" in browser.open(f"{base}/upload/{file_uuid}").read().decode()
    letters = browser.open(base + "/dead-letters").read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', letters).group(1)
    seq = re.search(r'name="seq" value="(\d+)"', letters).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "seq": seq, "confirmed": "yes"}).encode()
    assert "Replayed 1" in browser.open(base + "/dead-letters/replay", data=form).read().decode()
    await until(lambda: _one_letter_again(url, after=int(seq)), 30, "dead-lettered once more", console)
    assert console.terminate() == 0
    assert "NATS refused" not in console.log_text() and "cannot read NATS" not in console.log_text()


def _status_ready(env: dict[str, str]) -> str | None:
    """status, once it shows a replica that said it is ready (in flight: as of its last report)."""
    status = cli(env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    return status.stdout if re.search(r"^  \S+/\d+ +ready; \d+ in flight$", status.stdout, re.M) else None


def _union(*blocks: str) -> str:
    """Two printed nats-conf blocks as one: the same keys, their subjects together."""
    publish, subscribe = [], []
    for block in blocks:
        section = None
        for line in block.splitlines():
            stripped = line.strip()
            if stripped.startswith("publish"):
                section = publish
            elif stripped.startswith("subscribe"):
                section = subscribe
            elif stripped.startswith('"') and section is not None and stripped not in section:
                section.append(stripped)
    return (
        "permissions: {\n  publish: { allow: [\n"
        + "\n".join(publish)
        + "\n  ] }\n  subscribe: { allow: [\n"
        + "\n".join(subscribe)
        + "\n  ] }\n}"
    )


async def _one_letter_again(url: str, after: int = 1) -> bool:
    letters = await dead_letters(url)
    return len(letters) == 1 and letters[0].seq > after


def without(block: str, subject: str) -> str:
    assert f'"{subject}"' in block, subject
    return "\n".join(line for line in block.splitlines() if line.strip() != f'"{subject}"')


async def test_a_missing_permission_is_said_with_its_subject_and_readiness_follows_pull_and_settle(
    tmp_path, roles, settings_for, start_daemon
):
    """Without the pull, or without the acknowledgements, /readyz is 503 saying which subject NATS refuses,
    the log says it once with what to grant, and `status` shows the replica's own view of it."""
    process = roles["process"]
    daemon_set = printed(process, "daemon")
    users = {
        "admin": printed(process, "admin"),
        "nopull": without(daemon_set, "$JS.API.CONSUMER.MSG.NEXT.FILE_UPLOADS.file_processor"),
        "noack": without(daemon_set, "$JS.ACK.FILE_UPLOADS.file_processor.>"),
        "operator": printed(process, "operator"),
        "backend": 'permissions: { publish: { allow: ["file.uploads"] }, subscribe: { allow: ["_INBOX.>"] } }',
    }
    with server_with(tmp_path, users) as server:
        assert cli(as_user(process, server, "admin"), "setup").returncode == 0
        nopull = start_daemon("nopull.log", **as_user(process, server, "nopull", HTTP_PORT=str(free_port())))
        reason = await until(lambda: _not_ready(nopull), 30, "readyz 503 with a reason", nopull)
        assert "NATS refuses publish on $JS.API.CONSUMER.MSG.NEXT.FILE_UPLOADS.file_processor" in reason
        assert nopull.http_get("/healthz")[0] == 200, "alive: a restart would not grant it"
        said = [line for line in nopull.log_text().splitlines() if "NATS refused a permission" in line]
        assert len(said) == 1 and "every permission a role needs" in said[0], said
        nopull.kill()

        noack = start_daemon("noack.log", **as_user(process, server, "noack", HTTP_PORT=str(free_port())))
        await wait_ready(noack)
        await publish_uploads(settings_for(NATS_URL=url_of(server, "backend")), make_files(tmp_path / "in", 1))
        reason = await until(lambda: _not_ready(noack), 30, "readyz 503 once an ack is refused", noack)
        assert "NATS refuses publish on $JS.ACK.FILE_UPLOADS.file_processor." in reason

        def status_says() -> str | None:
            shown = cli(as_user(process, server, "operator"), "status")
            assert shown.returncode == 0, shown.stdout + shown.stderr
            return shown.stdout if "NOT READY: NATS refuses publish on $JS.ACK" in shown.stdout else None

        # The replica writes its report in its bucket when its readiness changes: a moment after /readyz.
        await until(status_says, 10, "status showing the replica's refused acknowledgement", noack)
        assert sum("NATS refused a permission" in line for line in noack.log_text().splitlines()) == 1
        noack.kill()


def _not_ready(daemon) -> str | None:
    try:
        code, body = daemon.http_get("/readyz")
    except OSError:  # not listening yet
        return None
    return body if code == 503 and "refuses" in body else None


async def test_without_the_inbox_or_a_stream_lookup_the_daemon_says_what_to_grant(tmp_path, roles, start_daemon):
    """A user that may not subscribe to _INBOX.> (replies), or may not look the stream up, used to leave
    `/readyz` at 503 for ever saying "JetStream is not answering yet (TimeoutError)". NATS_INBOX_PREFIX
    gives it replies of its own on a shared account."""
    process = roles["process"]
    daemon_set = printed(process, "daemon")
    own_inbox = daemon_set.replace('"_INBOX.>"', '"_INBOX_fp.>"')
    users = {
        "admin": printed(process, "admin"),
        "noinfo": without(daemon_set, "$JS.API.STREAM.INFO.FILE_UPLOADS"),
        "ownbox": own_inbox,
        "noadvisory": without(daemon_set, "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.FILE_UPLOADS.file_processor"),
    }
    with server_with(tmp_path, users) as server:
        assert cli(as_user(process, server, "admin"), "setup").returncode == 0
        noinfo = start_daemon("noinfo.log", **as_user(process, server, "noinfo"))
        await until(
            lambda: "NATS refuses publish on $JS.API.STREAM.INFO.FILE_UPLOADS" in noinfo.log_text(), 40, "said", noinfo
        )
        assert "not answering" not in noinfo.log_text()
        noinfo.kill()
        wrong = start_daemon("wrong.log", **as_user(process, server, "ownbox", HTTP_PORT=str(free_port())))
        await until(lambda: "allow subscribing to _INBOX.>" in wrong.log_text(), 40, "the inbox said", wrong)
        wrong.kill()
        right = start_daemon(
            "right.log", **as_user(process, server, "ownbox", NATS_INBOX_PREFIX="_INBOX_fp", HTTP_PORT=str(free_port()))
        )
        await wait_ready(right)
        assert right.terminate() == 0 and "NATS refused" not in right.log_text()
        # Without the advisory, the safety net for a message the server stops delivering is off: said.
        blind = start_daemon("blind.log", **as_user(process, server, "noadvisory", HTTP_PORT=str(free_port())))
        await wait_ready(blind)
        advisory = "subscribe $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.FILE_UPLOADS.file_processor"
        await until(lambda: advisory in blind.log_text(), 20, "the advisory said", blind)
        assert blind.terminate() == 0


async def test_auto_setup_with_a_user_that_may_not_create_stops_saying_so(tmp_path, roles, start_daemon):
    process = {**roles["process"], "AUTO_SETUP": "true"}
    with server_with(tmp_path, {"daemon": printed(roles["process"], "daemon")}) as server:
        daemon = start_daemon("daemon.log", **as_user(process, server, "daemon"))
        assert daemon.proc.wait(60) == 2, daemon.log_text()[-2000:]
        said = daemon.log_text()
        assert "AUTO_SETUP: is true, but NATS refuses this user publish on $JS.API.STREAM.CREATE." in said
        assert "set AUTO_SETUP=false and have an admin run `uploads-consumer setup`" in said


async def test_a_command_run_with_the_daemons_credentials_says_which_permission_and_role_it_needs(tmp_path, roles):
    process = roles["process"]
    users = {"admin": printed(process, "admin"), "daemon": printed(process, "daemon")}
    with server_with(tmp_path, users) as server:
        assert cli(as_user(process, server, "admin"), "setup").returncode == 0
        listed = cli(as_user(process, server, "daemon"), "dlq", "list")
        assert listed.returncode == 1
        assert listed.stderr.strip() == (
            "uploads-consumer: NATS refused this user publish on $JS.API.STREAM.INFO.FILE_UPLOADS_DLQ: `dlq list` "
            "needs the operator role's permissions (uploads-consumer setup --print-permissions --role operator)"
        )


def test_print_permissions_formats_and_the_iam_policy():
    settings = Settings(processors=("archive",), archive_bucket="arch", s3_bucket_name="uploads")  # type: ignore[call-arg]
    p = permissions.daemon(settings, fetches="object")
    policy = json.loads(permissions.render(p, "json"))["aws_policy"]
    assert policy["Statement"][0]["Action"] == ["s3:GetObject"]
    assert policy["Statement"][0]["Resource"] == ["arn:aws:s3:::uploads/uploads/*"]
    nsc = permissions.render(permissions.operator(settings), "nsc")
    assert "nsc edit user --name USER --allow-pub '" in nsc and "--allow-sub '_INBOX.>'" in nsc
    event_only = permissions.daemon(settings, fetches="event")
    assert event_only.aws == [], "a chain that reads only the event needs nothing of S3"


async def test_a_dead_letter_published_twice_is_stored_once_by_a_user_that_may_not_read_the_dead_letters(
    tmp_path, roles
):
    """A copy whose acknowledgement was lost is published again and comes back as a duplicate: that means
    stored. The daemon used to read the dead-letter stream to make sure; without that permission it logged
    'not stored', backed off past the duplicate window and stored a second copy."""
    import nats

    from uploads_consumer.deadletter import DeadLetterPublisher
    from uploads_consumer.errors import ErrorClass

    process = roles["process"]
    users = {
        "admin": printed(process, "admin"),
        "daemon": printed(process, "daemon"),
        "operator": printed(process, "operator"),
        "backend": 'permissions: { publish: { allow: ["file.uploads"] }, subscribe: { allow: ["_INBOX.>"] } }',
    }
    with server_with(tmp_path, users) as server:
        assert cli(as_user(process, server, "admin"), "setup").returncode == 0
        await publish_raw(url_of(server, "backend"), "file.uploads", [b"not an upload"])
        nc = await nats.connect(url_of(server, "daemon"))
        try:
            js = nc.jetstream(timeout=5)
            pull = await js.pull_subscribe_bind("file_processor", "FILE_UPLOADS")
            [msg] = await pull.fetch(1, timeout=5)
            publisher = DeadLetterPublisher(js, "file.uploads.dlq", "FILE_UPLOADS_DLQ", "file_processor")
            await publisher.publish(msg, ErrorClass.INVALID_MESSAGE, "not an upload")
            await publisher.publish(msg, ErrorClass.INVALID_MESSAGE, "not an upload")  # its ack "lost"
        finally:
            await nc.close()
        letters = await dead_letters(url_of(server, "operator"))
        assert [m.data for m in letters] == [b"not an upload"]
        assert violations(server) == []
