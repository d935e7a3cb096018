"""The console is a process of its own over a read model: the daemon never imports it, and it never imports
the loop, the pipeline or the processors (it reads NATS and the audit store, nothing a daemon runs)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "uploads_consumer"
LOOP = {"consumer", "session", "source", "inflight", "settler", "pipeline", "processors", "workdir"}
COMMANDS = {"cli.py", "trace.py"}  # what a person runs may start the console or read its model


def imported(path: Path) -> set[str]:
    """The uploads_consumer modules a file imports (`from uploads_consumer import x` counts as `.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("uploads_consumer")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uploads_consumer"):
            found.add(node.module)
            if node.module == "uploads_consumer":
                found |= {f"uploads_consumer.{a.name}" for a in node.names}
    return found


def test_the_console_never_imports_the_loop_the_pipeline_or_the_processors():
    for path in sorted((SRC / "console").glob("*.py")):
        below = {m for m in imported(path) if m.split(".")[1] in LOOP}
        assert not below, f"{path.name} imports {sorted(below)}"


def test_only_the_commands_import_the_console():
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "console" or path.name in COMMANDS:
            continue
        console = {m for m in imported(path) if m.startswith("uploads_consumer.console")}
        assert not console, f"{path.relative_to(SRC)} imports {sorted(console)}"
