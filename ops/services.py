"""Clients of the fleet's dependencies (Redis, Kafka admin) and app loading.

Every role resolves addresses the same way: flags, then ``DSTREAM_*`` variables (on a dev
machine the ``dstream`` command sets those of the services ``dstream dev up`` started).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.errors import ConfigError, DStreamError, GraphError
from engine.graph import StreamingContext
from ops.config import Settings, load_settings

#: URL schemes of a Sentinel-managed Redis (plain, TLS): see :func:`redis_client`.
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")

#: Redis socket timeouts: a dead server is noticed within seconds, not minutes.
REDIS_TIMEOUT_S = 5.0


def settings_from(**flags: Any) -> Settings:
    """Settings from flags (those not None) over the ``DSTREAM_*`` environment.

    The runtime never looks for development services itself: where the tooling is
    installed, the ``dstream`` command fills in the environment from ``dstream dev up``
    first (:func:`ops.tools.devservices.use_dev_services`).
    """
    return load_settings(from_flags=True, **{k: v for k, v in flags.items() if v is not None})


def redis_client(settings: Settings, *, timeout: float = REDIS_TIMEOUT_S) -> Any:
    """The Redis client of every fleet role: the one place a Redis connection is made.

    ``redis://`` and ``rediss://`` (TLS) URLs connect to one server; AUTH comes from the
    URL or ``DSTREAM_REDIS_PASSWORD``. A Sentinel URL,
    ``redis+sentinel://[[user]:password@]host1:port1,host2:port2/<master-name>[/<db>]``
    (``rediss+sentinel://`` for TLS to the sentinels and the servers), asks the sentinels
    for the master and follows a failover: a connection that breaks or finds a demoted
    master asks them again. Behind a Sentinel URL every write is followed by
    ``WAIT 1 <redis_wait_timeout>`` while the master has a replica
    (:class:`ops.redis_sentinel.ReplicatedRedis`), so what the metadata log acknowledged
    survives a failover. *timeout* bounds connecting and each reply (the start-up probe,
    :mod:`ops.startup`, passes its shorter try).

    Raises:
        ConfigError: a Sentinel URL that does not parse.

    """
    import redis

    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 10,
    }
    password = settings.redis_password.get_secret_value()
    if password:
        kwargs["password"] = password
    url = settings.redis_url.get_secret_value()
    if not url.startswith(SENTINEL_SCHEMES):
        return redis.Redis.from_url(url, **kwargs)
    from redis.sentinel import Sentinel

    from ops.redis_sentinel import ReplicatedRedis, parse_sentinel_url

    target = parse_sentinel_url(url)
    if target.password:
        kwargs["password"] = target.password
    if target.username:
        kwargs["username"] = target.username
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if target.tls:
        kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs, **kwargs)
    client: Any = sentinel.master_for(target.master, redis_class=ReplicatedRedis, db=target.db)
    client.wait_timeout_ms = round(settings.redis_wait_timeout * 1000)
    return client


def topic_partitions(
    settings: Settings, topics: list[str], timeout: float = 30.0
) -> dict[str, int]:
    """Partition count of each topic.

    Raises:
        ConfigError: a topic does not exist; the message names it and how to create it.
        DependencyUnreachable: Kafka did not answer the metadata request in *timeout*.

    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from ops.startup import DependencyUnreachable, kafka_reason

    admin = AdminClient(settings.kafka_client_config())
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        msg = (
            f"kafka at {settings.kafka_bootstrap} did not answer (metadata request for the "
            f"input topics, {timeout:g} s): {kafka_reason(e)}"
        )
        raise DependencyUnreachable(msg, ["kafka"]) from e
    out: dict[str, int] = {}
    for t in topics:
        tm = md.topics.get(t)
        if tm is None or tm.error is not None or not tm.partitions:
            msg = (
                f"input topic {t!r} does not exist on {settings.kafka_bootstrap}; create it "
                f"(e.g. dstream produce --topic {t} --partitions 3 ...) and start again"
            )
            raise ConfigError(msg)
        out[t] = len(tm.partitions)
    return out


class AppFileError(ConfigError):
    """The app file cannot be used: it does not parse, an import fails, ``build()`` raises.

    The message is one line, ``<file>:<line>: <what is wrong>``, with the line of the app
    file where it went wrong (of the innermost frame in the app file; of the file that
    does not parse for a syntax error).

    Attributes:
        path: the file the error is in.
        line: its line number, or None when no line of it is involved.
        problem: what is wrong, without the location.

    """

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {problem}")


def _line_in(error: BaseException, path: Path) -> int | None:
    """The line of the innermost traceback frame of *error* that runs the file *path*."""
    target = path.resolve()
    line = None
    tb = error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _problem(error: BaseException) -> str:
    """What *error* says, with its type unless it is one of ours (which speak for themselves)."""
    if isinstance(error, DStreamError):
        return str(error)
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, ModuleNotFoundError):
        text += " (is it installed in this environment? is the name right?)"
    return text


def load_app(path: str) -> ModuleType:
    """Import the app file (``def build(ssc)``) as the module ``dstream_app_<file stem>``.

    Not under the file's own name: an app called ``queue.py`` or ``json.py`` would
    otherwise replace a standard-library module for the whole process.

    Raises:
        AppFileError: the file is missing, does not parse, raises while it is imported
            (a missing import...) or has no ``build``; the message is one line with the
            file and line.

    """
    p = Path(path)
    if not p.is_file():
        raise AppFileError(path, None, "no such app file")
    name = f"dstream_app_{p.stem}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise AppFileError(path, None, "cannot be imported as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:  # also in a module the app imports: name that file
        sys.modules.pop(name, None)
        where = e.filename or path
        if Path(where).resolve() == p.resolve():
            where = path  # as the user wrote it
        raise AppFileError(where, e.lineno, f"{type(e).__name__}: {e.msg}") from e
    except Exception as e:
        sys.modules.pop(name, None)
        raise AppFileError(path, _line_in(e, p), _problem(e)) from e
    if not callable(getattr(mod, "build", None)):
        raise AppFileError(path, None, "must define build(ssc: StreamingContext) -> None")
    return mod


def build_context(path: str, settings: Settings) -> StreamingContext:
    """Build the app's graph: every process calls this and gets the same node ids.

    Raises:
        AppFileError: loading the app failed (:func:`load_app`), ``build(ssc)`` raised
            (the line is the app file's innermost frame) or the graph is invalid.

    """
    mod = load_app(path)
    ssc = StreamingContext(settings.batch_interval, num_partitions=settings.num_partitions)
    try:
        mod.build(ssc)
    except Exception as e:
        problem = _problem(e)
        if not isinstance(e, DStreamError):
            problem = f"build(ssc) raised {problem}"
        raise AppFileError(path, _line_in(e, Path(path)), problem) from e
    try:
        ssc.validate()
    except GraphError as e:
        raise AppFileError(path, None, str(e)) from e
    return ssc


def app_id_for(path: str, settings: Settings) -> str:
    return settings.app_id or Path(path).stem


def source_layout(
    ssc: StreamingContext, counts: dict[str, int]
) -> dict[int, list[tuple[str, int]]]:
    """Per source node, its (topic, partition) list in block-index order."""
    layout: dict[int, list[tuple[str, int]]] = {}
    seen: dict[tuple[str, int], int] = {}
    for n in ssc.nodes:
        if n.kind != "source":
            continue
        if n.args["source"] == "queue":
            layout[n.id] = [("", 0)]
            continue
        tps = [(t, p) for t in n.args["topics"] for p in range(counts[t])]
        for tp in tps:
            if tp in seen:
                msg = f"topic {tp[0]} is read by two kafka_stream sources; read it once and reuse"
                raise GraphError(msg)
            seen[tp] = n.id
        layout[n.id] = tps
    return layout


def rpc_server(
    settings: Settings, handler: Any, *, port: int, name: str, host: str | None = None
) -> Any:
    """The RPC server of a fleet role, with the settings' secret, frame limit and TLS.

    Every role builds its server here, so transport security is configured in one place.
    With ``tls_cert``, ``tls_key`` and ``tls_ca`` set, the server requires mutual TLS (a
    client certificate chaining to the CA) and picks up rotated files for new connections
    (:mod:`ops.tls`); the shared secret is still checked inside TLS.

    Raises:
        ConfigError: only some of the TLS settings are set, or their files do not load.

    """
    from ops.rpc import RpcServer
    from ops.tls import from_settings

    tls = from_settings(settings)
    return RpcServer(
        handler,
        secret=settings.secret.get_secret_value().encode(),
        host=settings.bind_host if host is None else host,
        port=port,
        max_frame=settings.max_frame_bytes,
        name=name,
        ssl_context=None if tls is None else tls.server,
    )


def rpc_client(settings: Settings, address: str) -> Any:
    """An RPC client to *address* (``host:port``) with the settings' secret, limit and TLS.

    With TLS configured (see :func:`rpc_server`), each connection the client opens presents
    the process's current certificate and verifies the server's chain against the CA.

    Raises:
        ConfigError: only some of the TLS settings are set, or their files do not load.

    """
    from ops.rpc import RpcClient
    from ops.tls import from_settings

    tls = from_settings(settings)
    return RpcClient(
        address,
        secret=settings.secret.get_secret_value().encode(),
        max_frame=settings.max_frame_bytes,
        ssl_context=None if tls is None else tls.client,
    )
