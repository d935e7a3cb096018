"""The master keys an operator relies on: one source at a time, the ring shown by fingerprint at start, and
`keys check` saying which key opens the newest uploads before a typo dead-letters them."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys

from helpers import make_files, publish_uploads, wait_ready


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", *args], env=env, capture_output=True, text=True, timeout=120
    )


def fingerprint(key_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(key_b64)).hexdigest()[:12]


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_both_key_variables_set_is_a_configuration_error_naming_both(daemon_env, tmp_path):
    key_file = tmp_path / "master.key"
    key_file.write_text(new_key())
    out = cli({**daemon_env, "ENCRYPTION_MASTER_KEY_FILE": str(key_file)}, "status")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "uploads-consumer: configuration error: ENCRYPTION_MASTER_KEY: and ENCRYPTION_MASTER_KEY_FILE are both "
        "set; set one (the file, for a key kept as a secret)"
    )
    assert daemon_env["ENCRYPTION_MASTER_KEY"] not in out.stderr + out.stdout


async def test_the_ring_is_logged_by_fingerprint_and_keys_check_names_the_key_of_each_upload(
    tmp_path, daemon_env, settings_for, start_daemon, master_key
):
    old = new_key()
    typo = new_key()  # still base64 of 32 bytes: it starts cleanly, and opens nothing
    daemon = start_daemon(ENCRYPTION_PREVIOUS_MASTER_KEYS=old)
    await wait_ready(daemon)
    assert daemon.terminate() == 0
    [loaded] = [line for line in daemon.log_text().splitlines() if "master keys loaded" in line]
    assert f'"current": "{fingerprint(master_key)}"' in loaded and f'"previous": ["{fingerprint(old)}"]' in loaded
    assert master_key not in daemon.log_text() and old not in daemon.log_text()

    await publish_uploads(settings_for(ENCRYPTION_MASTER_KEY=old), make_files(tmp_path / "old", 1, prefix="old"))
    await publish_uploads(settings_for(), make_files(tmp_path / "new", 2, prefix="new"))
    good = cli({**daemon_env, "ENCRYPTION_PREVIOUS_MASTER_KEYS": old}, "keys", "check")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "checked 3 uploads: 2 current, 1 previous 1" in good.stdout
    assert f"previous 1 ({fingerprint(old)})" in good.stdout

    bad = cli({**daemon_env, "ENCRYPTION_PREVIOUS_MASTER_KEYS": typo}, "keys", "check")
    assert bad.returncode == 1
    assert "checked 3 uploads: 2 current, 1 none" in bad.stdout and "NONE of the ring's keys" in bad.stdout
    assert "some uploads open under no key of the ring" in bad.stderr
    assert typo not in bad.stdout + bad.stderr
