"""The one settings model: flags and ``DSTREAM_*`` environment variables, validated at start-up.

Every process (coordinator, worker, CLI helpers) builds a :class:`Settings` once and never
mutates it. Secrets (the RPC secret, passwords inside Kafka client settings or the Redis URL)
are kept as :class:`pydantic.SecretStr` or redacted by :func:`redacted`, so that logging or
printing the settings never shows them.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.durations import DurationError, to_seconds
from engine.errors import ConfigError

#: Kafka client keys whose values are secret (librdkafka names).
_SECRET_KAFKA_KEYS = re.compile(r"(password|secret|key\.pem|token|jaas)", re.IGNORECASE)
#: The fleet's fixed default ports (the image EXPOSEs them, the chart's defaults match).
COORDINATOR_RPC_PORT = 7070
COORDINATOR_HTTP_PORT = 8080
WORKER_RPC_PORT = 7071
WORKER_HTTP_PORT = 8081
#: Automatic peer deadline: a quarter of a batch interval, but at least
#: :data:`PEER_DEADLINE_MIN_S` and at most :data:`PEER_DEADLINE_MAX_S`. A sealed block holds
#: one interval of records and a fetched block one task's worth: over loopback or a LAN
#: they move in milliseconds, so a peer that has not answered in a quarter of an interval
#: is paused or wedged. It is below the coordinator's seal wait (half an interval): a
#: healthy worker whose replica peer is paused still answers its seal in time. The floor
#: allows for a loaded peer whose handler thread waits tens of milliseconds for the GIL;
#: past the cap, waiting longer only delays the fallback (another peer or holder).
PEER_DEADLINE_FRACTION = 0.25
PEER_DEADLINE_MIN_S = 0.1
PEER_DEADLINE_MAX_S = 1.0
#: Settings in seconds that also take a duration text (``"500ms"``, ``"1s"``, ``"2m"``, ``"1h"``)
DURATION_FIELDS = (
    "batch_interval",
    "lease_seconds",
    "heartbeat_interval",
    "peer_deadline",
    "redis_wait_timeout",
    "task_retry_alert_seconds",
    "startup_timeout",
)
#: What a duration flag or ``DSTREAM_*`` variable accepts, as error messages say it.
DURATION_TEXT_FORMS = '"500ms", "1s", "2m", "1h" or a number of seconds'
#: ``DSTREAM_*`` variables read outside :class:`Settings` (so never reported as unknown):
#: the log level (``dstream`` commands), fault injection (:mod:`ops.faults`), the dev
#: services' home (:mod:`ops.tools.devservices`), the devkit's image and helm scripts
#: (``ops/tools/devkit/``) and the tests' switches (``tests/e2e``, ``tests/deploy``).
ENV_OUTSIDE_SETTINGS = frozenset(
    {
        "DSTREAM_LOG_LEVEL",
        "DSTREAM_FAULT_CRASH",
        "DSTREAM_FAULT_SLOW",
        "DSTREAM_FAULT_DIR",
        "DSTREAM_DEV_HOME",
        "DSTREAM_DEBIAN_MIRROR",
        "DSTREAM_BASE_IMAGE",
        "DSTREAM_HELM",
        "DSTREAM_HELM_VERSION",
        "DSTREAM_UPDATE_SCREENSHOTS",
        "DSTREAM_DEPLOY_VALUES",
        "DSTREAM_DEPLOY_SET",
    }
)
#: The variables Kubernetes sets for each Service of the namespace (``<SERVICE>_SERVICE_HOST``,
#: ``<SERVICE>_PORT_7070_TCP_ADDR``...): a release named ``dstream-fleet`` gets variables
#: that start with ``DSTREAM_`` (its coordinator's ``..._SERVICE_HOST``), no misspellings.
_SERVICE_LINK = re.compile(
    r".+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)"
)
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
    #: require the shared secret (``Authorization: Bearer <secret>``) on the coordinator's
    #: HTTP status (``/api/status``); probes and ``/metrics`` stay open
    http_auth: bool = False
    #: record and export the Prometheus metrics; false makes every metric a no-op (what
    #: the throughput benchmark's metrics-off variant measures)
    metrics: bool = True
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    max_frame_bytes: int = 64 * 1024 * 1024
    #: the coordinator's address, or a comma-separated list of every coordinator's (one
    #: leads; all share one port, which each coordinator listens on)
    coordinator: str = f"127.0.0.1:{COORDINATOR_RPC_PORT}"
    #: the leader lease (s): a standby takes over this long after a leader dies at most
    lease_seconds: float = 2.0
    bind_host: str = "127.0.0.1"
    advertise_host: str = ""
    #: a worker's RPC port (0: any free port, as ``dstream run`` uses on one host)
    rpc_port: int = WORKER_RPC_PORT
    task_slots: int = 2
    heartbeat_interval: float = 0.5
    heartbeat_misses: int = 3
    #: the deadline (s) of a worker's call to a peer (replicating a sealed block, fetching
    #: a block); 0: automatic (:attr:`Settings.peer_deadline_s`)
    peer_deadline: float = 0.0
    #: connections a worker keeps open to its peers at most (least recently used closed
    #: first; a call in progress is never cut): a fleet up to this size + 1 reuses every one
    peer_connections: int = 32
    max_records_per_partition: int = 0  # per batch; 0 means unlimited
    adaptive_rate: bool = False  # lower the per-partition cap to keep batches in time
    speculation: bool = True
    speculation_multiplier: float = 1.4
    speculation_quantile: float = 0.75
    dead_letter_topic: str = ""
    #: partitions and replication factor of an output or dead-letter topic the coordinator
    #: creates at start because it did not exist (-1: the broker's default replication)
    output_topic_partitions: int = 1
    output_topic_replication: int = -1
    #: seconds a Redis write waits (WAIT 1) for a replica's acknowledgement when the URL
    #: is a Sentinel one and the master has a replica; 0: never wait
    redis_wait_timeout: float = 1.0
    #: a dead letter's value is cut to its first 1,024 bytes (headers say so) past this
    #: size: with its headers it stays under librdkafka's default ``message.max.bytes``
    #: (1,000,000) and the broker's (1,048,588), so no dead letter is ever refused
    dead_letter_max_bytes: int = 990_000
    fail_on_error: bool = False
    #: a task that keeps failing (transient errors, retried with backoff) for longer than
    #: this (s) is reported once at ERROR and counted in ``dstream_stuck_tasks``
    task_retry_alert_seconds: float = 60.0
    #: HTTP port (probes, /metrics, status); None: the role's default
    #: (:data:`COORDINATOR_HTTP_PORT` or :data:`WORKER_HTTP_PORT`); 0: any free port
    http_port: int | None = None
    #: how long (s) a coordinator, a worker or ``dstream run`` waits at start for Kafka and
    #: Redis to answer, retrying with backoff (:mod:`ops.startup`), before it exits with
    #: one line naming the address: 60 s stays inside the chart's liveness allowance
    #: (about 65 s), so the process says why it stops before a probe kills it
    startup_timeout: float = Field(default=60.0, gt=0, le=3600)

    @field_validator(*DURATION_FIELDS, mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        """A duration setting: ``"500ms"``, ``"1s"``, ``"2m"``, ``"1h"`` or seconds."""
        if isinstance(v, str | int | float | timedelta):
            try:
                return to_seconds(v)
            except DurationError:
                msg = f"cannot read {v!r} as a duration; use {DURATION_TEXT_FORMS}"
                raise ValueError(msg) from None
        return v

    @field_validator("batch_interval")
    @classmethod
    def _positive_interval(cls, v: float) -> float:
        if v <= 0:
            msg = f"must be positive, got {v:g}"
            raise ValueError(msg)
        if not 0.01 <= v <= 3600:
            msg = f"must be between 10ms and 1h (3600 s), got {v:g} s"
            raise ValueError(msg)
        return v

    @field_validator("num_partitions", "task_slots", "heartbeat_misses", "peer_connections")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            msg = f"must be at least 1, got {v}"
            raise ValueError(msg)
        return v

    @field_validator("output_topic_partitions")
    @classmethod
    def _topic_partitions(cls, v: int) -> int:
        if v < 1:
            msg = f"must be at least 1, got {v}"
            raise ValueError(msg)
        return v

    @field_validator("output_topic_replication")
    @classmethod
    def _topic_replication(cls, v: int) -> int:
        if v == 0 or v < -1:
            msg = f"must be -1 (the broker's default) or at least 1, got {v}"
            raise ValueError(msg)
        return v

    @field_validator("redis_wait_timeout")
    @classmethod
    def _wait_timeout(cls, v: float) -> float:
        if not 0 <= v <= 4:  # below the Redis clients' 5 s socket timeout
            msg = f"must be between 0 and 4 s, got {v:g} s"
            raise ValueError(msg)
        return v

    @field_validator("coordinator")
    @classmethod
    def _coordinators(cls, v: str) -> str:
        addrs = [a.strip() for a in v.split(",") if a.strip()]
        ports = set()
        for a in addrs:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit():
                msg = f"coordinator addresses must be host:port, got {a!r}"
                raise ValueError(msg)
            ports.add(port)
        if not addrs or len(ports) != 1:
            msg = f"every coordinator address must name the same port (each listens on it): {v!r}"
            raise ValueError(msg)
        return ",".join(addrs)

    @field_validator("lease_seconds")
    @classmethod
    def _lease(cls, v: float) -> float:
        if not 1.0 <= v <= 300:
            msg = f"must be between 1 s and 300 s, got {v:g} s"
            raise ValueError(msg)
        return v

    @property
    def coordinator_addresses(self) -> list[str]:
        """Every configured coordinator address (``host:port``), in order."""
        return self.coordinator.split(",")

    @property
    def coordinator_port(self) -> int:
        """The port every coordinator listens on (the one all the addresses share)."""
        return int(self.coordinator_addresses[0].rpartition(":")[2])

    @field_validator("rpc_port", "http_port")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= 65535:
            msg = f"a port must be between 0 and 65535 (0: any free port), got {v}"
            raise ValueError(msg)
        return v

    def http_port_for(self, role: str) -> int:
        """The HTTP port of *role* (``coordinator`` or ``worker``): the setting or its default."""
        if self.http_port is not None:
            return self.http_port
        return COORDINATOR_HTTP_PORT if role == "coordinator" else WORKER_HTTP_PORT

    @field_validator("kafka_config", mode="before")
    @classmethod
    def _parse_kafka_config(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as e:
                msg = f"must be a JSON object of librdkafka settings: {e}"
                raise ValueError(msg) from e
        if isinstance(v, dict):
            return {str(k): str(x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> Settings:
        given = {
            f"DSTREAM_TLS_{n.upper()}": bool(getattr(self, f"tls_{n}"))
            for n in ("cert", "key", "ca")
        }
        if any(given.values()) and not all(given.values()):
            have = [k for k, v in given.items() if v]
            missing = [k for k, v in given.items() if not v]
            msg = (
                f"RPC TLS needs a certificate, its key and a CA: {', '.join(have)} set but "
                f"{', '.join(missing)} missing; set all three for mutual TLS, or none"
            )
            raise ValueError(msg)
        return self

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

    @model_validator(mode="after")
    def _peer_deadline_below_heartbeat_timeout(self) -> Settings:
        if not 0 <= self.peer_deadline < self.heartbeat_timeout:
            msg = (
                f"peer_deadline must be at least 0 (0: automatic) and below the heartbeat "
                f"timeout (heartbeat_interval * heartbeat_misses = {self.heartbeat_timeout:g} s), "
                f"got {self.peer_deadline:g} s"
            )
            raise ValueError(msg)
        return self

    @property
    def heartbeat_timeout(self) -> float:
        """Seconds of silence after which the coordinator declares a worker lost."""
        return self.heartbeat_interval * self.heartbeat_misses

    @property
    def peer_deadline_s(self) -> float:
        """The deadline of a call to a peer worker: the setting, or automatic.

        Automatic: a quarter of a batch interval within [:data:`PEER_DEADLINE_MIN_S`,
        :data:`PEER_DEADLINE_MAX_S`], and below half the heartbeat timeout, so a worker
        has moved on from a paused peer well before the coordinator declares it lost.
        """
        if self.peer_deadline:
            return self.peer_deadline
        auto = max(PEER_DEADLINE_MIN_S, self.batch_interval * PEER_DEADLINE_FRACTION)
        return min(PEER_DEADLINE_MAX_S, auto, self.heartbeat_timeout / 2)

    @property
    def batch_interval_ms(self) -> int:
        return round(self.batch_interval * 1000)

    def kafka_client_config(self, **extra: Any) -> dict[str, Any]:
        """The librdkafka configuration for a client: bootstrap, pass-through, then *extra*.

        Every Kafka client of the runtime is built from this, so every one logs through
        ``dstream.kafka`` (:mod:`ops.kafka_log`: repeats held back, retried connection
        failures at WARNING) instead of printing librdkafka's lines on stderr.
        """
        from ops.kafka_log import kafka_logger

        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "logger": kafka_logger(),
        }
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


def load_settings(*, from_flags: bool = False, **overrides: Any) -> Settings:
    """Build the settings from the environment and *overrides*, failing fast.

    Args:
        from_flags: the overrides are command-line flags (``batch_interval`` came from
            ``--batch-interval``): error messages then name the flag, not the keyword.
        **overrides: setting values over the ``DSTREAM_*`` environment (None: not given).

    Raises:
        ConfigError: a value is invalid; one line per offending setting, naming it (its
            flag, ``DSTREAM_*`` variable or keyword: where the value came from) and the
            value, e.g. ``batch interval (--batch-interval): must be positive, got -1``.

    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as e:
        lines = [_error_line(err, clean, from_flags) for err in e.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from e
    except Exception as e:  # pydantic-settings' SettingsError: a variable it cannot parse
        msg = f"invalid settings: {e}"
        if "kafka_config" in str(e):
            msg = (
                "kafka config (DSTREAM_KAFKA_CONFIG): must be a JSON object of librdkafka "
                'settings, e.g. {"security.protocol": "SASL_SSL"}'
            )
        raise ConfigError(msg) from e


def _error_line(err: Any, given: Mapping[str, Any], from_flags: bool) -> str:
    """One pydantic error as one line: ``<setting> (<where it was set>): <what is wrong>``."""
    text = str(err.get("msg", ""))
    if err.get("type") == "value_error":
        text = text.removeprefix("Value error, ")
    else:  # a type error ("Input should be a valid integer..."): say what was given
        text = f"{text[:1].lower()}{text[1:]}, got {err.get('input')!r}"
    loc = err.get("loc") or ()
    field = str(loc[0]) if loc else ""
    if field not in Settings.model_fields:
        return text  # a check across settings: its message names them
    if field in given:
        where = f"--{field.replace('_', '-')}" if from_flags else field
    else:
        where = f"DSTREAM_{field.upper()}"
    return f"{field.replace('_', ' ')} ({where}): {text}"


def known_env_names() -> frozenset[str]:
    """Every ``DSTREAM_*`` variable something reads: the settings' and the others'."""
    fields = {f"DSTREAM_{name.upper()}" for name in Settings.model_fields}
    return frozenset(fields) | ENV_OUTSIDE_SETTINGS


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``DSTREAM_*`` variables of *environ* that nothing reads, with the closest known names.

    Each as ``(name, closest known name or "")``: a misspelled setting would otherwise be
    silently ignored. Kubernetes' service link variables are not reported.
    """
    known = known_env_names()
    suffixes = sorted(k.removeprefix("DSTREAM_") for k in known)  # the shared prefix is no hint
    out = []
    for name in sorted(environ):
        upper = name.upper()
        link = _SERVICE_LINK.fullmatch(upper) or (
            upper.endswith("_PORT") and environ[name].startswith(("tcp://", "udp://", "sctp://"))
        )
        if upper.startswith("DSTREAM_") and upper not in known and not link:
            close = difflib.get_close_matches(upper.removeprefix("DSTREAM_"), suffixes, n=1)
            out.append((name, f"DSTREAM_{close[0]}" if close else ""))
    return out
