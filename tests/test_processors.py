"""The plugin interface: loading, per-processor settings, content types, and the `processors` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from uploads_consumer.errors import ConfigError
from uploads_consumer.processors import (
    ProcessorEnvironment,
    describe_installed,
    load_processor,
    load_processors,
    matches_any,
    variable_prefix,
)

TESTS = str(Path(__file__).parent)
ENV = ProcessorEnvironment(
    download_path=Path("/nowhere"), chain=(), max_retry_delay=300.0, registry=CollectorRegistry()
)


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)


def test_a_class_reads_its_own_prefixed_variables(monkeypatch):
    monkeypatch.setenv("AUDIT_ENDPOINT", "https://audit.example")
    monkeypatch.setenv("AUDIT_TIMEOUT", "2m")
    monkeypatch.setenv("ENDPOINT", "not mine")
    loaded = load_processor("uc_test_processor_classes:Audit", ENV)
    assert loaded.name == "Audit"
    assert loaded.instance is not None and loaded.instance.settings.endpoint == "https://audit.example"
    assert loaded.instance.settings.timeout == 120.0
    assert loaded.external_effect
    assert loaded.content_types == ("audio/*",)


def test_content_types_variable_overrides_the_default(monkeypatch):
    monkeypatch.setenv("AUDIT_ENDPOINT", "x")
    monkeypatch.setenv("AUDIT_CONTENT_TYPES", "video/*, application/pdf")
    loaded = load_processor("uc_test_processor_classes:Audit", ENV)
    assert loaded.content_types == ("video/*", "application/pdf")
    assert loaded.applies_to("application/pdf") and not loaded.applies_to("audio/mpeg")


def test_a_missing_required_variable_names_it(monkeypatch):
    monkeypatch.delenv("AUDIT_ENDPOINT", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_processor("uc_test_processor_classes:Audit", ENV)
    assert caught.value.reason == "AUDIT_ENDPOINT: is required"


def test_an_invalid_value_names_the_variable_never_the_value(monkeypatch):
    monkeypatch.setenv("AUDIT_ENDPOINT", "x")
    monkeypatch.setenv("AUDIT_LEVEL", "7")
    monkeypatch.setenv("AUDIT_TOKEN", "hunter2-secret")
    with pytest.raises(ConfigError) as caught:
        load_processor("uc_test_processor_classes:Audit", ENV)
    assert caught.value.reason.startswith("AUDIT_LEVEL: ") and "7" not in caught.value.reason
    monkeypatch.setenv("AUDIT_LEVEL", "1")
    monkeypatch.setenv("AUDIT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match=r"^AUDIT_TIMEOUT: ") as caught:
        load_processor("uc_test_processor_classes:Audit", ENV)
    assert "hunter2" not in caught.value.reason


async def test_start_loads_resources_and_can_refuse_with_the_variable(monkeypatch):
    monkeypatch.setenv("AUDIT_ENDPOINT", "unreachable")
    loaded = load_processor("uc_test_processor_classes:Audit", ENV)
    with pytest.raises(ConfigError, match="AUDIT_ENDPOINT"):
        await loaded.start()


def test_a_plain_async_function_applies_to_everything():
    loaded = load_processor("uc_test_plugins:record", ENV)
    assert loaded.name == "record" and loaded.instance is None and not loaded.external_effect
    assert loaded.applies_to("anything/at-all")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("uc_test_plugins:not_async", "not an async function"),
        ("uc_test_plugins:nothing_here", "cannot load"),
        ("no_such_module_xyz:proc", "cannot load"),
        ("nonexistent-processor", "unknown processor"),
    ],
)
def test_what_cannot_be_a_processor_is_a_configuration_error(spec, problem):
    with pytest.raises(ConfigError) as caught:
        load_processor(spec, ENV)
    assert caught.value.variable == "PROCESSORS" and problem in caught.value.reason


def test_a_chain_names_each_processor_once():
    with pytest.raises(ConfigError, match="more than once"):
        load_processors(("save", "save"), ENV)
    with pytest.raises(ConfigError, match="at least one"):
        load_processors((), ENV)


@pytest.mark.parametrize(
    ("content_type", "globs", "expected"),
    [
        ("audio/mpeg", ("audio/*",), True),
        ("AUDIO/MPEG", ("audio/*",), True),
        ("audio/mpeg; charset=binary", ("audio/mpeg",), True),
        ("video/mp4", ("audio/*", "video/mp4"), True),
        ("application/pdf", ("audio/*", "video/*"), False),
        ("text/plain", (), True),
        ("text/plain", ("*/*",), True),
    ],
)
def test_content_type_globs(content_type, globs, expected):
    assert matches_any(content_type, globs) is expected


def test_variable_prefixes():
    assert variable_prefix("transcribe") == "TRANSCRIBE_"
    assert variable_prefix("my-audit.v2") == "MY_AUDIT_V2_"


def test_installed_processors_are_listed_with_their_variables():
    installed = {entry["name"]: entry for entry in describe_installed()}
    assert "save" in installed
    assert [v["variable"] for v in installed["save"]["variables"]] == ["SAVE_CONTENT_TYPES"]


def test_the_processors_command_lists_them():
    result = subprocess.run(
        [sys.executable, "-m", "uploads_consumer", "processors"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "save  (uploads_consumer.processors.save:save)" in result.stdout
    assert "SAVE_CONTENT_TYPES" in result.stdout


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("AUDIT_ENDPOINT", "x")
    monkeypatch.setenv("AUDIT_TIMEOUT", "")
    loaded = load_processor("uc_test_processor_classes:Audit", ENV)
    assert loaded.instance is not None and loaded.instance.settings.timeout == 5.0
    monkeypatch.setenv("AUDIT_ENDPOINT", "")
    with pytest.raises(ConfigError, match="AUDIT_ENDPOINT: is required"):
        load_processor("uc_test_processor_classes:Audit", ENV)
