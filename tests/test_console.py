"""The web console in a real browser (Playwright driving Debian's chromium) against the real console process,
two daemons, nats-server and S3 (console_world.py): an operator finds an upload and replays its dead letter
to processed; what the console refuses (a POST without its CSRF token, a viewer's replay, a sixth sign-in
after five wrong passwords); and what no page ever does (run markup from an upload, show a secret)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from console_world import HOSTILE_NAME, TRACE_ID, World, build_world
from helpers import until
from playwright.sync_api import Page, expect, sync_playwright
from system import require_tool

from uploads_consumer.console.auth import hash_password
from uploads_consumer.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "images"  # written with UPDATE_SCREENSHOTS=1: the README's and the site's
PASSWORDS = {"ana": "ana-operator-pw", "vic": "vic-viewer-pw", "eve": "eve-operator-pw"}
# Debian's chromium, headless, as root in a closed network: no sandbox, no calls home (see docs/development.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's browser, but Debian's (Playwright's own download is not reachable here)."""
    return {**browser_type_launch_args, "executable_path": require_tool("chromium"), "args": CHROMIUM_ARGS}


# pytest-playwright's session-wide Playwright, narrowed to this module: its sync API keeps an event loop
# running on the main thread for as long as it lives, and every asyncio test after this module needs
# that thread free. Its `page`, `context` and artifacts work on these as on its own.
@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as started:
        yield started


@pytest.fixture(scope="module")
def browser_type(playwright, browser_name):
    return getattr(playwright, browser_name)


@pytest.fixture(scope="module")
def browser(browser_type, browser_type_launch_args):
    launched = browser_type.launch(**browser_type_launch_args)
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def browser_context_args():
    return {"viewport": {"width": 1280, "height": 720}}


def run_async(coroutine):
    """Playwright's sync API keeps an event loop of its own on this thread: the world's coroutines run on another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture
def world(tmp_path, daemon_env, start_daemon, settings_for, s3_client, bucket) -> World:
    return run_async(build_world(tmp_path, daemon_env, start_daemon, settings_for, s3_client, bucket))


@pytest.fixture
def console(world, tmp_path, start_daemon):
    """The console, as a process of its own, signing in ana (operator), vic (viewer) and eve (operator)."""
    users = tmp_path / "console-users"
    users.write_text(
        "# name:bcrypt:role\n"
        f"ana:{hash_password(PASSWORDS['ana'], 4)}:operator\n"
        f"vic:{hash_password(PASSWORDS['vic'], 4)}\n"
        f"eve:{hash_password(PASSWORDS['eve'], 4)}:operator\n"
    )
    port = str(free_port())
    process = start_daemon(
        "console.log",
        args=["console"],
        **{
            **world.env,
            "CONSOLE_PORT": port,
            "HTTP_PORT": port,
            "CONSOLE_USERS_FILE": str(users),
            "CONSOLE_REFRESH": "1s",
            "CONSOLE_TRACE_URL": "https://jaeger.example.com/trace/{trace_id}",
        },
    )
    process.wait_http(30)
    run_async(until(lambda: process.http_get("/healthz")[0] == 200, 30, "the console read NATS", process))
    process.url = f"http://127.0.0.1:{port}"
    return process


def screenshot(page: Page, name: str) -> None:
    if os.environ.get("UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def sign_in(page: Page, url: str, name: str, password: str | None = None) -> None:
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(password or PASSWORDS[name])
    page.get_by_role("button", name="Sign in").click()


def test_an_operator_finds_an_upload_opens_its_dead_letter_and_replays_it_to_processed(world, console, page: Page):
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    url = console.url
    sign_in(page, url, "ana")
    expect(page.locator("#consumers tr")).to_have_count(3)  # process, notify and later, every one of them
    expect(page.locator("#consumers")).to_contain_text("not_found 1")
    screenshot(page, "console-overview.png")

    ok = world.uploads["ok"]
    page.get_by_placeholder("file_uuid, event_id, sequence or email").fill(ok.file_uuid)
    page.get_by_role("button", name="Find").click()
    expect(page).to_have_url(f"{url}/upload/{ok.file_uuid}")
    states = {"process": "processed", "notify": "processed", "later": "pending"}
    for name, state in states.items():
        expect(page.locator(f"li[data-consumer={name}] .state")).to_have_text(state)
    # The file's name is markup: shown as the text it is, never run.
    expect(page.locator(".filename")).to_contain_text(HOSTILE_NAME)
    assert page.locator("main img").count() == 0
    expect(page.get_by_role("link", name=TRACE_ID)).to_have_attribute(
        "href", f"https://jaeger.example.com/trace/{TRACE_ID}"
    )
    # The uploader's other uploads, by email: this one among them.
    page.get_by_role("link", name="ana@example.com").click()
    expect(page.locator("h1")).to_have_text("Uploads of ana@example.com")
    expect(page.get_by_role("link", name=ok.file_uuid)).to_be_visible()
    page.go_back()
    screenshot(page, "console-upload.png")

    page.get_by_role("link", name="Dead letters").click()
    missing = world.uploads["missing"]
    page.locator("table.letters").get_by_role("link", name=missing.file_uuid).wait_for()
    letter = page.locator("table.letters tbody tr").filter(has_text=missing.file_uuid)
    letter.get_by_role("link").first.click()
    expect(page.locator("h1")).to_have_text(re.compile(r"Dead letter \d+"))
    expect(page.locator("main")).to_contain_text("not_found")
    expect(page.locator("table.headers")).to_contain_text("Uploads-Error-Class")

    world.restore_missing()  # what was wrong is mended; now the replay can succeed
    page.get_by_role("button", name="Replay to process…").click()
    expect(page.locator("h1")).to_have_text("Replay 1 dead letter?")
    page.get_by_role("button", name="Replay 1").click()
    expect(page.locator("h1")).to_have_text("Replayed 1")
    page.get_by_role("link", name="follow the upload").click()
    expect(page).to_have_url(f"{url}/upload/{missing.file_uuid}")
    process_state = page.locator("li[data-consumer=process] .state")
    for _ in range(60):
        if process_state.inner_text() == "processed":
            break
        page.wait_for_timeout(250)
        page.reload()
    expect(process_state).to_have_text("processed")
    expect(page.locator("li[data-consumer=notify] .state")).to_have_text("processed")
    assert dialogs == []

    # Usage, from the audit trail: process's three uploads today (ok, held, and missing once replayed).
    page.get_by_role("link", name="Usage").click()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    day = page.locator("table").first.locator("tbody tr").filter(has_text=today).locator("td")
    expect(day).to_have_text([today, "3", "12.0 KiB", "1", "0", "1"])  # uploads, bytes, failures, retries, duplicates
    expect(page.locator("section.pair").last).to_contain_text("ana@example.com")
    assert page.locator("svg.chart rect").count() >= 3

    # Recorded: who, what, when, in the console's log and in the audit trail.
    said = [line for line in console.log_text().splitlines() if "dead letter replayed from the console" in line]
    assert len(said) == 1 and '"user": "ana"' in said[0] and missing.event_id in said[0]
    audit = sqlite3.connect(world.env["AUDIT_URL"].removeprefix("sqlite:///"))
    (replayed,) = audit.execute(
        "SELECT consumer, event_id, reason FROM audit_records WHERE outcome = 'replayed'"
    ).fetchall()
    assert replayed[:2] == ("process", missing.event_id) and replayed[2].startswith("replayed by ana from the console")


def test_the_console_refuses_a_forged_post_a_viewers_replay_and_a_guessed_password(world, console, page: Page, browser):
    url = console.url
    sign_in(page, url, "ana")
    expect(page.locator("#consumers tr")).to_have_count(3)
    headers = page.request.get(url + "/").headers
    assert (
        "script-src 'self'" in headers["content-security-policy"]
        and "unsafe-inline" not in headers["content-security-policy"]
    )
    for path in ("/", "/dead-letters", "/usage", f"/upload/{world.uploads['ok'].file_uuid}"):
        html = page.request.get(url + path).text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), f"inline script on {path}"
        for secret in (world.env["ENCRYPTION_MASTER_KEY"], world.env["AWS_SECRET_ACCESS_KEY"]):
            assert secret not in html, f"a secret on {path}"

    # A POST without the session's CSRF token (what another site's form would send) changes nothing.
    letters = page.request.get(url + "/dead-letters").text()
    seq = re.search(r'name="seq" value="(\d+)"', letters).group(1)
    forged = page.request.post(url + "/dead-letters/replay", form={"seq": seq, "confirmed": "yes"})
    assert forged.status == 403 and "CSRF" in forged.text()
    assert f'name="seq" value="{seq}"' in page.request.get(url + "/dead-letters").text(), "still there"

    viewer = browser.new_context()
    vic = viewer.new_page()
    sign_in(vic, url, "vic")
    vic.goto(url + "/dead-letters")
    expect(vic.locator("table.letters tbody tr")).to_have_count(1)
    assert (
        vic.locator("input[name=seq]").count() == 0
        and vic.get_by_role("button", name=re.compile("Replay")).count() == 0
    )
    token = vic.locator("input[name=csrf]").first.get_attribute("value")
    refused = vic.request.post(url + "/dead-letters/replay", form={"csrf": token, "seq": seq, "confirmed": "yes"})
    assert refused.status == 403 and "Viewers cannot replay" in refused.text()
    assert f'name="seq" value="{seq}"' in page.request.get(url + "/dead-letters").text(), "still there"
    viewer.close()

    # The operator replays all of a class, after a confirmation (the letter fails again: nothing was mended).
    page.goto(url + "/dead-letters?consumer=process&class=not_found")
    page.get_by_role("button", name="Replay all 1 not_found of process…").click()
    expect(page.locator("h1")).to_have_text("Replay 1 dead letter?")
    page.get_by_role("button", name="Replay 1").click()
    expect(page.locator("h1")).to_have_text("Replayed 1")

    # Five wrong passwords, then even the right one waits.
    guesser = browser.new_context()
    eve = guesser.new_page()
    for attempt in range(5):
        sign_in(eve, url, "eve", f"wrong-{attempt}")
        expect(eve.get_by_role("alert")).to_have_text("Wrong name or password.")
    sign_in(eve, url, "eve")
    expect(eve.get_by_role("alert")).to_contain_text("Too many failed attempts: try again in")
    assert "console sign-in refused for now" in console.log_text()
    guesser.close()


def test_the_console_will_not_listen_beyond_loopback_without_sign_in(daemon_env):
    import subprocess
    import sys

    env = {**daemon_env, "CONSOLE_BIND": "0.0.0.0", "CONSOLE_PORT": str(free_port())}
    out = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "console"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "CONSOLE_BIND: is 0.0.0.0, not loopback, and no one would have to sign in" in out.stderr
