"""What operators monitor with: the readiness metric, the Grafana dashboard and the Prometheus alert rules.

The rules are checked and unit-tested by promtool itself; every metric the dashboard and the rules
name is looked up in the /metrics of a real daemon, so a renamed metric breaks a test, not a pager.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import yaml
from helpers import wait_settled
from prometheus_client.parser import text_string_to_metric_families
from system import require_tool

from uploads_consumer.errors import ErrorClass

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def exported_samples(daemon) -> dict[tuple[str, frozenset], float]:
    """Every sample of the daemon's /metrics, parsed by prometheus_client: (name, labels) → value."""
    status, text = daemon.http_get("/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _until(condition, daemon, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        await asyncio.sleep(0.1)


async def test_the_ready_gauge_follows_readyz_both_ways(start_daemon, nats_server):
    daemon = start_daemon()
    daemon.wait_http()
    await wait_settled(nats_server.url, 0, daemon=daemon)
    await _until(lambda: daemon.http_get("/readyz")[0] == 200, daemon)
    assert daemon.metric("uploads_consumer_ready") == 1

    nats_server.stop()
    await _until(lambda: daemon.http_get("/readyz")[0] == 503, daemon)
    assert daemon.metric("uploads_consumer_ready") == 0
    assert daemon.http_get("/healthz")[0] == 200, "alive, only not ready"


async def test_every_dead_letter_class_is_exported_at_zero_before_the_first_dead_letter(start_daemon):
    daemon = start_daemon()
    daemon.wait_http()
    dead_letterable = [c for c in ErrorClass if c is not ErrorClass.TRANSIENT]
    samples = exported_samples(daemon)
    for error_class in dead_letterable:
        assert samples[("uploads_consumer_dead_letters_total", frozenset({("error_class", str(error_class))}))] == 0


# --- the alert rules ------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), rule["alert"]
        runbook = notes["runbook"]
        assert all(part in runbook for part in ("Meaning:", "Check:", "Do:")), rule["alert"]


def test_the_operators_alerts_are_all_there():
    assert {rule["alert"] for rule in alert_rules()} == {
        "UploadsConsumerLagGrowing",
        "UploadsConsumerMessageAgeAboveSLO",
        "UploadsConsumerDeadLetters",
        "UploadsConsumerReplicaNotReady",
        "UploadsConsumerTargetDown",
        "UploadsConsumerStuck",
        "UploadsConsumerRedeliveriesClimbing",
    }


def test_every_alert_has_unit_tests_that_fire_it_and_that_keep_it_quiet():
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts no test makes fire"
    assert names - quiet == set(), "alerts no test keeps quiet"


def test_promtool_unit_tests_of_the_alert_rules_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
