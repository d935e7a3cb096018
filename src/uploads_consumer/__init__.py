"""uploads-consumer: processes encrypted file-upload events from NATS JetStream."""

from typing import Any

from uploads_consumer.deferred import defer


def __getattr__(name: str) -> Any:
    # `__version__` read when asked for: importlib.metadata costs a short command (`trace`) a tenth of a second.
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uploads-consumer")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0"


defer("aiohttp")  # nats-py's WebSocket transport alone needs it (uploads_consumer/deferred.py)
