"""The deployment files operators use: Dockerfile, docker-compose.yml, the systemd unit, the Kubernetes manifests.

No Docker engine or cluster here: each file is parsed (YAML, the unit's key/values, the Dockerfile's
instructions, the shell commands in comments and the README) and checked for what it means — the
ports it publishes, the images it pulls, the time it gives a stop, the variables it sets — and the
pieces that can run here are run for real: the image's health check against a live daemon and
against fake ones, the bucket-init script with a recording `mc`, systemd-analyze.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from helpers import STOP_MARGIN

from uploads_consumer.cli import build_parser
from uploads_consumer.config import Settings, parse_duration
from uploads_consumer.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = {name.upper() for name in Settings.model_fields}


class DEFAULTS:
    """The documented defaults (not whatever this process's environment says)."""

    http_port = Settings.model_fields["http_port"].default
    shutdown_grace = Settings.model_fields["shutdown_grace"].default
    nats_stream_name = Settings.model_fields["nats_stream_name"].default
    nats_consumer_name = Settings.model_fields["nats_consumer_name"].default


GOOD_KEY = "A" * 43 + "="  # base64 of 32 zero bytes


def stop_allowance(environment: dict[str, str]) -> float:
    """What a deploy file must give a stop before a forced kill: SHUTDOWN_GRACE + 15 s (docs/contract.md, 10)."""
    grace = environment.get("SHUTDOWN_GRACE") or DEFAULTS.shutdown_grace
    return parse_duration(grace) + STOP_MARGIN


def test_stop_allowance_is_the_contract():
    assert stop_allowance({}) == 45  # the figure the files and the README give for the default grace
    assert stop_allowance({"SHUTDOWN_GRACE": "2m"}) == 135


def is_pinned(image: str) -> bool:
    """A digest, or a tag naming one release (x.y.z, or MinIO's RELEASE.<timestamp>): never `latest`, `2.10`."""
    name, at, digest = image.partition("@")
    if at:
        return re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None
    _, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        return False
    return (
        re.search(r"(^|[^0-9.])v?\d+\.\d+\.\d+([^0-9.]|$)|^RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ$", tag) is not None
    )


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("nats:2.10.22-alpine", True),
        ("prom/prometheus:v2.53.2", True),
        ("minio/mc:RELEASE.2024-11-21T17-21-54Z", True),
        (f"minio/minio@sha256:{'a' * 64}", True),
        ("nats:latest", False),
        ("nats", False),
        ("nats:2.10-alpine", False),
        ("nats:2-alpine", False),
        ("registry:5000/nats", False),
        ("minio/minio:RELEASE.2024", False),
    ],
)
def test_is_pinned(image, pinned):
    assert is_pinned(image) is pinned


# --- commands written in comments and in the README ----------------------------------------


def docker_runs(text: str) -> list[list[str]]:
    """Every `docker run ...` command in shell text (comment markers, continuations and trailing comments dropped)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    runs = []
    for line in joined.splitlines():
        if line.lstrip().startswith("docker run "):
            runs.append(shlex.split(line, comments=True))
    return runs


def daemon_run(argv: list[str]) -> tuple[dict[str, str], str | None, list[str]] | None:
    """(its -e variables, its --stop-timeout, the command after the image) of a `docker run` of this image."""
    env: dict[str, str] = {}
    stop_timeout = None
    i = 2
    while i < len(argv) and argv[i].startswith("-"):
        option = argv[i]
        value = None
        if "=" in option:
            option, value = option.split("=", 1)
        elif option not in ("--rm", "-d", "-it", "-i", "-t", "--detach", "--init"):
            i += 1
            value = argv[i]
        if option in ("-e", "--env"):
            key, _, val = (value or "").partition("=")
            env[key] = val
        elif option == "--stop-timeout":
            stop_timeout = value
        i += 1
    if i >= len(argv) or argv[i] != "uploads-consumer":
        return None
    return env, stop_timeout, argv[i + 1 :]


def check_docker_runs(text: str, where: str) -> int:
    """Each `docker run` of the daemon gives it the stop allowance and sets only real variables."""
    daemons = 0
    for argv in docker_runs(text):
        parsed = daemon_run(argv)
        if parsed is None:
            continue
        env, stop_timeout, command = parsed
        assert not set(env) - VARIABLES, f"{where}: not variables of Settings: {set(env) - VARIABLES}"
        if command in ([], ["run"]):  # the daemon, not a one-off command
            daemons += 1
            assert stop_timeout is not None, f"{where}: {shlex.join(argv)} has no --stop-timeout (docker waits 10 s)"
            assert float(stop_timeout) >= stop_allowance(env), f"{where}: --stop-timeout {stop_timeout}"
    return daemons


def test_docker_run_checks_catch_a_missing_or_short_stop_timeout():
    assert check_docker_runs("# docker run --rm --stop-timeout 45 -e NATS_URL=x uploads-consumer", "ok") == 1
    assert check_docker_runs("docker run -e NATS_URL=x uploads-consumer status", "a command") == 0
    with pytest.raises(AssertionError, match="no --stop-timeout"):
        check_docker_runs("# docker run --rm -e NATS_URL=x uploads-consumer", "none")
    with pytest.raises(AssertionError, match="--stop-timeout 45"):
        check_docker_runs("docker run --stop-timeout 45 -e SHUTDOWN_GRACE=60s uploads-consumer run", "short")
    with pytest.raises(AssertionError, match="not variables"):
        check_docker_runs("docker run --stop-timeout 45 -e NATS_ULR=x \\\n  uploads-consumer", "typo")


# --- Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The runtime stage's HEALTHCHECK: its --options and its exec-form command."""
    (args,) = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    options, _, command = args.partition("CMD ")
    flags = dict(option.removeprefix("--").split("=", 1) for option in options.split())
    assert command.lstrip().startswith("["), "exec form: no shell needed, the exit code is python's"
    return flags, json.loads(command)


def dockerfile_user() -> tuple[int, int]:
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and (not gid or gid.isdigit()), "numeric, so Kubernetes' runAsNonRoot can check it"
    return int(uid), int(gid or uid)


def test_dockerfile_is_multi_stage_on_python_3_11_slim():
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    copies = [rest for word, rest in final_stage() if word == "COPY"]
    assert any(c.startswith("--from=") for c in copies), "the runtime stage copies the build stage's result"


def test_dockerfile_runs_the_daemon_as_a_non_root_user_that_receives_sigterm():
    stage = final_stage()
    uid, gid = dockerfile_user()
    assert uid != 0 and gid != 0
    [entrypoint] = [rest for word, rest in stage if word == "ENTRYPOINT"]
    # Exec form: python is PID 1 and gets docker stop's SIGTERM (a shell form would swallow it).
    assert entrypoint.startswith("["), entrypoint
    argv = json.loads(entrypoint) + [a for word, rest in stage if word == "CMD" for a in json.loads(rest)]
    assert argv[:3] == ["python", "-m", "uploads_consumer"]
    build_parser().parse_args(argv[3:])  # the default command is one the CLI accepts
    assert [rest for word, rest in stage if word == "STOPSIGNAL"] in ([], ["SIGTERM"])
    env = dict(pair.split("=", 1) for word, rest in stage if word == "ENV" for pair in shlex.split(rest) if "=" in pair)
    assert not {k for k in env if k.isupper() and k not in ("PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")} - (
        VARIABLES
    ), env
    Settings(**{k.lower(): v for k, v in env.items() if k in VARIABLES}, encryption_master_key=GOOD_KEY)
    assert any(word == "EXPOSE" and rest == env["HTTP_PORT"] for word, rest in stage)


def test_dockerfile_runtime_stage_has_the_system_libraries_the_package_loads():
    # python-magic dlopens libmagic at import; the slim image lacks it.
    runs = " ".join(rest for word, rest in final_stage() if word == "RUN")
    assert "apt-get install" in runs and "libmagic1" in shlex.split(runs), runs


def test_dockerfile_examples_give_docker_run_the_stop_allowance():
    assert check_docker_runs((ROOT / "Dockerfile").read_text(), "Dockerfile") >= 1


@contextmanager
def fake_daemon(status: int) -> Iterator[tuple[int, list[str]]]:
    """An HTTP server answering every GET with `status`; yields its port and the paths asked for."""
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], paths
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    _, command = healthcheck()
    command[0] = sys.executable
    return subprocess.run(command, env={**os.environ, "HTTP_PORT": str(port)}, capture_output=True, timeout=30)


def test_dockerfile_healthcheck_asks_healthz_on_http_port_and_fails_on_anything_but_200():
    flags, command = healthcheck()
    assert command[0] == "python", "the slim image has no curl"
    assert parse_duration(flags["timeout"]) > 0 and int(flags["retries"]) >= 1
    with fake_daemon(200) as (port, paths):
        assert run_healthcheck(port).returncode == 0
        assert paths == ["/healthz"]
    with fake_daemon(503) as (port, paths):
        assert run_healthcheck(port).returncode != 0, "503 (a stuck fetch loop) is unhealthy"
        assert paths == ["/healthz"]


def test_dockerfile_healthcheck_passes_on_a_live_daemon_and_fails_without_one(start_daemon, daemon_env):
    daemon = start_daemon()
    daemon.wait_http()
    ok = run_healthcheck(int(daemon_env["HTTP_PORT"]))
    assert ok.returncode == 0, ok.stderr
    assert run_healthcheck(free_port()).returncode != 0


def test_dockerignore_keeps_out_git_and_tests_but_not_what_the_build_copies():
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert ".git" in patterns and "tests" in patterns
    copied = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from="):
            copied += rest.split()[:-1]
    assert set(copied) >= {"pyproject.toml", "README.md", "src"}
    for source in copied:
        assert (ROOT / source).exists()
        assert not any(fnmatch(source, p) for p in patterns), f"{source} is excluded by .dockerignore"


# --- docker-compose.yml ------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: object, host: dict[str, str] | None = None) -> str:
    """What compose makes of a value: `$$` → `$`, and ${VAR}, ${VAR:-default}, ${VAR:?error}, $VAR from
    the host's environment — by default one where only the required master key is set."""
    env = {"ENCRYPTION_MASTER_KEY": GOOD_KEY} if host is None else host

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        value = env.get(name)
        if op in (":?", "?"):
            assert value, f"{name} is required: {arg}"
            return value
        if op in (":-",):
            return value or arg
        if op == "-":
            return arg if value is None else value
        return value or ""

    return re.sub(r"\$\$|\$\{([A-Za-z0-9_]+)(?:(:-|:\?|-|\?)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, str(value))


def service_env(service: dict, host: dict[str, str] | None = None) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: interpolate(value, host) for key, value in environment.items()}


def published_ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host address or None for all interfaces, host port, container port) of each `ports:` entry."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # long syntax
            out.append((entry.get("host_ip"), str(entry.get("published", "")), str(entry["target"])))
            continue
        text = interpolate(entry).split("/")[0]
        address = None
        if text.startswith("["):  # [::1]:4222:4222
            address, _, text = text[1:].partition("]:")
        parts = text.split(":")
        if address is None and len(parts) == 3:
            address = parts.pop(0)
        host_port, container_port = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        out.append((address, host_port, container_port))
    return out


def go_duration(text: str) -> float:
    """Compose's durations (Go's syntax): 45s, 1m30s, 1h, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


LOOPBACK = ("127.0.0.1", "::1")


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        (["127.0.0.1:4222:4222"], [("127.0.0.1", "4222", "4222")]),
        (["4222:4222"], [(None, "4222", "4222")]),
        (["8080"], [(None, "", "8080")]),
        (["[::1]:9000:9000/tcp"], [("::1", "9000", "9000")]),
        (["${BIND:-0.0.0.0}:8222:8222"], [("0.0.0.0", "8222", "8222")]),
        ([{"target": 80, "published": 8080}], [(None, "8080", "80")]),
        ([{"target": 80, "published": 8080, "host_ip": "127.0.0.1"}], [("127.0.0.1", "8080", "80")]),
    ],
)
def test_published_ports_reads_every_syntax(ports, expected):
    assert published_ports({"ports": ports}) == expected


def test_compose_has_nats_minio_bucket_init_clamav_and_the_consumer():
    services = compose()["services"]
    # Services in a profile (Prometheus and Grafana: tests/test_monitoring.py) start only when asked for.
    assert {name for name, service in services.items() if not service.get("profiles")} == {
        "nats",
        "minio",
        "minio-init",
        "clamav",
        "uploads-consumer",
    }
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"


def test_compose_publishes_every_port_on_loopback_only():
    """The default credentials (NATS guest/guest, MinIO and Grafana admins) then work from this machine only."""
    for name, service in compose()["services"].items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes everything"
        for address, host_port, container_port in published_ports(service):
            assert address in LOOPBACK, f"{name}: port {container_port} is published on {address or 'every interface'}"
            assert host_port, f"{name}: port {container_port} is published on a random host port"


def test_compose_pins_every_image_it_pulls():
    services = compose()["services"]
    built = {service["image"] for service in services.values() if "build" in service}
    for name, service in services.items():
        if service["image"] in built:
            continue  # built here from ./Dockerfile; `image` only names the result
        assert is_pinned(service["image"]), f"{name}: pin a release or a digest, not {service['image']!r}"


def test_compose_nats_runs_jetstream_with_the_credentials_and_store_the_consumer_uses():
    data = compose()
    nats = data["services"]["nats"]
    cmd = nats["command"]
    assert "-js" in cmd
    store = cmd[cmd.index("-sd") + 1]
    volume, _, target = nats["volumes"][0].partition(":")
    assert target == store and volume in data["volumes"], "JetStream's store survives a restart"
    url = urlsplit(service_env(data["services"]["uploads-consumer"])["NATS_URL"])
    assert (url.username, url.password) == (cmd[cmd.index("--user") + 1], cmd[cmd.index("--pass") + 1])
    assert url.hostname == "nats" and url.port == 4222
    assert ("127.0.0.1", "4222", "4222") in published_ports(nats)


def healthcheck_url(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1
    [url] = re.findall(r"http://[^'\"\s]+", " ".join(test))
    return url


def test_compose_healthchecks_ask_the_ports_the_services_listen_on():
    services = compose()["services"]
    nats_cmd = services["nats"]["command"]
    nats_health = urlsplit(healthcheck_url(services["nats"]))
    assert (nats_health.port, nats_health.path) == (int(nats_cmd[nats_cmd.index("-m") + 1]), "/healthz")
    consumer = services["uploads-consumer"]
    health = urlsplit(healthcheck_url(consumer))
    assert (health.hostname, health.port, health.path) == (
        "127.0.0.1",
        int(service_env(consumer)["HTTP_PORT"]),
        "/healthz",
    )
    assert services["minio"]["healthcheck"]["test"][:2] == ["CMD", "mc"]
    assert services["clamav"]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    for name in ("nats", "minio", "clamav", "uploads-consumer"):
        check = services[name]["healthcheck"]
        assert go_duration(check["timeout"]) < go_duration(check["interval"]) and check["retries"] >= 1, name


def test_compose_start_order_waits_for_health_and_for_the_bucket():
    services = compose()["services"]
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["uploads-consumer"]["depends_on"] == {
        "nats": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }


def run_bucket_init(tmp_path: Path, host: dict[str, str], mc_fails: str = "") -> tuple[int, list[list[str]]]:
    """Run minio-init's entrypoint and command as its container would, with a `mc` that records its arguments."""
    init = compose()["services"]["minio-init"]
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    calls.write_text("")
    (fake / "mc").write_text(
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$CALLS"; echo >> "$CALLS"\n'
        f'[ "$1" != "{mc_fails}" ]\n'
    )
    (fake / "mc").chmod(0o755)
    argv = [interpolate(a, host) for a in init["entrypoint"] + init["command"]]
    env = {**service_env(init, host), "PATH": f"{fake}:/usr/bin:/bin", "CALLS": str(calls)}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    recorded = [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]
    return result.returncode, recorded


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
@pytest.mark.parametrize(
    "host",
    [
        {"ENCRYPTION_MASTER_KEY": GOOD_KEY},
        {
            "ENCRYPTION_MASTER_KEY": GOOD_KEY,
            "MINIO_ROOT_USER": "ops",
            "MINIO_ROOT_PASSWORD": "a $ecret with spaces",
            "S3_BUCKET_NAME": "my-uploads",
        },
    ],
    ids=["defaults", "set"],
)
def test_compose_bucket_init_creates_the_consumers_bucket_on_the_minio_service(tmp_path, host):
    services = compose()["services"]
    consumer = service_env(services["uploads-consumer"], host)
    code, calls = run_bucket_init(tmp_path, host)
    assert code == 0
    [alias, make_bucket, make_archive_bucket] = calls
    archive = service_env(services["archive"], host)["ARCHIVE_BUCKET"]
    assert make_archive_bucket == ["mb", "--ignore-existing", f"local/{archive}"], "for the pipeline's archive"
    endpoint = urlsplit(alias[3])
    assert alias[:3] == ["alias", "set", "local"]
    assert endpoint.hostname == "minio" and any(
        c == str(endpoint.port) for _, _, c in published_ports(services["minio"])
    )
    assert endpoint.geturl() == consumer["S3_ENDPOINT_URL"]
    assert alias[4:] == [consumer["AWS_ACCESS_KEY_ID"], consumer["AWS_SECRET_ACCESS_KEY"]], "the consumer's keys"
    assert make_bucket == ["mb", "--ignore-existing", f"local/{consumer['S3_BUCKET_NAME']}"]
    assert service_env(services["minio"], host)["MINIO_ROOT_USER"] == alias[4]


def test_compose_bucket_init_fails_when_mc_does_so_the_consumer_does_not_start(tmp_path):
    code, calls = run_bucket_init(tmp_path, {"ENCRYPTION_MASTER_KEY": GOOD_KEY}, mc_fails="alias")
    assert code != 0 and len(calls) == 1, "no bucket made against an alias that was not set"


def test_compose_consumer_is_built_from_the_dockerfile_and_configured_by_real_variables():
    data = compose()
    consumer = data["services"]["uploads-consumer"]
    assert consumer["build"]["context"] == "."
    assert (ROOT / consumer["build"].get("dockerfile", "Dockerfile")).is_file()
    env = service_env(consumer)
    # OpenTelemetry's own variables are the SDK's to read; those used must be documented (4.17).
    contract = (ROOT / "docs" / "contract.md").read_text()
    sdk = {name for name in env if name.startswith("OTEL_") and f"`{name}`" in contract}
    unknown = set(env) - VARIABLES - processor_variables(env.get("PROCESSORS", "save")) - sdk
    assert not unknown, f"not variables of Settings, of the processors in PROCESSORS or of OpenTelemetry: {unknown}"
    settings = Settings(**{k.lower(): v for k, v in env.items()})  # every value validates
    assert settings.s3_bucket_name and settings.master_keys()[0] == bytes(32)
    assert settings.s3_path_style_access, "MinIO needs path-style addressing"
    with pytest.raises(AssertionError, match="ENCRYPTION_MASTER_KEY is required"):
        service_env(consumer, host={})  # compose refuses to start without the key
    volume, _, target = consumer["volumes"][0].partition(":")
    assert target == str(settings.decrypt_download_path) and volume in data["volumes"]
    assert any(c == str(settings.http_port) for _, _, c in published_ports(consumer))


def test_compose_gives_the_consumer_its_whole_stop_before_sigkill():
    consumer = compose()["services"]["uploads-consumer"]
    assert go_duration(consumer["stop_grace_period"]) >= stop_allowance(service_env(consumer))
    assert consumer.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_runs_the_seeds_pipeline_as_stages_each_provisioned_first_in_order():
    services = compose()["services"]
    jobs = {
        "process": ("save,scan,image,extract", None),
        "notify": ("webhook", "process"),
        "archive": ("archive", "notify"),
    }
    host = {"ENCRYPTION_MASTER_KEY": GOOD_KEY, "WEBHOOK_URL": "https://r.example/u", "WEBHOOK_SECRET": "whsec_x"}
    setup = services["pipeline-setup"]
    assert setup["profiles"] == ["pipeline"] and setup["build"]["args"]["EXTRAS"] == "images,extract"
    script = interpolate(setup["command"][0], host)
    order = [script.index(f"NATS_CONSUMER_NAME={name} ") for name in jobs]
    assert order == sorted(order), "each stage set up after the one it follows"
    for name, (chain, after) in jobs.items():
        assert f"NATS_CONSUMER_NAME={name} {'AFTER=' + after + ' ' if after else ''}PROCESSORS={chain} " in script
    assert script.count("python -m uploads_consumer setup") == 3 and "setup ||" not in script.split("exit 1; } &&")[1]
    assert '[ -n "$WEBHOOK_URL" ]' in script, "no pipeline without the notify stage's receiver"
    ports = set()
    for name, (chain, after) in jobs.items():
        service = services[name]
        env = service_env(service, host)
        assert service["profiles"] == ["pipeline"] and service["image"] == setup["image"]
        assert (env["NATS_CONSUMER_NAME"], env["PROCESSORS"], env.get("AFTER")) == (name, chain, after)
        assert service["depends_on"]["pipeline-setup"] == {"condition": "service_completed_successfully"}
        unknown = set(env) - VARIABLES - processor_variables(chain)
        assert not unknown, f"{name}: not variables of Settings nor of its processors: {unknown}"
        settings = Settings(**{k.lower(): v for k, v in env.items()})
        assert settings.dedupe_bucket == f"{name}_done", "each remembers its own work"
        assert settings.source.after == after
        assert settings.nats_url == service_env(services["uploads-consumer"])["NATS_URL"], "the one stream"
        assert go_duration(service["stop_grace_period"]) >= stop_allowance(env)
        ports |= {host_port for _, host_port, _ in published_ports(service)}
    assert len(ports) == 3, "each consumer's /metrics on a port of its own"
    process = services["process"]
    assert service_env(process, host)["SCAN_CLAMD_URL"] == "tcp://clamav:3310", "the scan gates the stages after it"
    assert process["depends_on"]["clamav"] == {"condition": "service_healthy"}
    assert (
        service_env(services["archive"], host)["ARCHIVE_BUCKET"]
        == service_env(services["minio-init"], host)["ARCHIVE_BUCKET"]
    ), "minio-init makes the archive's bucket"


def processor_variables(chain: str) -> set[str]:
    """The variables the chain's (installed) processors read, as `uploads-consumer processors` lists them."""
    from uploads_consumer.processors import describe_installed

    names = {s.strip() for s in chain.split(",") if s.strip()}
    return {v["variable"] for p in describe_installed() if p["name"] in names for v in p.get("variables", [])}


def test_compose_clamav_is_a_pinned_release_that_the_consumer_scans_with_before_saving(monkeypatch, tmp_path):
    from prometheus_client import CollectorRegistry

    from uploads_consumer.processors import ProcessorEnvironment, load_processor
    from uploads_consumer.processors.scan import Scan

    data = compose()
    clamav = data["services"]["clamav"]
    image, _, tag = clamav["image"].partition(":")
    assert image == "clamav/clamav" and re.fullmatch(r"\d+\.\d+(\.\d+)?", tag), "an official image, pinned"
    volume, _, target = clamav["volumes"][0].partition(":")
    assert target == "/var/lib/clamav" and volume in data["volumes"], "the signature database persists"
    env = data["services"]["uploads-consumer"]["environment"]
    chain = [p.strip() for p in interpolate(env["PROCESSORS"]).split(",")]
    assert chain[0] == "scan" and "save" in chain
    assert env["SCAN_CLAMD_URL"] == "tcp://clamav:3310"  # the official image's clamd port
    for name, value in env.items():
        if name.startswith("SCAN_"):
            monkeypatch.setenv(name, interpolate(value))
    environment = ProcessorEnvironment(tmp_path, tuple(chain), 300.0, CollectorRegistry())
    assert isinstance(load_processor("scan", environment).instance, Scan)  # its settings validate
    # The webhook example is there for the operator to uncomment.
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in ("WEBHOOK_URL", "WEBHOOK_SECRET", "WEBHOOK_FORMAT"):
        assert f"# {variable}: " in text


def test_compose_mail_profile_runs_a_catcher_that_the_commented_email_lines_point_at(monkeypatch, tmp_path):
    from prometheus_client import CollectorRegistry

    from uploads_consumer.processors import ProcessorEnvironment, load_processor
    from uploads_consumer.processors.email import Email

    services = compose()["services"]
    mailpit = services["mailpit"]
    assert mailpit["profiles"] == ["mail"] and mailpit["image"].startswith("axllent/mailpit:")
    text = (ROOT / "docker-compose.yml").read_text()
    assert "UNVERIFIED" in text, "the catcher's tag is said to be unchecked until someone pulls it"
    # The EMAIL_* lines the operator uncomments, as compose would read them once uncommented.
    lines = re.findall(r"^\s*# (EMAIL_[A-Z_]+: .*)$", text, re.M)
    example = {k: interpolate(v) for k, v in yaml.safe_load("\n".join(lines)).items()}
    assert urlsplit(example["EMAIL_SMTP_URL"]).hostname == "mailpit"
    assert example["EMAIL_SUBJECT"] == "New upload ${filename}", "$$ keeps the template's $ from compose"
    for name in processor_variables("email"):
        monkeypatch.delenv(name, raising=False)
    for name, value in example.items():
        monkeypatch.setenv(name, value)
    environment = ProcessorEnvironment(tmp_path, ("email",), 300.0, CollectorRegistry())
    assert isinstance(load_processor("email", environment).instance, Email)  # every value validates


# --- systemd -----------------------------------------------------------------------------

UNIT = ROOT / "deploy" / "systemd" / "uploads-consumer.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "env.example"


def unit_keys() -> dict[str, list[str]]:
    """section.Key -> values, in order (systemd keys may repeat)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def unit_environment() -> dict[str, str]:
    """What the service sees: the unit's Environment= defaults, overridden by the EnvironmentFile."""
    defaults = dict(v.split("=", 1) for v in unit_keys().get("Service.Environment", []))
    return {**defaults, **env_example()}


def systemd_seconds(value: str) -> float:
    """A systemd time span in seconds, as systemd reads it (`45s`, `1min 30s`, a plain number is seconds)."""
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "timespan", value], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        [micros] = re.findall(r"μs: (\d+)", out.stdout)
        return int(micros) / 1e6
    return parse_duration(value if not value.isdigit() else f"{value}s")


def test_systemd_unit_has_the_operational_settings():
    k = unit_keys()
    one = {key: values[-1] for key, values in k.items()}
    assert one["Service.EnvironmentFile"] == "/etc/uploads-consumer/env"
    assert one["Service.Restart"] == "on-failure" and systemd_seconds(one["Service.RestartSec"]) > 0
    assert one["Service.RestartPreventExitStatus"] == "2", "a configuration error is not fixed by restarting"
    assert one["Service.User"] not in ("root", "0") and one["Service.User"]
    assert one["Service.KillSignal"] == "SIGTERM"
    assert one["Service.KillMode"] in ("mixed", "control-group")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert one[f"Service.{key}"] == value, key
    argv = shlex.split(one["Service.ExecStart"])
    assert Path(argv[0]).name == "uploads-consumer"
    build_parser().parse_args(argv[1:])
    assert argv[1:] == ["run"]
    assert one["Install.WantedBy"] == "multi-user.target"


def test_systemd_gives_the_daemon_its_whole_stop_before_sigkill():
    stop = systemd_seconds(unit_keys()["Service.TimeoutStopSec"][-1])
    assert stop >= stop_allowance(unit_environment()), f"TimeoutStopSec {stop:g}s"


def test_systemd_download_path_is_writable_and_the_rest_read_only():
    k = unit_keys()
    writable = " ".join(k["Service.ReadWritePaths"]).split()
    defaults = dict(v.split("=", 1) for v in k.get("Service.Environment", []))
    for path in (unit_environment()["DECRYPT_DOWNLOAD_PATH"], defaults["DECRYPT_DOWNLOAD_PATH"]):
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), path


def test_systemd_env_example_names_only_real_variables_and_marks_the_key_required():
    env = env_example()
    assert not set(env) - VARIABLES, set(env) - VARIABLES
    assert "REQUIRED" in env["ENCRYPTION_MASTER_KEY"]
    values = {k.lower(): v for k, v in unit_environment().items() if k != "ENCRYPTION_MASTER_KEY"}
    Settings(**values)  # everything else is valid as written
    with pytest.raises(ValueError):
        Settings(encryption_master_key=env["ENCRYPTION_MASTER_KEY"])  # the placeholder cannot start by accident


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that ExecStart exists: point it at this environment's uploads-consumer.
    exe = Path(sys.executable).parent / "uploads-consumer"
    assert exe.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/uploads-consumer/bin/uploads-consumer", str(exe)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


# --- Kubernetes and KEDA -----------------------------------------------------------------

K8S = ROOT / "deploy" / "kubernetes"


def manifests(app: str = "uploads-consumer") -> dict[str, dict]:
    """Per kind, the first document of the daemon's (or, with app="uploads-console", the console's)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and "kind" in doc, path
            owner = doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")
            if owner in ("uploads-consumer", "uploads-console") and owner != app:
                continue
            out.setdefault(doc["kind"], doc)
    return out


def pod_spec() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod_spec()["containers"]
    return c


def container_env() -> dict[str, dict]:
    return {e["name"]: e for e in container()["env"]}


def container_values() -> dict[str, str]:
    return {name: e["value"] for name, e in container_env().items() if "value" in e}


def test_kubernetes_manifests_parse_and_the_kustomization_lists_existing_files():
    kinds = manifests()
    assert {"Deployment", "ScaledObject", "PersistentVolumeClaim", "Secret", "Kustomization"} <= set(kinds)
    resources = kinds["Kustomization"]["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert "secret.example.yaml" not in resources  # placeholders are never applied
    if shutil.which("kubectl"):
        built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        assert {d["kind"] for d in yaml.safe_load_all(built.stdout)} >= {"Deployment", "ScaledObject"}


def test_kubernetes_probes_and_scrape_point_at_the_http_port_the_env_sets():
    c = container()
    port = int(container_values().get("HTTP_PORT", DEFAULTS.http_port))
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert named.get(get["port"], get["port"]) == port, probe
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_gives_the_daemon_its_whole_stop_before_sigkill():
    assert pod_spec()["terminationGracePeriodSeconds"] >= stop_allowance(container_values())


def test_kubernetes_settings_load_and_the_master_key_is_a_file_mounted_from_a_secret(tmp_path):
    c = container()
    spec = pod_spec()
    env = container_env()
    assert not set(env) - VARIABLES, set(env) - VARIABLES
    assert "ENCRYPTION_MASTER_KEY" not in env
    key_file = Path(env["ENCRYPTION_MASTER_KEY_FILE"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"]
    assert key_file.name in [item["path"] for item in volume["secret"].get("items", [{"path": key_file.name}])]
    for e in env.values():
        if "valueFrom" in e:
            assert "secretKeyRef" in e["valueFrom"]
    # Every literal value validates, with the key file (and the secrets) as the cluster would provide them.
    key = tmp_path / "master-key"
    key.write_text(GOOD_KEY)
    values = {k.lower(): v for k, v in container_values().items()}
    values["encryption_master_key_file"] = str(key)
    Settings(**values)


CONTRACT = (ROOT / "docs" / "contract.md").read_text()
SECRET_VARIABLES = re.compile(r"AUDIT_URL|AUDIT_SIGNING_KEY|.*_(PASSWORD|SECRET)$")


def commented_env_entries() -> list[dict]:
    """The optional entries deployment.yaml shows commented out in the container's env, as they read uncommented."""
    text = (K8S / "deployment.yaml").read_text()
    lines = [m.group(1) for m in re.finditer(r"(?m)^ {12}# ((?:- name:| {2}value| {4}secretKeyRef).*)$", text)]
    return yaml.safe_load("\n".join(lines)) or []


def commented_env_example() -> dict[str, str]:
    """The optional settings env.example shows commented out (`#NAME=value`)."""
    return dict(re.findall(r"(?m)^#([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text()))


def test_the_optional_settings_the_deployment_files_show_are_documented_and_keep_secrets_in_secrets():
    entries = commented_env_entries()
    names = [e["name"] for e in entries]
    assert {"AUDIT_URL", "EMAIL_SMTP_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "WEBHOOK_URL"} <= set(names)
    assert not set(names) & set(container_env()), "an optional entry repeats one that is set"
    example = commented_env_example()
    for name in [*names, *example]:
        assert f"`{name}`" in CONTRACT, f"{name} is not a variable the contract documents"
    for entry in entries:
        if SECRET_VARIABLES.fullmatch(entry["name"]):
            assert entry["valueFrom"]["secretKeyRef"]["key"], entry
        else:
            assert isinstance(entry["value"], str), entry


def test_kubernetes_runs_as_the_images_non_root_user_on_a_read_only_root():
    spec = pod_spec()
    c = container()
    uid, gid = dockerfile_user()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (uid, gid)
    assert spec["securityContext"]["fsGroup"] == gid, "the mounted key (mode 0440) is readable by the group"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", container_values()["DECRYPT_DOWNLOAD_PATH"]} <= mounts, "the only places it writes"


def test_kubernetes_runs_the_console_apart_signed_in_and_as_locked_down_as_the_daemon(tmp_path):
    kinds = manifests("uploads-console")
    deployment, service = kinds["Deployment"], kinds["Service"]
    assert "console.yaml" in manifests()["Kustomization"]["resources"]
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"] == ["console"] and deployment["spec"]["replicas"] == 1
    env = {e["name"]: e for e in c["env"]}
    assert not set(env) - VARIABLES, set(env) - VARIABLES
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    port = int(values["CONSOLE_PORT"])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and named.get(get["port"], get["port"]) == port, probe
    (to,) = service["spec"]["ports"]
    assert named.get(to["targetPort"], to["targetPort"]) == port and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    for e in env.values():
        if "valueFrom" in e:
            assert "secretKeyRef" in e["valueFrom"]
    # It listens on the pod's address, so it must find its users: the file mounted from a Secret.
    users = Path(values["CONSOLE_USERS_FILE"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(users.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["secret"]["secretName"]
    from uploads_consumer.console.auth import Gate, hash_password

    (tmp_path / "users").write_text(f"ana:{hash_password('a long password', 4)}:operator\n")
    gate = Gate(
        Settings(**{**{k.lower(): v for k, v in values.items()}, "console_users_file": str(tmp_path / "users")})
    )
    assert not gate.open and values["CONSOLE_BIND"] == "0.0.0.0"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"]["drop"] == [
        "ALL"
    ]
    assert is_pinned(c["image"])


def test_compose_runs_the_console_on_loopback_with_its_users_file():
    console = compose()["services"]["uploads-console"]
    assert console["profiles"] == ["console"] and console["command"] == ["console"]
    assert "console" in console["build"]["args"]["EXTRAS"].split(",")
    env = service_env(console)
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    assert settings.console_users_file is not None and settings.console_bind == "0.0.0.0"
    assert [m.split(":")[1] for m in console["volumes"]] == [str(settings.console_users_file)]
    health = urlsplit(healthcheck_url(console))
    assert (health.hostname, health.port, health.path) == ("127.0.0.1", settings.console_port, "/healthz")
    assert ("127.0.0.1", str(settings.console_port), str(settings.console_port)) in published_ports(console)


def test_kubernetes_image_is_pinned():
    assert is_pinned(container()["image"]), container()["image"]


def test_keda_scales_on_the_durable_consumer_through_the_monitoring_port():
    kinds = manifests()
    scaled = kinds["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "nats-jetstream"
    assert meta["consumer"] == DEFAULTS.nats_consumer_name == "file_processor"
    assert meta["stream"] == DEFAULTS.nats_stream_name == "FILE_UPLOADS"
    assert meta["natsServerMonitoringEndpoint"].endswith(":8222")
    assert meta["account"] == "$G"
    assert int(meta["lagThreshold"]) > 0


# --- README ------------------------------------------------------------------------------


def readme_shell_lines() -> list[str]:
    """The lines of every shell block (```sh, or no language) of the README and the site's pages; a
    ```text block is output, such as the usage lines of the generated command-line reference."""
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        inside, shell = False, False
        for line in doc.read_text().splitlines():
            if line.lstrip().startswith("```"):
                inside = not inside
                shell = line.strip().removeprefix("```") in ("", "sh", "bash", "shell")
            elif inside and shell:
                if lines and lines[-1].endswith("\\"):  # a continued command is one line
                    lines[-1] = lines[-1][:-1] + " " + line.strip()
                else:
                    lines.append(line)
    return lines


def test_readme_commands_are_ones_the_cli_accepts():
    commands = []
    for line in readme_shell_lines():
        if not re.match(r"\s*(uploads-consumer|nats) ", line):
            continue
        line = re.sub(r"\$\([^)]*\)", "VALUE", line)  # `$(cat key)`: the shell's, one word for us
        words = shlex.split(line.split("|")[0], comments=True)
        redirect = [i for i, w in enumerate(words) if w in (">", ">>", "<", "<<<", "2>", "2>&1")]
        words = words[: redirect[0]] if redirect else words  # `… >> console-users`: the shell's, not ours
        if words[:1] == ["uploads-consumer"]:
            commands.append(words)
            build_parser().parse_args(words[1:])  # SystemExit on an unknown command or option
        if words[:3] == ["nats", "consumer", "info"]:
            assert words[3:5] == [DEFAULTS.nats_stream_name, DEFAULTS.nats_consumer_name]
    assert {"status"} <= {c[1] for c in commands} and ["uploads-consumer", "dlq", "list"] in commands
    trouble = (ROOT / "docs" / "operations" / "troubleshooting.md").read_text()
    for heading in ("## Consumer not receiving messages", "## Connection issues", "## Message processing errors"):
        assert f"\n{heading}\n" in trouble


def test_readme_docker_run_gives_the_daemon_its_whole_stop():
    assert check_docker_runs("\n".join(readme_shell_lines()), "README") >= 1
