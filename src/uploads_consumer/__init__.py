"""uploads-consumer: processes encrypted file-upload events from NATS JetStream."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("uploads-consumer")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
