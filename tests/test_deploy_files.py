"""The deployment files operators use: Dockerfile, docker-compose.yml, the systemd unit, the Kubernetes manifests.

No Docker engine or cluster here: the files are parsed and checked for what makes them work, and
the pieces that can run here (the image's health check, systemd-analyze) are run for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from uploads_consumer.config import Settings, parse_duration
from uploads_consumer.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = {name.upper() for name in Settings.model_fields}


class DEFAULTS:
    """The documented defaults (not whatever this process's environment says)."""

    http_port = Settings.model_fields["http_port"].default
    shutdown_grace = Settings.model_fields["shutdown_grace"].default
    fetch_timeout = Settings.model_fields["fetch_timeout"].default
    nats_stream_name = Settings.model_fields["nats_stream_name"].default
    nats_consumer_name = Settings.model_fields["nats_consumer_name"].default


GOOD_KEY = "A" * 43 + "="  # base64 of 32 zero bytes


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


def healthcheck_command() -> list[str]:
    (args,) = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3 :].strip())


def test_dockerfile_is_multi_stage_on_python_3_11_slim():
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    copies = [rest for word, rest in final_stage() if word == "COPY"]
    assert any(c.startswith("--from=") for c in copies), "the runtime stage copies the build stage's result"


def test_dockerfile_runs_the_daemon_as_a_non_root_user():
    stage = final_stage()
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    entry = [json.loads(rest) for word, rest in stage if word in ("ENTRYPOINT", "CMD")]
    argv = [a for part in entry for a in part]
    assert argv[:3] == ["python", "-m", "uploads_consumer"]
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert f"HTTP_PORT={DEFAULTS.http_port}" in env
    assert any(word == "EXPOSE" and rest == str(DEFAULTS.http_port) for word, rest in stage)


def test_dockerfile_healthcheck_uses_python_urllib_on_healthz():
    command = healthcheck_command()
    assert command[0] == "python" and "curl" not in " ".join(command)
    assert "urllib" in command[-1] and "/healthz" in command[-1]


def test_dockerfile_healthcheck_passes_on_a_live_daemon_and_fails_without_one(start_daemon, daemon_env):
    command = healthcheck_command()
    command[0] = sys.executable
    daemon = start_daemon()
    daemon.wait_http()
    ok = subprocess.run(
        command, env={**os.environ, "HTTP_PORT": daemon_env["HTTP_PORT"]}, capture_output=True, timeout=30
    )
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(command, env={**os.environ, "HTTP_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode != 0


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


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR:?error}, as if only the required master key were set."""

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if op == ":?":
            assert name == "ENCRYPTION_MASTER_KEY", f"{name} is required"
            return GOOD_KEY
        return arg or ""

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, str(value))


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


def test_compose_nats_has_jetstream_monitoring_guest_credentials_and_a_volume():
    data = compose()
    nats = data["services"]["nats"]
    cmd = nats["command"]
    assert "-js" in cmd and cmd[cmd.index("-m") + 1] == "8222"
    assert cmd[cmd.index("--user") + 1] == "guest" and cmd[cmd.index("--pass") + 1] == "guest"
    store = cmd[cmd.index("-sd") + 1]
    volume, _, target = nats["volumes"][0].partition(":")
    assert target == store and volume in data["volumes"]
    assert "8222/healthz" in " ".join(nats["healthcheck"]["test"])


def test_compose_every_long_running_service_has_a_healthcheck():
    services = compose()["services"]
    for name in ("nats", "minio", "clamav", "uploads-consumer"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert "/healthz" in " ".join(services["uploads-consumer"]["healthcheck"]["test"])


def test_compose_start_order_waits_for_health_and_for_the_bucket():
    services = compose()["services"]
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["uploads-consumer"]["depends_on"] == {
        "nats": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }


def test_compose_bucket_init_creates_the_consumers_bucket_with_mc():
    services = compose()["services"]
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc")
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script
    # $$ reaches the container's shell as $; a single $ would be expanded by compose, from the host.
    assert re.search(r"(?<!\$)\$(?![${])", script) is None
    bucket = interpolate(init["environment"]["S3_BUCKET_NAME"])
    assert bucket == interpolate(services["uploads-consumer"]["environment"]["S3_BUCKET_NAME"])
    assert interpolate(init["environment"]["MINIO_ROOT_USER"]) == interpolate(
        services["uploads-consumer"]["environment"]["AWS_ACCESS_KEY_ID"]
    )


def test_compose_consumer_is_built_from_the_dockerfile_and_configured_by_real_variables():
    data = compose()
    consumer = data["services"]["uploads-consumer"]
    assert consumer["build"]["context"] == "."
    assert (ROOT / consumer["build"].get("dockerfile", "Dockerfile")).is_file()
    env = consumer["environment"]
    unknown = set(env) - VARIABLES - processor_variables(interpolate(env.get("PROCESSORS", "save")))
    assert not unknown, f"not variables of Settings nor of the processors in PROCESSORS: {unknown}"
    assert env["NATS_URL"] == "nats://guest:guest@nats:4222"
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["S3_PATH_STYLE_ACCESS"] == "true"
    assert env["ENCRYPTION_MASTER_KEY"].startswith("${ENCRYPTION_MASTER_KEY:?")  # required, with a message
    settings = Settings(**{k.lower(): interpolate(v) for k, v in env.items()})  # every value validates
    assert settings.s3_bucket_name and settings.master_keys()[0] == bytes(32)
    volume, _, target = consumer["volumes"][0].partition(":")
    assert target == str(settings.decrypt_download_path) and volume in data["volumes"]
    assert parse_duration(consumer["stop_grace_period"]) > settings.shutdown_grace + settings.fetch_timeout


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


def test_systemd_unit_has_the_operational_settings():
    k = unit_keys()
    one = {key: values[-1] for key, values in k.items()}
    assert one["Service.EnvironmentFile"] == "/etc/uploads-consumer/env"
    assert one["Service.Restart"] == "on-failure" and parse_duration(one["Service.RestartSec"]) > 0
    assert one["Service.User"] not in ("root", "0") and one["Service.User"]
    assert one["Service.KillSignal"] == "SIGTERM"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert one[f"Service.{key}"] == value, key
    assert one["Service.ExecStart"].endswith("uploads-consumer run")
    assert one["Install.WantedBy"] == "multi-user.target"


def test_systemd_stop_timeout_outlasts_the_shutdown_grace_and_the_download_path_is_writable():
    k = unit_keys()
    env = env_example()
    grace = parse_duration(env.get("SHUTDOWN_GRACE", DEFAULTS.shutdown_grace))
    fetch = parse_duration(env.get("FETCH_TIMEOUT", DEFAULTS.fetch_timeout))
    assert parse_duration(k["Service.TimeoutStopSec"][-1]) > grace + fetch
    writable = " ".join(k["Service.ReadWritePaths"]).split()
    defaults = dict(v.split("=", 1) for v in k.get("Service.Environment", []))
    for path in (env["DECRYPT_DOWNLOAD_PATH"], defaults["DECRYPT_DOWNLOAD_PATH"]):
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), path


def test_systemd_env_example_names_only_real_variables_and_marks_the_key_required():
    env = env_example()
    assert not set(env) - VARIABLES, set(env) - VARIABLES
    assert "REQUIRED" in env["ENCRYPTION_MASTER_KEY"]
    values = {k.lower(): v for k, v in env.items() if k != "ENCRYPTION_MASTER_KEY"}
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


def manifests() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and "kind" in doc, path
            out.setdefault(doc["kind"], doc)
    return out


def container() -> dict:
    (c,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def container_env() -> dict[str, dict]:
    return {e["name"]: e for e in container()["env"]}


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


def test_kubernetes_probes_point_at_healthz_and_readyz_on_the_http_port():
    c = container()
    env = container_env()
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert port[c[probe]["httpGet"]["port"]] == int(env["HTTP_PORT"]["value"])


def test_kubernetes_grace_period_outlasts_shutdown_grace():
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    env = container_env()
    grace = parse_duration(env["SHUTDOWN_GRACE"]["value"])
    assert spec["terminationGracePeriodSeconds"] > grace + DEFAULTS.fetch_timeout


def test_kubernetes_master_key_is_a_file_mounted_from_a_secret():
    c = container()
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    env = container_env()
    assert "ENCRYPTION_MASTER_KEY" not in env
    key_file = Path(env["ENCRYPTION_MASTER_KEY_FILE"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"]
    assert key_file.name in [item["path"] for item in volume["secret"].get("items", [{"path": key_file.name}])]
    assert not set(env) - VARIABLES, set(env) - VARIABLES
    for e in env.values():
        if "valueFrom" in e:
            assert "secretKeyRef" in e["valueFrom"]


def test_kubernetes_runs_as_non_root():
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    c = container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    if c["securityContext"].get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", container_env()["DECRYPT_DOWNLOAD_PATH"]["value"]} <= mounts


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


def test_readme_documents_deployment_and_troubleshooting():
    readme = (ROOT / "README.md").read_text()
    assert "docker compose up" in readme and "systemctl" in readme and "ScaledObject" in readme
    trouble = readme[readme.index("\n## Troubleshooting") :]
    for heading in ("### Consumer not receiving messages", "### Connection issues", "### Message processing errors"):
        assert heading in trouble
    for command in (
        "uploads-consumer status",
        "nats consumer info FILE_UPLOADS file_processor",
        "uploads-consumer dlq list",
        "/readyz",
    ):
        assert command in trouble, command
