"""The reference pages generated from the code (scripts/gen_docs.py) are current, and complete: every
command and flag, every variable with a description, every metric the daemon serves."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from uploads_consumer.cli import build_parser
from uploads_consumer.config import Settings, variable_descriptions
from uploads_consumer.observability import Metrics

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTIONS = variable_descriptions()  # read from config.py's source once, not once per variable
sys.path.insert(0, str(ROOT / "scripts"))
import gen_docs  # noqa: E402


def test_every_generated_page_is_what_the_code_makes_now():
    assert gen_docs.stale() == [], f"stale generated pages: run `{gen_docs.COMMAND}`"


def test_the_check_names_the_stale_page_and_the_command_that_mends_it(monkeypatch, capsys):
    monkeypatch.setitem(gen_docs.GENERATED, "docs/reference/cli.md", lambda: "a newer parser's page\n")
    assert gen_docs.main(["--check"]) == 1
    said = capsys.readouterr().err
    assert "docs/reference/cli.md" in said and "python scripts/gen_docs.py" in said


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("uploads-consumer",)):
    yield path, parser
    for name, sub in gen_docs._subcommands(parser):
        yield from commands(sub, (*path, name))


def test_the_cli_reference_has_every_command_flag_and_example():
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for path, parser in commands(build_parser()):
        assert f"`{' '.join(path)}`" in page
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):  # every command has -h, --help: the page says so once
                continue
            for option in action.option_strings:
                assert f"`{option}`" in page, (path, option)
        for line in (parser.epilog or "").splitlines():
            if line.strip().startswith("uploads-consumer") or "uploads-consumer " in line:
                assert line.strip() in page, line


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_daemon_variable_is_described_in_the_configuration_reference(name):
    assert DESCRIPTIONS.get(name), f"{name.upper()}: give the field a docstring (it becomes the variable's description)"
    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    assert re.search(rf"^\| `{name.upper()}` \|", page, re.M)


def test_every_installed_processor_has_its_section_and_variables_in_the_configuration_reference():
    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    from uploads_consumer.processors import describe_installed

    for processor in describe_installed():
        assert f"### `{processor['name']}`" in page
        for variable in processor.get("variables", []):
            assert f"| `{variable['variable']}` |" in page


def test_every_metric_a_daemon_serves_is_in_the_metrics_reference():
    page = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    served = [line.split()[2:4] for line in Metrics().render().decode().splitlines() if line.startswith("# TYPE")]
    assert len(served) > 10
    for name, kind in served:
        if name.endswith("_created"):  # prometheus_client's start time of each counter and histogram: the page says so
            continue
        assert f"`{name.removesuffix('_total')}{'_total' if kind == 'counter' else ''}`" in page, name
