"""Processor classes the plugin-interface tests load as `uc_test_processor_classes:NAME`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, field_validator

from uploads_consumer.config import Duration
from uploads_consumer.errors import ConfigError
from uploads_consumer.processors import ProcessingContext, Processor, ProcessorSettings


class AuditSettings(ProcessorSettings):
    endpoint: str = Field(description="where audit records go")
    token: SecretStr | None = None
    timeout: Duration = 5.0
    level: int = 1

    @field_validator("level")
    @classmethod
    def _level(cls, value: int) -> int:
        if value not in (1, 2):
            raise ValueError("must be 1 or 2")
        return value


class Audit(Processor):
    """Sends an audit record per upload (a third-party processor, declared as a class)."""

    settings_class = AuditSettings
    content_types: ClassVar[tuple[str, ...]] = ("audio/*",)
    external_effect = True
    started = 0

    async def start(self) -> None:
        assert isinstance(self.settings, AuditSettings)
        if self.settings.endpoint == "unreachable":
            raise ConfigError("AUDIT_ENDPOINT", "cannot be reached")
        type(self).started += 1

    async def run(self, ctx: ProcessingContext) -> None:
        ctx.report("sent", True)
