"""The one settings model: flags and ``DSTREAM_*`` environment variables, validated at start-up.

Every process (coordinator, worker, CLI helpers) builds a :class:`Settings` once and never
mutates it. Secrets (the RPC secret, passwords inside Kafka client settings or the Redis URL)
are kept as :class:`pydantic.SecretStr` or redacted by :func:`redacted`, so that logging or
printing the settings never shows them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import ConfigError

#: Kafka client keys whose values are secret (librdkafka names).
_SECRET_KAFKA_KEYS = re.compile(r"(password|secret|key\.pem|token|jaas)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z+]+://)(?P<user>[^:@/]*):(?P<pw>[^@/]+)@")


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


class Settings(BaseSettings):
    """All settings of a dstream-fleet process.

    Environment variables use the ``DSTREAM_`` prefix (``DSTREAM_BATCH_INTERVAL=0.5``).
    ``kafka_config`` takes librdkafka settings as a JSON object
    (``DSTREAM_KAFKA_CONFIG='{"security.protocol": "SASL_SSL"}'``) and is passed through to
    every Kafka client unchanged.
    """

    model_config = SettingsConfigDict(env_prefix="DSTREAM_", frozen=True, extra="forbid")

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_config: dict[str, str] = Field(default_factory=dict, repr=False)  # may hold secrets
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_password: SecretStr = SecretStr("")
    app_id: str = ""
    batch_interval: float = 1.0
    num_partitions: int = 4
    checkpoint_every: int = 0  # batches; 0 means "about every 10 s of batches"
    secret: SecretStr = SecretStr("")
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    max_frame_bytes: int = 64 * 1024 * 1024
    coordinator: str = "127.0.0.1:7070"
    bind_host: str = "127.0.0.1"
    advertise_host: str = ""
    task_slots: int = 2
    heartbeat_interval: float = 0.5
    heartbeat_misses: int = 3
    max_records_per_partition: int = 0  # per batch; 0 means unlimited
    adaptive_rate: bool = False  # lower the per-partition cap to keep batches in time
    speculation: bool = True
    speculation_multiplier: float = 1.4
    speculation_quantile: float = 0.75
    dead_letter_topic: str = ""
    fail_on_error: bool = False
    http_port: int = 0
    metrics: bool = True

    @field_validator("batch_interval")
    @classmethod
    def _positive_interval(cls, v: float) -> float:
        if not 0.01 <= v <= 3600:
            msg = f"batch interval must be between 0.01 s and 3600 s, got {v}"
            raise ValueError(msg)
        return v

    @field_validator("num_partitions", "task_slots", "heartbeat_misses")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            msg = f"must be at least 1, got {v}"
            raise ValueError(msg)
        return v

    @field_validator("kafka_config", mode="before")
    @classmethod
    def _parse_kafka_config(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as e:
                msg = f"DSTREAM_KAFKA_CONFIG must be a JSON object of librdkafka settings: {e}"
                raise ValueError(msg) from e
        if isinstance(v, dict):
            return {str(k): str(x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _checkpoint_default(self) -> Settings:
        if self.checkpoint_every < 0:
            msg = f"checkpoint_every must be >= 0 batches, got {self.checkpoint_every}"
            raise ValueError(msg)
        return self

    @property
    def checkpoint_every_batches(self) -> int:
        """Batches between state checkpoints: the setting, or about 10 s of batches."""
        if self.checkpoint_every:
            return self.checkpoint_every
        return max(1, round(10.0 / self.batch_interval))

    @property
    def batch_interval_ms(self) -> int:
        return round(self.batch_interval * 1000)

    def kafka_client_config(self, **extra: Any) -> dict[str, Any]:
        """The librdkafka configuration for a client: bootstrap, pass-through, then *extra*."""
        conf: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap}
        conf.update(self.kafka_config)
        conf.update(extra)
        return conf

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict that is safe to log or show: no secret in clear."""
        out = self.model_dump()
        out["redis_url"] = redact_url(self.redis_url.get_secret_value())
        out["secret"] = "***" if self.secret.get_secret_value() else ""
        out["redis_password"] = "***" if self.redis_password.get_secret_value() else ""
        out["kafka_config"] = {
            k: ("***" if _SECRET_KAFKA_KEYS.search(k) else v) for k, v in self.kafka_config.items()
        }
        return out


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment and *overrides* (flags), failing fast.

    Raises:
        ConfigError: a value is invalid; the message names the setting and the value.

    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except Exception as e:  # pydantic.ValidationError carries every offending value
        msg = f"invalid settings: {e}"
        if "kafka_config" in str(e):
            msg += (
                "; DSTREAM_KAFKA_CONFIG must be a JSON object of librdkafka settings, "
                'e.g. {"security.protocol": "SASL_SSL"}'
            )
        raise ConfigError(msg) from e
