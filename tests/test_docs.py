"""The documentation stays true to the code: every variable the daemon or a built-in processor reads is in
the contract, every local link resolves, and nothing points outside the repository."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from uploads_consumer.config import Settings
from uploads_consumer.processors import describe_installed

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = (ROOT / "docs" / "contract.md").read_text()
BUILT_IN = {
    "save",
    "scan",
    "transcode",
    "transcribe",
    "webhook",
    "archive",
    "image",
    "video",
    "email",
    "sms",
    "extract",
}
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("variable", sorted(name.upper() for name in Settings.model_fields))
def test_every_daemon_variable_is_in_the_contract(variable):
    assert f"`{variable}`" in CONTRACT


def built_in_variables() -> list[str]:
    processors = [p for p in describe_installed() if p["name"] in BUILT_IN]
    assert {p["name"] for p in processors} == BUILT_IN, [p.get("error") for p in processors]
    return sorted(v["variable"] for p in processors for v in p["variables"])


@pytest.mark.parametrize("variable", built_in_variables())
def test_every_built_in_processor_variable_is_in_the_contract(variable):
    assert f"`{variable}`" in CONTRACT or (variable.endswith("_CONTENT_TYPES") and "`{NAME}_CONTENT_TYPES`" in CONTRACT)


def contract_defaults() -> dict[str, str]:
    """The default column of each one-variable row of the contract's tables."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", CONTRACT, re.M)}


def shown_defaults() -> list[tuple[str, str]]:
    processors = [p for p in describe_installed() if p["name"] in BUILT_IN]
    return [
        (v["variable"], v["default"])
        for p in processors
        for v in p["variables"]
        if v["default"] and not v["variable"].endswith("_CONTENT_TYPES")
    ]


@pytest.mark.parametrize(("variable", "default"), shown_defaults(), ids=lambda x: x)
def test_processors_shows_each_default_as_the_contract_writes_it(variable, default):
    # `uploads-consumer processors` printed '5368709120' and '600.0' where the contract says 5GiB and 10m.
    assert contract_defaults().get(variable) == f"`{default}`"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve_and_nothing_points_outside_the_repository(doc):
    text = doc.read_text()
    assert "/".join(("..", "shared")) not in text  # the team's shelf beside the checkout; spelled so grep finds none
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name}: {target} is outside the repository"
        assert resolved.exists(), f"{doc.name}: {target} does not exist"


def test_readme_anchors_exist():
    text = (ROOT / "README.md").read_text()
    headings = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)
    }
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in headings, anchor


def test_the_site_builds_with_every_link_and_anchor_resolved(tmp_path):
    """`mkdocs build --strict` (mkdocs.yml turns missing anchors into warnings, which strict makes fatal)."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "asyncapi" / "index.html").exists()


def test_every_page_is_in_the_sites_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert [p for p in pages if p not in nav] == []


def cited_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every `test_x.py::test_y` and following `::test_z` a document cites."""
    cited, current = [], None
    for cell in re.findall(r"`([^`]+)`", text):
        if m := re.fullmatch(r"(test_\w+\.py)(?:::(\w+))?", cell):
            current, name = m.group(1), m.group(2)
        elif m := re.fullmatch(r"::(\w+)", cell):
            name = m.group(1)
        else:
            continue
        if name and current:
            cited.append((current, name))
    return cited


def test_every_test_security_md_cites_exists():
    cited = cited_tests((ROOT / "SECURITY.md").read_text())
    assert len(cited) > 40
    missing = [(f, t) for f, t in cited if f"def {t}(" not in (ROOT / "tests" / f).read_text()]
    assert missing == []


def numbered_lists(text: str) -> list[list[int]]:
    """The numbers of each top-level numbered list (`1. …` at the start of a line), in order; a heading,
    or a line of text at the left margin that is not an item, ends a list."""
    lists: list[list[int]] = []
    current: list[int] = []
    for line in text.splitlines():
        if m := re.match(r"^(\d+)\. ", line):
            current.append(int(m.group(1)))
        elif line and not line[0].isspace() and current:
            lists.append(current)
            current = []
    if current:
        lists.append(current)
    return lists


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_numbered_steps_count_one_by_one(doc):
    for numbers in numbered_lists(doc.read_text()):
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"{doc.name}: steps {numbers}"


def page_block(page: str, heading: str) -> str:
    """The first ```sh block under a heading of a page of the site."""
    text = (ROOT / "docs" / page).read_text()
    section = text[text.index(heading) :]
    return section[section.index("```sh\n") + 6 : section.index("\n```", section.index("```sh\n"))]


def test_the_lines_without_docker_work_as_written(tmp_path):
    """Run as a user would (on free ports instead of 4222, 9000 and 8081): a NATS server with JetStream,
    an S3 endpoint with the bucket, setup, a daemon with its own HTTP_PORT, an upload it processes."""
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from uploads_consumer.embedded import clean_environment, free_port

    block = page_block("getting-started.md", "## Without Docker, on one host")
    assert "nats-server -js" in block and "create_bucket(Bucket='uploads')" in block and "HTTP_PORT=" in block
    ports = {port: str(free_port()) for port in ("4222", "9000", "8081")}
    for port, free in ports.items():
        block = block.replace(port, free)
    block = block.replace("pip install -e '.[demo]'", ":")  # installed already
    # A person types the next line once the servers are up; the script waits for their ports.
    block = block.replace("export NATS_URL", f"up {ports['4222']}; up {ports['9000']}; export NATS_URL", 1)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    script = (
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n"
        "up() { for _ in $(seq 150); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; "
        "return 1; }\n"
        + block
        + "\nfor _ in $(seq 150); do ls downloads/*/*/README.md >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 9\n"
    )
    env = clean_environment(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its servers and daemon in a group of their own, ended whatever happens
    )
    try:
        out, err = shell.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
    assert shell.returncode == 0, out[-2000:] + err[-3000:]
    assert "created " in out and "published 1 upload" in out
    [saved] = (tmp_path / "downloads").glob("*/*/README.md")
    assert saved.read_bytes() == (ROOT / "README.md").read_bytes()


def test_the_processor_table_says_transcode_alone_keeps_no_wav():
    # The WAV lives in the message's private work folder and goes with it (contract 9.5): the table said
    # `transcode` makes a WAV, and a user running it alone looked for one.
    table = (ROOT / "docs" / "processors" / "index.md").read_text()
    [row] = [line for line in table.splitlines() if line.startswith("| `transcode` |")]
    assert "private work folder" in row and "`transcode` alone keeps nothing" in row


def commands() -> list[str]:
    """Every command line the CLI takes, `audit verify` and the like for those with actions."""
    import argparse

    from uploads_consumer.cli import build_parser

    def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(found[0].choices) if found else {}

    return [
        f"{name} {action}" if action else name
        for name, sub in actions(build_parser()).items()
        for action in (actions(sub) or {"": sub})
    ]


@pytest.mark.parametrize("command", commands())
def test_every_command_is_in_the_contracts_command_table(command):
    assert f"| `uploads-consumer {command}" in CONTRACT
