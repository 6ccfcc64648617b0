"""What a transport uses when it is not told: an inbox and a dead-letter store on its Redis.

Every (handler, event) passes the inbox: a transport built without ``inbox=`` gets a
:class:`~tidings.inbox.redis.RedisInbox` on the Redis it already talks to, and without
``dead_letters=`` a :class:`~tidings.deadletter.redis.RedisDeadLetterStore` there, both with
keys scoped to the consuming service (its queue or its name), so that two services on one
Redis never share a done mark or a dead letter. ``inbox=None`` is the explicit opt-out (effects
then happen at least once); leaving ``inbox`` out never means "none". Where there is no Redis to
use (Celery on RabbitMQ), the transport refuses to guess: see :func:`refuse_without_redis`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

from tidings._untrusted import redact_url
from tidings.errors import UsageError

if TYPE_CHECKING:
    import redis

    from tidings.ports import DeadLetterStore, Inbox

__all__ = [
    "DEFAULT",
    "Default",
    "dead_letter_prefix",
    "inbox_prefix",
    "redis_dead_letters",
    "redis_inbox",
    "redis_py_url",
    "refuse_without_redis",
]

# Query options of a Redis URL that redis-py's connections take; kombu's own (global_keyprefix,
# visibility_timeout, ...) would make every connection of the default stores fail.
_REDIS_PY_OPTIONS: Final = frozenset(
    {
        "db", "health_check_interval", "max_connections", "protocol", "retry_on_timeout",
        "socket_connect_timeout", "socket_keepalive", "socket_timeout", "timeout",
        "client_name", "username", "password",
    }
)  # fmt: skip


class Default(enum.Enum):
    """The type of :data:`DEFAULT`: "not given", which is not ``None`` ("none, on purpose")."""

    LEFT_OUT = "left out"


DEFAULT: Final = Default.LEFT_OUT
"""An argument left out: the transport picks its default (``None`` would mean "none")."""


def inbox_prefix(scope: str) -> str:
    """The key prefix of a service's default inbox: ``tidings:inbox:{scope}``."""
    return f"tidings:inbox:{scope}"


def dead_letter_prefix(scope: str) -> str:
    """The key prefix of a service's default dead-letter store: ``tidings:dlq:{scope}``."""
    return f"tidings:dlq:{scope}"


def redis_inbox(client: redis.Redis, scope: str) -> Inbox:
    """Return the default inbox of service ``scope`` on ``client`` (contacts nothing)."""
    from tidings.inbox.redis import RedisInbox  # noqa: PLC0415 - needs redis-py

    return RedisInbox(client, prefix=inbox_prefix(scope))


def redis_dead_letters(client: redis.Redis, scope: str) -> DeadLetterStore:
    """Return the default dead-letter store of service ``scope`` on ``client``."""
    from tidings.deadletter.redis import RedisDeadLetterStore  # noqa: PLC0415 - needs redis-py

    return RedisDeadLetterStore(client, prefix=dead_letter_prefix(scope))


def redis_py_url(broker_url: str) -> str:
    """The Redis URL of a Celery broker URL, keeping only the options redis-py takes.

    ``redis://h:6379/0?global_keyprefix=x&ssl_cert_reqs=required`` keeps ``ssl_cert_reqs``
    (every ``ssl_*`` option) and drops kombu's ``global_keyprefix``.
    """
    parts = urlsplit(broker_url)
    if not parts.query:
        return broker_url
    kept = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name in _REDIS_PY_OPTIONS or name.startswith("ssl_")
    ]
    return parts._replace(query=urlencode(kept)).geturl()


def refuse_without_redis(broker_url: str, missing: list[str]) -> UsageError:
    """The error of a Celery transport whose broker is not Redis and that lacks ``missing``.

    It names each argument to pass, with an example, and the explicit opt-out of the inbox.
    """
    examples = {
        "inbox": (
            "inbox=SqlInbox(engine) (from tidings.inbox.sql: effects in that database happen "
            "once) or inbox=RedisInbox(redis.Redis.from_url('redis://localhost:6379/0'), "
            "prefix='tidings:inbox:<queue>') (from tidings.inbox.redis); inbox=None runs "
            "handlers without an inbox (at-least-once effects)"
        ),
        "dead_letters": (
            "dead_letters=SqlDeadLetterStore(engine) (from tidings.deadletter.sql) or "
            "dead_letters=RedisDeadLetterStore.from_url('redis://localhost:6379/0', "
            "prefix='tidings:dlq:<queue>') (from tidings.deadletter.redis)"
        ),
    }
    wanted = "; ".join(examples[name] for name in missing)
    msg = (
        f"CeleryTransport has no default {' or '.join(m + '=' for m in missing)} on the broker "
        f"{redact_url(broker_url)!r}: only a Redis broker gives it a store to keep them in "
        f"(RabbitMQ keeps neither). Pass {wanted}"
    )
    return UsageError(msg)
