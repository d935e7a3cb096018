"""Modules imported at their first use, not when something imports them.

nats-py imports aiohttp when it is imported, for its WebSocket transport alone (`ws://` servers), and
aiohttp costs a command that speaks NATS alone (`trace`, `status`, `dlq list`) 150 ms of its start: its
connector builds SSL contexts as it is imported. importlib's LazyLoader does not help: `import aiohttp`
reads the module's `__spec__`, which makes LazyLoader load it. A `Deferred` module answers `__spec__`
itself and imports the real module at the first other attribute asked of it; the daemon, which uses
aiohttp for S3 and its HTTP port, so loads it as it starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any


class Deferred(types.ModuleType):
    """Stands in `sys.modules` for a module until an attribute of it is asked for."""

    def __init__(self, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        # Called for what the stand-in itself lacks: everything but its name, spec and lock.
        with self._lock:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer(name: str) -> None:
    """Import `name` at its first use (nothing if it is imported already, or not installed)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is not None:
        sys.modules[name] = Deferred(spec)
