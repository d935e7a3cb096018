"""What operators monitor with: the readiness metric, the Grafana dashboard and the Prometheus alert rules.

The rules are checked and unit-tested by promtool itself; every metric the dashboard and the rules
name is looked up in the /metrics of a real daemon, and a real Prometheus scrapes a real daemon,
evaluates the rules and answers every dashboard query. A renamed metric breaks a test, not a pager.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import publish_raw, wait_settled
from prometheus_client.parser import text_string_to_metric_families
from system import require_tool

from uploads_consumer.embedded import free_port
from uploads_consumer.errors import ErrorClass

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "uploads-consumer.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
OUR_METRIC = re.compile(
    r"\buploads_consumer_[a-zA-Z0-9_]+"
)  # recording-rule style names (uploads_consumer:...) excluded
# A selector of one of our metrics: name and the matchers between braces (none when bare).
OUR_SELECTOR = re.compile(r"\b(uploads_consumer_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
# An aggregation that drops labels, with its `by (...)` list if any (topk/bottomk keep every label).
AGGREGATION = re.compile(
    r"\b(sum|min|max|avg|count|group|stddev|stdvar|quantile|count_values)\s*(?:(by|without)\s*\(([^)]*)\))?\s*\("
)
DAEMON_CONSUMER = "file_processor"  # NATS_CONSUMER_NAME of the test daemons (the default)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Every panel but the rows, the panels of collapsed rows included."""
    out = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []))
        if panel["type"] != "row":
            out.append(panel)
    return out


def dashboard_queries() -> list[str]:
    """The PromQL of every panel's targets and of the annotations."""
    queries = [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]
    queries += [a["expr"] for a in dashboard()["annotations"]["list"] if "expr" in a]
    return queries


def variable_queries() -> list[str]:
    return [v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def aggregations_drop_consumer(query: str) -> list[str]:
    """The aggregations in `query` whose result has no `consumer` label: `sum(...)`, `max by (job) (...)`."""
    return [
        m.group(0)
        for m in AGGREGATION.finditer(query)
        if not (m.group(2) == "by" and "consumer" in re.split(r"\s*,\s*", m.group(3).strip()))
    ]


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


async def _ready(daemon, url: str) -> None:
    daemon.wait_http()
    await wait_settled(url, 0, daemon=daemon)
    await _until(lambda: daemon.http_get("/readyz")[0] == 200, daemon)


# --- the readiness metric ---------------------------------------------------------------------


async def test_the_ready_gauge_follows_readyz_both_ways(start_daemon, nats_server):
    daemon = start_daemon()
    await _ready(daemon, nats_server.url)
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
        labels = frozenset({("consumer", "file_processor"), ("error_class", str(error_class))})
        assert samples[("uploads_consumer_dead_letters_total", labels)] == 0


# --- the dashboard --------------------------------------------------------------------------


def test_the_dashboard_is_importable_with_a_data_source_job_consumer_and_instance_variable():
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "consumer", "instance"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"] == DATASOURCE, name
    names = [v["name"] for v in board["templating"]["list"]]
    assert names.index("job") < names.index("consumer") < names.index("instance"), "each narrows the next"
    consumer = variables["consumer"]
    assert consumer["query"] == 'label_values(uploads_consumer_messages_total{job=~"$job"}, consumer)'
    assert consumer["multi"] and consumer["includeAll"] and consumer["allValue"] == ".*"
    assert "$job" in variables["instance"]["query"], "instances of the chosen job"
    assert 'consumer=~"$consumer"' in variables["instance"]["query"], "instances of the chosen consumers"


def test_every_dashboard_panel_queries_the_chosen_data_source():
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert "$job" in target["expr"], f"{panel['title']}: {target['expr']} ignores the job variable"


def test_every_dashboard_query_filters_on_the_chosen_consumers_and_shows_them_apart():
    # Several consumers may share a job: a panel that ignored $consumer, or added consumers up,
    # would show one consumer's lag or errors mixed with another's.
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr, where = target["expr"], f"{panel['title']}: {target['expr']}"
            selectors = OUR_SELECTOR.findall(expr)
            assert selectors, where
            for name, matchers in selectors:
                assert 'consumer=~"$consumer"' in matchers, f"{where}: {name} ignores the consumer variable"
            assert aggregations_drop_consumer(expr) == [], f"{where}: consumers are added together"
            assert "{{consumer}}" in target["legendFormat"], f"{where}: the legend does not name the consumer"


def test_the_dashboard_panels_do_not_overlap():
    boxes = [(p["title"], p["gridPos"]) for p in dashboard()["panels"]]
    for title, g in boxes:
        assert g["x"] + g["w"] <= 24, title
    for i, (a, p) in enumerate(boxes):
        for b, q in boxes[i + 1 :]:
            apart = (
                p["x"] + p["w"] <= q["x"]
                or q["x"] + q["w"] <= p["x"]
                or p["y"] + p["h"] <= q["y"]
                or q["y"] + q["h"] <= p["y"]
            )
            assert apart, f"{a!r} overlaps {b!r}"


def test_the_dashboard_shows_what_operators_of_a_queue_consumer_look_at():
    queries = "\n".join(dashboard_queries())
    for wanted in (
        "sum by (consumer, outcome) (rate(uploads_consumer_messages_total",
        "sum by (consumer, error_class) (increase(uploads_consumer_dead_letters_total",
        "max by (consumer) (uploads_consumer_consumer_pending",
        "max by (consumer) (uploads_consumer_consumer_ack_pending",
        "histogram_quantile(0.95, sum by (consumer, le) (rate(uploads_consumer_message_age_seconds_bucket",
        "histogram_quantile(0.5, sum by (consumer, le) (rate(uploads_consumer_processing_duration_seconds_bucket",
        "sum by (consumer, instance) (uploads_consumer_in_flight",
        "rate(uploads_consumer_bytes_decrypted_total",
        "max by (consumer, instance) (uploads_consumer_ready",
        "rate(uploads_consumer_redeliveries_total",
    ):
        assert wanted in queries, wanted


def test_consumer_wide_figures_are_never_added_up_across_replicas():
    # Every replica reports the same pending and ack pending: a sum would multiply them by the replicas.
    # sum(X), sum by (l) (X), sum(f(X[5m])) where X is one of them:
    summed = re.compile(r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*(?:\w+\()?[^()]*uploads_consumer_consumer_")
    assert summed.search("sum by (job) (min_over_time(uploads_consumer_consumer_pending[10m]))")  # the check works
    for query in [*dashboard_queries(), *(rule["expr"] for rule in alert_rules())]:
        assert not summed.search(query), query


# --- the alert rules ------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_operators_alerts_are_all_there():
    assert {rule["alert"] for rule in alert_rules()} == {
        "UploadsConsumerLagGrowing",
        "UploadsConsumerMessageAgeAboveSLO",
        "UploadsConsumerDeadLetters",
        "UploadsConsumerReplicaNotReady",
        "UploadsConsumerTargetDown",
        "UploadsConsumerStuck",
        "UploadsConsumerRedeliveriesClimbing",
        "UploadsConsumerRetryingForLong",
        "UploadsConsumerAuditSpoolNotEmptying",
        "UploadsConsumerAuditAnchorsFailing",
    }


def test_every_rule_keeps_consumers_apart():
    # One consumer's lag or stall must not be hidden by another consumer's traffic in the same job.
    assert aggregations_drop_consumer("sum by (job) (x) + max(y) + sum by (job, consumer) (z)") == [
        "sum by (job) (",
        "max(",
    ]  # the check works
    for rule in alert_rules():
        assert aggregations_drop_consumer(rule["expr"]) == [], rule["alert"]
        if rule["alert"] != "UploadsConsumerTargetDown":  # `up` has no consumer label
            notes = rule["annotations"]
            assert "{{ $labels.consumer }}" in notes["summary"] + notes["description"], rule["alert"]


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), rule["alert"]
        runbook = notes["runbook"]
        assert all(part in runbook for part in ("Meaning:", "Check:", "Do:")), rule["alert"]


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


# --- the compose profile `monitoring` -------------------------------------------------------


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path → the repository file or folder mounted there."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_prometheus_and_grafana_start_only_with_the_monitoring_profile_on_pinned_images_and_loopback_ports():
    services = compose_services()
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        tag = service["image"].rpartition(":")[2]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a release, not {service['image']!r}"
        assert service["ports"] and all(port.startswith("127.0.0.1:") for port in service["ports"]), name
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
            assert source.resolve().is_relative_to(ROOT), f"{name}: {source} is outside the repository"


def test_the_compose_prometheus_scrapes_the_consumer_and_loads_the_alert_rules():
    service = compose_services()["prometheus"]
    mounts = bind_mounts(service)
    config_path = next(arg.split("=", 1)[1] for arg in service["command"] if arg.startswith("--config.file="))
    assert mounts[config_path] == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, here and in the container
        assert mounts[str(Path(config_path).parent / rule_file)] == PROMETHEUS_CONFIG.parent / rule_file
    [job] = config["scrape_configs"]
    assert job["job_name"] == "uploads-consumer", "the name UploadsConsumerTargetDown selects"
    port = compose_services()["uploads-consumer"]["environment"]["HTTP_PORT"]
    assert job["static_configs"][0]["targets"] == [f"uploads-consumer:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))  # the rule files it names are checked too
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_grafana_is_provisioned_with_the_prometheus_data_source_and_the_dashboard():
    services = compose_services()
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"], "the dashboard's ${DS_PROMETHEUS} starts on it"
    prometheus_port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "uploads-consumer.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts[f"{provider['options']['path']}/{DASHBOARD.name}"] == DASHBOARD
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


# --- against a running daemon -----------------------------------------------------------------


def test_every_metric_the_dashboard_and_the_rules_use_is_exported_by_a_running_daemon(start_daemon):
    used = {
        name
        for text in [*dashboard_queries(), *variable_queries(), *(rule["expr"] for rule in alert_rules())]
        for name in OUR_METRIC.findall(text)
    }
    # Not vacuous: the queries name every kind of sample a counter and a histogram export.
    assert {name.rsplit("_", 1)[-1] for name in used} >= {"total", "bucket", "sum", "count"}
    daemon = start_daemon()
    daemon.wait_http()
    exported = {name for name, _ in exported_samples(daemon)}
    assert used - exported == set(), f"not in the daemon's /metrics; it has {sorted(exported)}"


class PrometheusServer:
    """A real Prometheus on a free loopback port, scraping given targets every second and loading the alert rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "uploads-consumer", "static_configs": [{"targets": targets}]}],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        binary = Path(require_tool("prometheus"))  # the server, from the same Debian package as promtool
        self.proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def wait_for(self, promql: str, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not (result := self.query(promql)):
            assert time.monotonic() < deadline, f"no result for {promql} within {timeout}s"
            time.sleep(0.5)
        return result


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    require_tool("promtool")
    started: list[PrometheusServer] = []

    def start(daemon) -> PrometheusServer:
        server = PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{daemon.http_port}"])
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def grafana_to_promql(query: str) -> str:
    """What Grafana sends for this dashboard's variables: the daemon's job and consumer, all instances."""
    return query.replace("$job", "uploads-consumer").replace("$consumer", DAEMON_CONSUMER).replace("$instance", ".*")


async def test_a_real_prometheus_scraping_a_daemon_evaluates_the_rules_and_answers_the_dashboard(
    start_daemon, nats_server, prometheus_for
):
    daemon = start_daemon()
    await _ready(daemon, nats_server.url)
    prometheus = prometheus_for(daemon)
    # Three scrapes at least, so that rate() and increase() have samples to work on.
    prometheus.wait_for('count_over_time(uploads_consumer_ready{job="uploads-consumer"}[1m]) >= 3')

    for variable in variable_queries():  # label_values(selector, label), as Grafana asks for it
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable).groups()
        values = prometheus.api(f"label/{label}/values", **{"match[]": grafana_to_promql(selector)})
        assert values, variable
        if label == "consumer":
            assert values == [DAEMON_CONSUMER], variable
    for query in dashboard_queries():
        result = prometheus.query(grafana_to_promql(query))
        assert result or query.startswith("ALERTS"), f"no data for {query}"
    [ready] = prometheus.query('uploads_consumer_ready{job="uploads-consumer"}')
    assert ready["value"][1] == "1"

    # Every rule evaluates without error on the daemon's real series (wrong matching fails only here).
    deadline = time.monotonic() + 30
    while True:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        if all(rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, rules
        await asyncio.sleep(0.5)
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    assert prometheus.query('ALERTS{alertstate="firing"}') == [], "a healthy idle daemon fires nothing"

    # A message that cannot succeed: the first dead letter since the daemon started fires the alert.
    await publish_raw(nats_server.url, "file.uploads", [b"this is not an upload event"])
    await wait_settled(nats_server.url, 1, daemon=daemon)
    [alert] = prometheus.wait_for('ALERTS{alertname="UploadsConsumerDeadLetters", alertstate="firing"}')
    assert alert["metric"]["error_class"] == "invalid_message"
    assert alert["metric"]["consumer"] == DAEMON_CONSUMER
    assert alert["metric"]["severity"] == "warning"


def test_the_monitoring_pages_cover_loading_both_files_and_every_alert():
    setup = (ROOT / "docs" / "observability" / "metrics.md").read_text()
    for needed in ("rule_files:", "job_name: uploads-consumer", "Import", "provisioning", "--profile monitoring"):
        assert needed in setup, needed
    alerts = (ROOT / "docs" / "observability" / "alerts.md").read_text()
    for rule in alert_rules():
        assert f"\n## {rule['alert']}\n" in alerts, rule["alert"]
