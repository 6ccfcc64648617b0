"""What a Redis server keeps on disk, and a warning, once, when it keeps nothing.

A Redis with neither the append-only file (``appendonly yes``) nor snapshots (``save``) loses
everything it holds when it restarts: for a broker, every event published and not yet handled,
which the outbox relay has already deleted. That is the broker's promise, not a bug, but nobody
should learn it from a lost order: the Redis Streams transport, the Celery transport on Redis
(publishing and in the worker) and the relay call :func:`warn_if_forgetful` when they first
reach their Redis, and ``tidings outbox status --transport URL`` shows :func:`describe_url`.

The settings are read with ``CONFIG GET``; where a managed Redis disables or renames ``CONFIG``,
``INFO persistence`` tells whether the append-only file is on (not the snapshot schedule).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tidings._untrusted import log_safe, redact_url

__all__ = [
    "Persistence",
    "describe_url",
    "persistence",
    "warn_if_forgetful",
    "warn_url_if_forgetful",
]

log = logging.getLogger("tidings.redis")

_SETTINGS = "set appendonly yes (appendfsync everysec or always), or a save schedule"


@dataclass(frozen=True)
class Persistence:
    """What one Redis server keeps on disk, as far as it tells.

    ``aof`` is whether the append-only file is on, ``save`` the snapshot schedule (``""``: no
    snapshots), ``fsync`` the ``appendfsync`` policy; each ``None`` when Redis would not say,
    with ``unknown`` saying why.
    """

    aof: bool | None
    save: str | None
    fsync: str | None = None
    unknown: str | None = None

    @property
    def persists(self) -> bool | None:
        """Whether a restart keeps anything: ``True``, ``False``, or ``None`` when unknown."""
        if self.aof:
            return True
        if self.save:
            return True
        if self.aof is False and self.save == "":
            return False
        return None

    def describe(self) -> str:
        """One line for an operator: what a restart of this Redis keeps."""
        if self.aof:
            fsync = f", appendfsync {self.fsync}" if self.fsync else ""
            return f"persists: append-only file on (appendonly yes{fsync})"
        if self.save:
            return (
                f"persists: snapshots only (save {self.save!r}, appendonly no): a crash loses "
                "what came after the last snapshot"
            )
        if self.persists is False:
            return (
                'keeps nothing on disk (appendonly no, save ""): a restart loses every message '
                f"it holds; {_SETTINGS}"
            )
        return f"persistence unknown ({self.unknown or 'Redis did not say'})"


def persistence(client: Any) -> Persistence:
    """Ask the Redis of ``client`` (a redis-py client) what it keeps on disk.

    ``CONFIG GET`` first; if Redis refuses it (disabled or renamed, as on managed services),
    ``INFO persistence``. Connection errors propagate; a refusal of both gives an unknown
    :class:`Persistence`.
    """
    import redis  # noqa: PLC0415 - the redis extra; only a Redis user calls this

    try:
        config = {}
        for name in ("appendonly", "save", "appendfsync"):
            config.update(_text_map(client.config_get(name)))
    except redis.ResponseError as refused:
        try:
            info = client.info("persistence")
        except redis.ResponseError as exc:
            why = f"CONFIG and INFO refused: {log_safe(str(refused), 80)}; {log_safe(str(exc), 80)}"
            return Persistence(aof=None, save=None, unknown=why)
        aof = info.get("aof_enabled")
        return Persistence(
            aof=None if aof is None else str(aof) == "1",
            save=None,
            unknown="CONFIG is disabled: the snapshot schedule is unknown",
        )
    aof_setting = config.get("appendonly")
    return Persistence(
        aof=None if aof_setting is None else aof_setting.lower() == "yes",
        save=config.get("save"),
        fsync=config.get("appendfsync"),
        unknown=None if config else "CONFIG GET answered nothing",
    )


_checked: set[str] = set()  # servers checked (host:port), under _lock
_pools: set[int] = set()  # connection pools whose server was checked: the cheap first test
_failed: dict[int, float] = {}  # pool → when a check last could not reach its server
_lock = threading.Lock()
_RETRY_AFTER = 60.0
"""Seconds before a check that could not reach its Redis is tried again (from that pool)."""


def warn_if_forgetful(client: Any, what: str) -> Persistence | None:
    """Warn (log ``tidings.redis``, WARNING) once per server and process if it keeps nothing.

    ``what`` names the user of that Redis in the warning ("the Celery broker"). A server
    whose persistence is unknown is logged once at INFO. Never raises: if Redis cannot be
    reached the check is left for a call :data:`_RETRY_AFTER` s later (``None`` is returned),
    so that a Redis refusing it costs a publisher one round trip a minute at most.
    """
    pool = id(getattr(client, "connection_pool", client))
    if pool in _pools:
        return None
    failed = _failed.get(pool)
    if failed is not None and time.monotonic() - failed < _RETRY_AFTER:
        return None
    key = _server_key(client)
    with _lock:
        if key in _checked:
            _pools.add(pool)
            return None
    try:
        found = persistence(client)
    except Exception as exc:  # noqa: BLE001 - a check must never break its caller
        log.debug("could not ask Redis what it keeps on disk: %r", exc)
        with _lock:
            _failed[pool] = time.monotonic()
            while len(_failed) > 1000:
                del _failed[next(iter(_failed))]
        return None
    with _lock:
        _failed.pop(pool, None)
        _pools.add(pool)
        if key in _checked:
            return found
        _checked.add(key)
    where = log_safe(key, 200)
    if found.persists is False:
        log.warning("the Redis at %s (%s) %s", where, what, found.describe())
    elif found.persists is None:
        log.info("the Redis at %s (%s): %s", where, what, found.describe())
    return found


def warn_url_if_forgetful(spec: str, what: str) -> Persistence | None:
    """:func:`warn_if_forgetful` for a transport URL (``redis://…``, ``celery+redis://…``).

    Anything else (AMQP, ``memory://``, ``module:attribute``) is left alone (``None``).
    """
    url = _redis_url(spec)
    if url is None:
        return None
    import redis  # noqa: PLC0415 - the redis extra

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        return warn_if_forgetful(client, what)
    finally:
        client.close()


def describe_url(spec: str) -> str | None:
    """The line ``tidings outbox status`` shows for a transport URL, ``None`` if not Redis.

    ``spec`` is a relay ``--transport``: ``redis://…`` or ``celery+redis://…`` (query
    options are ignored). An unreachable Redis gives a line saying so.
    """
    url = _redis_url(spec)
    if url is None:
        return None
    import redis  # noqa: PLC0415 - the redis extra

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        text = persistence(client).describe()
    except redis.RedisError as exc:
        text = f"persistence unknown (Redis unreachable: {type(exc).__name__})"
    finally:
        client.close()
    return f"broker {redact_url(url)}: {text}"


def _redis_url(spec: str) -> str | None:
    """The Redis URL of a transport URL, without query options; ``None`` if not Redis."""
    parts = urlsplit(spec)
    scheme = parts.scheme.removeprefix("celery+")
    if scheme not in {"redis", "rediss", "unix"}:
        return None
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def _text_map(reply: Any) -> dict[str, str]:
    if not isinstance(reply, dict):
        return {}
    return {_text(key): _text(value) for key, value in reply.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _server_key(client: Any) -> str:
    """``host:port`` (or the socket path) of a redis-py client's pool, without secrets."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
