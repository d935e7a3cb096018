"""The plugin interface: loading, per-processor settings, content types, and the `processors` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from uploads_consumer.embedded import clean_environment
from uploads_consumer.errors import ConfigError
from uploads_consumer.processors import (
    Need,
    ProcessorEnvironment,
    chain_need,
    describe_chain,
    describe_installed,
    load_processor,
    load_processors,
    matches_any,
    parse_entry,
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


def processors_command(*args: str, **variables: str) -> subprocess.CompletedProcess:
    env = clean_environment(**variables)
    for name in list(env):
        if name.startswith(("EMAIL_", "WEBHOOK_")):
            del env[name]
    command = [sys.executable, "-m", "uploads_consumer", "processors", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [["--chain"], ["--chain", "--json"], []], ids=["chain", "json", "all"])
def test_the_processors_command_exits_2_for_a_chain_naming_an_unknown_processor(args):
    result = processors_command(*args, PROCESSORS="save,nope")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("uploads-consumer: configuration error: PROCESSORS: unknown processor 'nope'"), line
    assert "nope" in result.stdout, "the chain is still shown, with the entry that cannot load"


def test_the_processors_command_exits_2_naming_every_required_variable_that_is_unset():
    result = processors_command("--chain", PROCESSORS="save,email")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "uploads-consumer: configuration error: EMAIL_SMTP_URL: is required",
        "uploads-consumer: configuration error: EMAIL_FROM: is required",
    ]


def test_a_processor_with_several_variables_missing_names_them_all_at_once(monkeypatch):
    for name in ("EMAIL_SMTP_URL", "EMAIL_FROM"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_processor("email", ENV)
    assert caught.value.reason == "EMAIL_SMTP_URL: is required; EMAIL_FROM: is required"


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("AUDIT_ENDPOINT", "x")
    monkeypatch.setenv("AUDIT_TIMEOUT", "")
    loaded = load_processor("uc_test_processor_classes:Audit", ENV)
    assert loaded.instance is not None and loaded.instance.settings.timeout == 5.0
    monkeypatch.setenv("AUDIT_ENDPOINT", "")
    with pytest.raises(ConfigError, match="AUDIT_ENDPOINT: is required"):
        load_processor("uc_test_processor_classes:Audit", ENV)


# ---- instances: name:instance --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "target", "name"),
    [
        ("webhook", "webhook", "webhook"),
        ("webhook:ops", "webhook", "webhook:ops"),
        ("uc_test_plugins:slow", "uc_test_plugins:slow", "slow"),
        ("uc_test_plugins:slow:eu", "uc_test_plugins:slow", "slow:eu"),
        ("my.pkg:Notify", "my.pkg:Notify", "Notify"),
    ],
)
def test_a_chain_entry_is_a_processor_or_module_attribute_with_an_optional_instance(spec, target, name):
    entry = parse_entry(spec)
    assert (entry.target, entry.name) == (target, name)


@pytest.mark.parametrize("spec", ["webhook:ops:x", "webhook:o.p", "webhook:", "a:b:c:d"])
def test_a_malformed_instance_is_refused(spec):
    with pytest.raises(ConfigError, match="PROCESSORS"):
        parse_entry(spec)


def test_an_instance_reads_its_own_variables_then_its_kinds(monkeypatch):
    monkeypatch.setenv("WEBHOOK_URL", "https://shared.example/hook")
    monkeypatch.setenv("WEBHOOK_TIMEOUT", "3s")
    monkeypatch.setenv("WEBHOOK_FORMAT", "discord")
    monkeypatch.setenv("WEBHOOK_OPS_FORMAT", "slack")
    monkeypatch.setenv("WEBHOOK_OPS_TIMEOUT", "")  # empty: unset, so WEBHOOK_TIMEOUT applies
    monkeypatch.setenv("WEBHOOK_SLACK_URL", "https://hooks.example/T0/B0/x")
    ops, slack = load_processors(("webhook:ops", "webhook:slack"), ENV)
    assert (ops.name, slack.name) == ("webhook:ops", "webhook:slack")
    assert ops.instance.settings.url.get_secret_value() == "https://shared.example/hook"
    assert (ops.instance.settings.format, ops.instance.settings.timeout) == ("slack", 3.0)
    assert slack.instance.settings.url.get_secret_value() == "https://hooks.example/T0/B0/x"
    assert slack.instance.settings.format == "discord", "falls back to WEBHOOK_FORMAT"
    [entry] = describe_chain(("webhook:ops",))
    sources = {v["variable"]: v["from"] for v in entry["variables"]}
    assert sources["WEBHOOK_OPS_URL"] == "WEBHOOK_URL" and sources["WEBHOOK_OPS_FORMAT"] == "WEBHOOK_OPS_FORMAT"
    assert sources["WEBHOOK_OPS_TIMEOUT"] == "WEBHOOK_TIMEOUT" and sources["WEBHOOK_OPS_SECRET"] is None


def test_a_missing_instance_variable_names_both_places_it_may_come_from(monkeypatch):
    monkeypatch.delenv("WEBHOOK_URL", raising=False)
    monkeypatch.delenv("WEBHOOK_OPS_URL", raising=False)
    with pytest.raises(ConfigError, match=r"WEBHOOK_OPS_URL \(or WEBHOOK_URL\): is required"):
        load_processor("webhook:ops", ENV)
    monkeypatch.setenv("WEBHOOK_URL", "ftp://x")
    with pytest.raises(ConfigError, match="WEBHOOK_URL: must be an http"):
        load_processor("webhook:ops", ENV)
    monkeypatch.setenv("WEBHOOK_URL", "https://x.example")
    with pytest.raises(ConfigError, match="WEBHOOK_OPS_SECRET or WEBHOOK_SECRET: is required when"):
        load_processor("webhook:ops", ENV)


def test_the_same_instance_twice_is_refused_but_two_instances_of_one_kind_are_not(monkeypatch):
    monkeypatch.setenv("WEBHOOK_URL", "https://x.example")
    monkeypatch.setenv("WEBHOOK_FORMAT", "slack")
    assert [p.name for p in load_processors(("webhook", "webhook:b"), ENV)] == ["webhook", "webhook:b"]
    with pytest.raises(ConfigError, match="names webhook:b more than once"):
        load_processors(("webhook:b", "webhook:b"), ENV)


# ---- what a chain needs --------------------------------------------------------------------------


def test_the_chain_fetches_what_its_steps_need_and_a_content_type_filter_needs_the_plaintext(monkeypatch):
    monkeypatch.setenv("WEBHOOK_URL", "https://x.example")
    monkeypatch.setenv("WEBHOOK_FORMAT", "slack")
    monkeypatch.setenv("ARCHIVE_BUCKET", "archive")

    def need(*specs: str, allowed: tuple[str, ...] = ()) -> Need:
        return chain_need(load_processors(specs, ENV), allowed)

    assert need("webhook") is Need.EVENT
    assert need("webhook", "archive") is Need.OBJECT
    assert need("save", "webhook") is Need.PLAINTEXT
    assert need("uc_test_plugins:record") is Need.PLAINTEXT, "a processor that says nothing gets the plaintext"
    assert need("webhook", allowed=("audio/*",)) is Need.PLAINTEXT, "ALLOWED_CONTENT_TYPES is checked on it"
    monkeypatch.setenv("WEBHOOK_CONTENT_TYPES", "image/*")
    assert need("webhook") is Need.PLAINTEXT, "the type is sniffed from the plaintext"


def test_reading_what_the_chain_did_not_fetch_is_processor_failed_naming_the_step():
    import structlog

    from uploads_consumer.errors import ErrorClass, PermanentError
    from uploads_consumer.events import parse_event
    from uploads_consumer.processors import ProcessingContext

    event = parse_event((Path(TESTS) / "interop" / "messages" / "basic.bin").read_bytes())
    ctx = ProcessingContext(event=event, download_path=Path("/x"), work_dir=Path("/x/w"), log=structlog.get_logger())
    ctx.current = "notify"
    assert ctx.fetched is Need.EVENT
    assert ctx.facts() == {
        "fetched": "event",
        "original_filename": None,
        "size": None,
        "sha256": None,
        "content_type": None,
    }
    with pytest.raises(PermanentError, match=r"processor notify read the plaintext.*needs = Need\.PLAINTEXT") as caught:
        _ = ctx.plaintext_path
    assert caught.value.error_class is ErrorClass.PROCESSOR_FAILED
    with pytest.raises(PermanentError, match=r"needs = Need\.OBJECT"):
        _ = ctx.metadata
