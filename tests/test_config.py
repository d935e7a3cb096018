"""Configuration: the spec's defaults, its duration and size syntax, and one-line errors naming the variable."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uploads_consumer.config import VARIABLES, load_settings, parse_duration, parse_size
from uploads_consumer.embedded import clean_environment
from uploads_consumer.errors import ConfigError

OUR_VARIABLES = sorted(VARIABLES)
KEY = base64.b64encode(bytes(range(32))).decode()
KEY2 = base64.b64encode(bytes(range(32, 64))).decode()
KEY3 = base64.b64encode(bytes(range(64, 96))).decode()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in OUR_VARIABLES:
            monkeypatch.delenv(name)


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> ConfigError:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    return info.value


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults_match_the_spec():
    s = load_settings()
    assert s.nats_url == "nats://localhost:4222"
    assert s.fetch_batch == 10
    assert s.fetch_timeout == 5.0
    assert s.max_in_flight == 16
    assert s.ack_wait == 30.0
    assert s.max_deliver == -1
    assert s.max_ack_pending == 100
    assert s.retry_backoff == (2.0, 10.0, 30.0, 120.0, 300.0)
    assert s.max_file_size == 512 * 1024 * 1024
    assert s.dedupe_ttl == 7 * 86400
    assert s.shutdown_grace == 30.0
    assert s.auto_setup is True
    assert s.nats_replicas == 1
    assert s.processors == ("save",)


def test_default_names_match_the_spec():
    s = load_settings()
    assert s.nats_stream_name == "FILE_UPLOADS"
    assert s.nats_subject == "file.uploads"
    assert s.nats_consumer_name == "file_processor"
    assert s.nats_result_subject == "file.processed"
    assert s.nats_result_stream_name == "FILE_PROCESSED"
    assert s.dlq_stream_name == "FILE_UPLOADS_DLQ"
    assert s.dlq_subject == "file.uploads.dlq"
    assert s.dedupe_bucket == "file_processor_done"


def test_default_storage_and_logging_match_the_spec():
    s = load_settings()
    assert s.s3_endpoint_url is None
    assert s.aws_region == "us-east-1"
    assert s.s3_path_style_access is False
    assert s.decrypt_download_path == Path("./downloads")
    assert s.log_level == "INFO"
    assert s.encryption_master_key is None


# ---- durations and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("30", 30.0),
        ("1.5", 1.5),
        (12, 12.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "", "s", "-5s", "5 seconds", "bogus"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("64KiB", 65536), ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("1000", 1000), (4096, 4096)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5x", "1.5MiB", "MiB", "-1", "1MB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_durations_and_sizes_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("FETCH_TIMEOUT", "500ms")
    monkeypatch.setenv("RETRY_BACKOFF", "1s, 2m ,1h")
    monkeypatch.setenv("MAX_FILE_SIZE", "64KiB")
    monkeypatch.setenv("DEDUPE_TTL", "1h")
    s = load_settings()
    assert s.fetch_timeout == 0.5
    assert s.retry_backoff == (1.0, 120.0, 3600.0)
    assert s.max_file_size == 65536
    assert s.dedupe_ttl == 3600.0


# ---- errors name the variable ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FETCH_TIMEOUT", "bogus"),
        ("FETCH_TIMEOUT", "0s"),
        ("ACK_WAIT", "5x"),
        ("RETRY_BACKOFF", "2s,soon"),
        ("RETRY_BACKOFF", ","),
        ("MAX_FILE_SIZE", "huge"),
        ("DEDUPE_TTL", "forever"),
        ("SHUTDOWN_GRACE", "later"),
        ("FETCH_BATCH", "0"),
        ("FETCH_BATCH", "ten"),
        ("MAX_IN_FLIGHT", "-3"),
        ("MAX_DELIVER", "0"),
        ("MAX_DELIVER", "-2"),
        ("NATS_REPLICAS", "7"),
        ("AUTO_SETUP", "perhaps"),
        ("HTTP_PORT", "70000"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_invalid_value_is_a_config_error_starting_with_the_variable(monkeypatch, variable, value):
    err = config_error(monkeypatch, **{variable: value})
    assert str(err).startswith(f"{variable}:")
    assert err.variable == variable
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    "value",
    [base64.b64encode(b"0123456789abcdef").decode(), "my-super-secret-passphrase"],
    ids=["16-bytes", "not-base64"],
)
def test_invalid_master_key_names_the_variable_without_its_value(monkeypatch, value):
    err = config_error(monkeypatch, ENCRYPTION_MASTER_KEY=value)
    assert "ENCRYPTION_MASTER_KEY" in str(err)
    assert value not in str(err)
    assert value not in repr(err)


def test_invalid_previous_master_key_names_the_variable_without_its_value(monkeypatch):
    secret = "not-a-key-but-a-secret"
    err = config_error(monkeypatch, ENCRYPTION_MASTER_KEY=KEY, ENCRYPTION_PREVIOUS_MASTER_KEYS=f"{KEY2},{secret}")
    assert "ENCRYPTION_PREVIOUS_MASTER_KEYS" in str(err)
    assert secret not in str(err)
    assert KEY2 not in str(err)


# ---- master keys ----------------------------------------------------------------------------------


def test_master_keys_without_a_key_names_the_variable():
    s = load_settings()
    with pytest.raises(ConfigError) as info:
        s.master_keys()
    assert "ENCRYPTION_MASTER_KEY" in str(info.value)


def test_master_key_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", KEY)
    assert load_settings().master_keys() == (bytes(range(32)), [])


def test_master_key_is_read_from_a_file(monkeypatch, tmp_path):
    path = tmp_path / "master.key"
    path.write_text(KEY + "\n")
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY_FILE", str(path))
    current, previous = load_settings().master_keys()
    assert current == bytes(range(32))
    assert previous == []


def test_master_key_file_that_cannot_be_read_names_the_file_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError) as info:
        load_settings().master_keys()
    assert str(info.value).startswith("ENCRYPTION_MASTER_KEY_FILE:")


def test_master_key_file_with_a_bad_key_does_not_echo_it(monkeypatch, tmp_path):
    path = tmp_path / "master.key"
    path.write_text("secret-that-is-not-a-key")
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY_FILE", str(path))
    with pytest.raises(ConfigError) as info:
        load_settings().master_keys()
    assert str(info.value).startswith("ENCRYPTION_MASTER_KEY_FILE:")
    assert "secret-that-is-not-a-key" not in str(info.value)


def test_previous_master_keys_give_several_keys(monkeypatch):
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", KEY)
    monkeypatch.setenv("ENCRYPTION_PREVIOUS_MASTER_KEYS", f"{KEY2}, {KEY3},")
    current, previous = load_settings().master_keys()
    assert current == bytes(range(32))
    assert previous == [bytes(range(32, 64)), bytes(range(64, 96))]


def test_master_key_is_not_shown_in_the_settings_repr(monkeypatch):
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", KEY)
    monkeypatch.setenv("ENCRYPTION_PREVIOUS_MASTER_KEYS", KEY2)
    text = repr(load_settings()) + str(load_settings())
    assert KEY not in text
    assert KEY2 not in text


# ---- lists and empty values -----------------------------------------------------------------------


def test_allowed_buckets_split_on_commas(monkeypatch):
    monkeypatch.setenv("S3_ALLOWED_BUCKETS", "archive, second ,,third")
    s = load_settings()
    assert s.s3_allowed_buckets == ("archive", "second", "third")


def test_allowed_buckets_include_the_upload_bucket(monkeypatch):
    monkeypatch.setenv("S3_BUCKET_NAME", "uploads")
    monkeypatch.setenv("S3_ALLOWED_BUCKETS", "archive,second")
    assert load_settings().allowed_buckets == frozenset({"uploads", "archive", "second"})


def test_allowed_buckets_with_only_the_upload_bucket(monkeypatch):
    monkeypatch.setenv("S3_BUCKET_NAME", "uploads")
    assert load_settings().allowed_buckets == frozenset({"uploads"})


def test_processors_split_on_commas(monkeypatch):
    monkeypatch.setenv("PROCESSORS", "save, mypkg.mod:proc")
    assert load_settings().processors == ("save", "mypkg.mod:proc")


def test_empty_result_subject_stays_empty_and_disables_results(monkeypatch):
    monkeypatch.setenv("NATS_RESULT_SUBJECT", "")
    assert load_settings().nats_result_subject == ""


def test_empty_dedupe_bucket_stays_empty_and_disables_dedupe(monkeypatch):
    monkeypatch.setenv("DEDUPE_BUCKET", "")
    assert load_settings().dedupe_bucket == ""


def test_empty_endpoint_url_means_unset(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "")
    assert load_settings().s3_endpoint_url is None


def test_empty_duration_means_the_default(monkeypatch):
    monkeypatch.setenv("FETCH_TIMEOUT", "")
    assert load_settings().fetch_timeout == 5.0


def test_each_consumer_remembers_its_own_uploads_unless_told_otherwise(monkeypatch):
    assert load_settings().dedupe_bucket == "file_processor_done", "unchanged for existing deployments"
    monkeypatch.setenv("NATS_CONSUMER_NAME", "notify")
    assert load_settings().dedupe_bucket == "notify_done"
    assert load_settings().replay_subject == "file.uploads.replay.notify"
    monkeypatch.setenv("NATS_CONSUMER_NAME", "notify+eu")
    assert load_settings().dedupe_bucket == "notify_eu_done", "what a bucket name cannot hold becomes _"
    monkeypatch.setenv("DEDUPE_BUCKET", "shared_done")
    assert load_settings().dedupe_bucket == "shared_done", "the operator asked for a shared one"


@pytest.mark.parametrize("name", ["no.dots", "no spaces", "no*", "no>", "no/slash"])
def test_a_consumer_name_nats_would_refuse_is_refused_at_start(monkeypatch, name):
    monkeypatch.setenv("NATS_CONSUMER_NAME", name)
    with pytest.raises(ConfigError, match="NATS_CONSUMER_NAME: must not contain"):
        load_settings()


@pytest.mark.parametrize(("ack_wait", "fetch_timeout"), [("30s", 5.0), ("5s", 2.5), ("1s", 0.5), ("2m", 5.0)])
def test_an_unset_fetch_timeout_follows_ack_wait(monkeypatch, ack_wait, fetch_timeout):
    monkeypatch.setenv("ACK_WAIT", ack_wait)
    assert load_settings().fetch_timeout == fetch_timeout


def test_only_an_explicit_fetch_timeout_can_contradict_ack_wait(monkeypatch):
    monkeypatch.setenv("ACK_WAIT", "5s")
    monkeypatch.setenv("FETCH_TIMEOUT", "5s")
    with pytest.raises(ConfigError, match=r"FETCH_TIMEOUT: must be shorter than ACK_WAIT \(5s\)"):
        load_settings()


def test_empty_master_key_means_unset(monkeypatch):
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", "")
    s = load_settings()
    assert s.encryption_master_key is None
    with pytest.raises(ConfigError):
        s.master_keys()


# ---- the process exits 2 with one line ------------------------------------------------------------


def run_module(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = clean_environment(**{"HTTP_PORT": "0", "NATS_URL": "nats://127.0.0.1:1", **env})
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_process_exits_2_naming_an_invalid_variable(tmp_path):
    proc = run_module(tmp_path, FETCH_TIMEOUT="bogus", ENCRYPTION_MASTER_KEY=KEY)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "FETCH_TIMEOUT" in lines[0]


def test_process_exits_2_naming_a_missing_master_key(tmp_path):
    proc = run_module(tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ENCRYPTION_MASTER_KEY" in lines[0]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("minio.internal:9000", "needs a scheme and a host, such as http://localhost:9000 or https://s3.example.com"),
        (
            "http://minio.internal:9000/uploads",
            "must name the S3 service only, with no path: the bucket is not part of it (it goes in S3_BUCKET_NAME), "
            "e.g. http://host:9000",
        ),
        (
            "http://AKIAEXAMPLE:s3cr3t-never-shown@minio.internal:9000",
            "must not hold credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        ("http://minio.internal:port", "is not a URL such as http://localhost:9000 or https://s3.example.com"),
    ],
    ids=["no-scheme", "a-path", "credentials", "bad-port"],
)
def test_an_s3_endpoint_url_that_is_not_a_service_exits_2_naming_the_variable_never_its_value(tmp_path, url, problem):
    proc = run_module(tmp_path, S3_ENDPOINT_URL=url, ENCRYPTION_MASTER_KEY=KEY)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"uploads-consumer: configuration error: S3_ENDPOINT_URL: {problem}"]
    assert "minio.internal" not in proc.stderr and "s3cr3t" not in proc.stderr


@pytest.mark.parametrize("url", ["http://localhost:9000", "https://s3.eu-west-1.amazonaws.com/", "http://[::1]:9000"])
def test_an_s3_endpoint_url_naming_a_service_is_accepted(monkeypatch, url):
    monkeypatch.setenv("S3_ENDPOINT_URL", url)
    assert load_settings().s3_endpoint_url == url
