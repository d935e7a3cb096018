"""System packages some tests need: skipped locally with the line that installs them, a failure under CI.

`.ci/run` installs every package named here before the tests (see docs/development.md, "Tests, lint and types").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# binary → the Debian package that provides it
PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "clamd": "clamav-daemon",
    "espeak-ng": "espeak-ng",
    "shellcheck": "shellcheck",
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "tesseract": "tesseract-ocr tesseract-ocr-eng",
    "chromium": "chromium",
}
# Debian keeps PostgreSQL's server tools off PATH, in a folder per major version.
POSTGRES_BINS = sorted(Path("/usr/lib/postgresql").glob("[0-9]*/bin"), key=lambda p: -int(p.parent.name))
EXTRA_PATHS = ":".join(["/usr/sbin", "/sbin", "/usr/local/sbin", *map(str, POSTGRES_BINS)])


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_tool(binary: str) -> str:
    """The binary's path; else skip (locally) or fail (CI=true) naming the apt-get line that provides it."""
    path = shutil.which(binary) or shutil.which(binary, path=EXTRA_PATHS)
    if path:
        return path
    reason = f"{binary} not found: sudo apt-get install -y --no-install-recommends {PACKAGES[binary]}"
    if in_ci():
        pytest.fail(f"{reason} (under CI a missing system package is a failure, not a skip)")
    pytest.skip(reason)
