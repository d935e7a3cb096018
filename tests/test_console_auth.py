"""The console's rules that need no server: its users file, who may come in from where, the sign-in throttle,
where a sign-in may send the browser, and what of an upload's outputs a page may show."""

from __future__ import annotations

import subprocess
import sys
import time

import bcrypt
import pytest

from uploads_consumer.config import Settings
from uploads_consumer.console import auth
from uploads_consumer.console.app import _safe_next, check_settings
from uploads_consumer.console.auth import Gate, Throttle, hash_password, load_users
from uploads_consumer.console.timeline import summarize
from uploads_consumer.errors import ConfigError

HTPASSWD_B = "$2y$05$Z0pTb0T9YQH3cZCdP0l8peM4m0mS4L3c6G2s8l3n4Y8P1pLr4xB2K"  # the shape `htpasswd -nbB` prints


def settings(**values) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


def test_the_users_file_takes_htpasswd_lines_and_roles_and_names_a_bad_line_without_its_hash(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# comment\n\nana:{HTPASSWD_B}:operator\nvic:{HTPASSWD_B}\nproxied::operator\n")
    users = load_users(path)
    assert {n: u.role for n, u in users.items()} == {"ana": "operator", "vic": "viewer", "proxied": "operator"}
    assert users["proxied"].password_hash is None, "signs in through the proxy only"
    for bad, said in (
        ("ana:plaintext", "line 1: not a bcrypt hash"),
        (f"ana:{HTPASSWD_B}:admin", "line 1: the role must be viewer or operator"),
        ("just-a-name", "line 1 is not name:hash or name:hash:role"),
        (f"ana:{HTPASSWD_B}\nana:{HTPASSWD_B}", "line 2: ana is listed twice"),
    ):
        path.write_text(bad)
        with pytest.raises(ConfigError) as refused:
            load_users(path)
        assert (
            said in refused.value.reason
            and HTPASSWD_B not in refused.value.reason
            and "plaintext" not in refused.value.reason
        )


def test_beyond_loopback_someone_must_sign_in(tmp_path):
    with pytest.raises(ConfigError) as refused:
        Gate(settings(console_bind="0.0.0.0"))
    assert refused.value.reason.startswith("CONSOLE_BIND: is 0.0.0.0, not loopback, and no one would have to sign in")
    assert Gate(settings(console_bind="127.0.0.1")).open
    assert Gate(settings(console_bind="::1")).open
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('ana-password', 4)}:operator\n")
    assert not Gate(settings(console_bind="0.0.0.0", console_users_file=str(users))).open
    assert not Gate(settings(console_bind="0.0.0.0", console_trusted_proxy="10.0.0.0/8")).open


def test_a_trusted_proxy_names_the_user_and_the_users_file_gives_the_role(tmp_path):
    users = tmp_path / "users"
    users.write_text("ana::operator\n")
    gate = Gate(settings(console_bind="0.0.0.0", console_users_file=str(users), console_trusted_proxy="10.1.0.0/16"))
    assert gate.from_proxy("10.1.2.3", "ana") == auth.User("ana", "operator")
    assert gate.from_proxy("10.1.2.3", "bob") == auth.User("bob", "viewer"), "listed nowhere: reads only"
    assert gate.from_proxy("192.168.1.9", "ana") is None, "anyone else may not name a user"
    assert gate.from_proxy("10.1.2.3", None) is None


async def test_a_right_password_signs_in_and_an_unknown_name_takes_as_long_as_a_wrong_password(tmp_path):
    users = tmp_path / "users"
    users.write_text(f"ana:{hash_password('ana-password', 8)}:operator\n")
    gate = Gate(settings(console_users_file=str(users)))
    user, wait = await gate.sign_in("ana", "ana-password", "127.0.0.1")
    assert user is not None and user.role == "operator" and wait == 0
    began = time.monotonic()
    assert await gate.sign_in("ana", "wrong", "127.0.0.2") == (None, 0.0)
    known = time.monotonic() - began
    began = time.monotonic()
    assert await gate.sign_in("nobody", "wrong", "127.0.0.3") == (None, 0.0)
    unknown = time.monotonic() - began
    assert unknown > known / 4, (known, unknown)  # a bcrypt check either way, never an early "no such user"


def test_from_the_fifth_failure_every_attempt_waits_longer_and_a_success_forgets(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    throttle = Throttle()
    keys = ["name:eve", "address:127.0.0.1"]
    for _ in range(4):
        throttle.failed(keys)
        assert throttle.wait(keys) == 0
    throttle.failed(keys)
    assert throttle.wait(keys) == auth.FIRST_LOCK
    throttle.failed(keys)
    assert throttle.wait(keys) == 2 * auth.FIRST_LOCK
    assert throttle.wait(["name:ana"]) == 0, "another name, from another address"
    now[0] += 2 * auth.FIRST_LOCK
    assert throttle.wait(keys) == 0
    throttle.succeeded(keys)
    throttle.failed(keys)
    assert throttle.wait(keys) == 0
    now[0] += auth.FAILURE_WINDOW + 1
    for _ in range(4):
        throttle.failed(keys)
    assert throttle.wait(keys) == 0, "failures older than the window no longer count"


@pytest.mark.parametrize(
    ("asked", "goes"),
    [
        ("/upload/1cbfac96-1cb1-45b2-a682-39c0de4ea705", "/upload/1cbfac96-1cb1-45b2-a682-39c0de4ea705"),
        ("/dead-letters?consumer=notify&class=not_found", "/dead-letters?consumer=notify&class=not_found"),
        ("//evil.example.com/", "/"),
        ("https://evil.example.com/", "/"),
        ("/\\evil.example.com", "/"),
        (None, "/"),
    ],
)
def test_after_signing_in_the_browser_goes_to_a_page_of_the_console_only(asked, goes):
    assert _safe_next(asked) == goes


def test_a_trace_link_is_an_http_url_with_the_trace_id():
    check_settings(settings(console_trace_url="https://jaeger.example.com/trace/{trace_id}"))
    for bad in ("javascript:alert(1)//{trace_id}", "https://jaeger.example.com/search"):
        with pytest.raises(ConfigError, match="CONSOLE_TRACE_URL"):
            check_settings(settings(console_trace_url=bad))


def test_what_came_out_of_the_file_is_shown_by_its_length_and_paths_whole():
    path = "/data/downloads/ana@example.com/" + "x" * 300 + "/memo.m4a"
    outputs = {
        "transcribe": {"text": "the words of the memo", "language": "en", "txt_path": path, "segments": [1, 2, 3]},
        "webhook": {"status": 200, "answer": "y" * 500},
    }
    assert summarize(outputs) == {
        "transcribe": {"text": "(21 characters)", "language": "en", "txt_path": path, "segments": "(3 items)"},
        "webhook": {"status": 200, "answer": "(500 characters)"},
    }


def test_console_user_prints_a_line_the_console_reads_and_bcrypt_verifies(tmp_path):
    made = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "console", "user", "ana", "--role", "operator"],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "users").write_text(made.stdout)
    ana = load_users(tmp_path / "users")["ana"]
    assert ana.role == "operator" and ana.password_hash is not None
    assert bcrypt.checkpw(b"correct horse battery", ana.password_hash)
    assert "correct horse" not in made.stdout
