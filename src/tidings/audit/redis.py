"""An :class:`~tidings.audit.AuditStore` in Redis: one stream of records, sorted sets as indexes.

Keys, for the default prefix ``tidings:audit``:

- ``tidings:audit:log``: a stream with one entry per record (field ``r``: the record as
  JSON), in the order the store received them. It is the only copy of each record.
- ``tidings:audit:c:<correlation id>``, ``tidings:audit:e:<event id>`` and
  ``tidings:audit:t:<tenant id>``: sorted sets of stream entry ids, scored by the record's
  ``at``.

Why this layout: each lookup is one sorted-set range plus one ``XRANGE id id`` per record found
(O(log n) each), run server-side in one script, so it reads the records it returns and nothing
else, however long the trail; the record is stored once (an index entry is a 15-byte id), and
the stream lets a reader follow the whole trail in order. A list per correlation would need
copies of each record for the event and tenant lookups; one stream alone would need a scan.

``write`` runs one Lua script per batch: ``XADD`` each record, ``ZADD`` its id to its indexes,
so a batch costs one round trip and is never half indexed. **Retention** is ``max_age`` (7 days
by default): each write trims the stream to it (``XTRIM MINID ~``, in whole stream nodes) and
the tenant indexes it touches, and sets every index it touches to expire after it (a
correlation's tree expires together, ``max_age`` after its last record). :meth:`trim` removes
records older than any age at once, stream entries and index entries both, judged (to the
millisecond) by when the store received them. An index entry whose record was trimmed is
skipped by the lookups.

On Redis Cluster, put the prefix in a hash tag (``prefix="{tidings:audit}"``): the scripts
reach keys they derive from the prefix, which must share one slot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from tidings.audit._record import AuditRecord, storable

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["MAX_AGE", "RedisAuditStore"]

MAX_AGE: Final = 7 * 24 * 3600.0
"""Default retention of a record, in seconds: 7 days."""

_TRIM_BATCH = 1000

# KEYS[1]: the stream. ARGV[1]: the prefix; ARGV[2]: the stream's MINID ('' for none);
# ARGV[3]: index TTL in seconds (0 for none); ARGV[4]: the oldest score kept in a tenant index
# ('-inf' for all); then one per record: "at NUL correlation NUL event NUL tenant NUL json"
# (an absent id empty; JSON holds no raw NUL). One argument a record: redis-py encodes each
# argument in Python, the larger part of a write's cost in the writing process.
_WRITE = """
local prefix, minid, ttl, oldest = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local kinds = {':c:', ':e:', ':t:'}
local touched = {}
for i = 5, #ARGV do
  local at, c, e, t, record =
    string.match(ARGV[i], '^([^%z]*)%z([^%z]*)%z([^%z]*)%z([^%z]*)%z(.*)$')
  local id = redis.call('XADD', KEYS[1], '*', 'r', record)
  local ids = {c, e, t}
  for j = 1, 3 do
    if ids[j] ~= '' then
      local key = prefix .. kinds[j] .. ids[j]
      redis.call('ZADD', key, at, id)
      touched[key] = j
    end
  end
end
for key, j in pairs(touched) do
  if j == 3 and oldest ~= '-inf' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. oldest)
  end
  if ttl > 0 then
    redis.call('EXPIRE', key, ttl)
  end
end
if minid ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
end
return 0
"""

# KEYS[1]: the stream; KEYS[2]: an index. ARGV[1]: 'all' (oldest first) or 'newest' with
# ARGV[2] the lowest score and ARGV[3] the limit. Returns the records' JSON.
_READ = """
local ids
if ARGV[1] == 'all' then
  ids = redis.call('ZRANGE', KEYS[2], 0, -1)
else
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[2], '+inf', ARGV[2], 'LIMIT', 0, ARGV[3])
end
local found = {}
for _, id in ipairs(ids) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
  if entry then
    found[#found + 1] = entry[2][2]
  end
end
return found
"""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AuditRecord).decode


class RedisAuditStore:
    """Keeps audit records in Redis under ``prefix``; see the module docstring for the layout.

    Thread-safe and process-safe: a write is one script (atomic), a lookup one script. The
    client may decode responses or not. A client passed in stays the caller's to close;
    :meth:`close` closes only a client made by :meth:`from_url`.

    Args:
        client: a redis-py client.
        prefix: the first part of every key.
        max_age: seconds a record is kept (``None``: until :meth:`trim`).

    Raises:
        ValueError: ``max_age`` is not positive.
    """

    def __init__(
        self, client: Redis, *, prefix: str = "tidings:audit", max_age: float | None = MAX_AGE
    ) -> None:
        if max_age is not None and not max_age > 0:
            msg = f"max_age must be positive seconds (or None to keep records), not {max_age!r}"
            raise ValueError(msg)
        self._client = client
        self._prefix = prefix
        self._log = f"{prefix}:log"
        self.max_age = max_age
        self._write = client.register_script(_WRITE)
        self._read = client.register_script(_READ)
        self._owns_client = False

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "tidings:audit") -> RedisAuditStore:
        """Return a store on a new client for ``url`` (``redis://`` or ``rediss://``).

        The query option ``max_age`` (seconds, or ``none``) sets the retention
        (``redis://host/0?max_age=86400``); the other options go to redis-py.

        Raises:
            ImportError: redis-py is missing; the message names the extra to install.
            ValueError: ``max_age`` is not a positive number or ``none``.
        """
        try:
            import redis  # noqa: PLC0415 - optional extra, imported when a Redis store is made
        except ImportError as exc:
            msg = "the Redis audit store needs redis-py: pip install 'tidings[redis]'"
            raise ImportError(msg, name=exc.name) from exc
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        ours = dict(pair for pair in pairs if pair[0] == "max_age")
        rest = urlencode([pair for pair in pairs if pair[0] != "max_age"])
        options: dict[str, Any] = {}
        if "max_age" in ours:
            value = ours["max_age"]
            try:
                options["max_age"] = None if value == "none" else float(value)
            except ValueError:
                msg = f"max_age must be a number of seconds or none, not {value!r}"
                raise ValueError(msg) from None
        client = redis.Redis.from_url(urlunsplit(parts._replace(query=rest)))
        store = cls(client, prefix=prefix, **options)
        store._owns_client = True
        return store

    @property
    def prefix(self) -> str:
        """The key prefix every key of this store starts with."""
        return self._prefix

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Store ``records`` and index them, in one script (one round trip)."""
        if not records:
            return
        now = time.time()
        if self.max_age is None:
            minid, ttl, oldest = "", 0, "-inf"
        else:
            minid = str(int((now - self.max_age) * 1000))
            ttl, oldest = max(1, int(self.max_age)), repr(now - self.max_age)
        args: list[Any] = [self._prefix, minid, ttl, oldest]
        for record in records:
            ids = (record.correlation_id, record.event_id, record.tenant_id)
            head = "\0".join(("" if i is None or "\0" in i else i) for i in ids)
            args.append(b"%b\0%b\0%b" % (repr(record.at).encode(), _key(head), _json(record)))
        self._write(keys=[self._log], args=args)

    def by_correlation(self, correlation_id: str) -> list[AuditRecord]:
        """Every record of this correlation id, oldest first."""
        return self._lookup(f":c:{correlation_id}", "all")

    def by_event(self, event_id: str) -> list[AuditRecord]:
        """Every record of this event, oldest first."""
        return self._lookup(f":e:{event_id}", "all")

    def by_tenant(
        self, tenant_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[AuditRecord]:
        """Up to ``limit`` records of this tenant, newest first, none before ``since``.

        Raises:
            ValueError: ``limit`` is negative.
        """
        if limit < 0:
            msg = f"limit must be >= 0, not {limit}"
            raise ValueError(msg)
        if limit == 0:
            return []
        lowest = "-inf" if since is None else repr(since)
        return self._lookup(f":t:{tenant_id}", "newest", lowest, limit)

    def _lookup(self, suffix: str, *args: str | int) -> list[AuditRecord]:
        found = cast("list[bytes]", self._read(keys=[self._log, self._prefix + suffix], args=args))
        return [_decode(raw) for raw in found]

    def trim(self, older_than: float) -> int:
        """Remove every record the store received more than ``older_than`` s ago; how many.

        Works in batches of the oldest stream entries, each removed with its index entries.

        Raises:
            ValueError: ``older_than`` is negative.
        """
        if older_than < 0:
            msg = f"older_than must be >= 0 seconds, not {older_than}"
            raise ValueError(msg)
        last = int((time.time() - older_than) * 1000) - 1  # the newest millisecond removed
        removed = 0
        while last >= 0:
            entries = cast(
                "list[tuple[Any, dict[Any, Any]]]",
                self._client.xrange(self._log, "-", str(last), count=_TRIM_BATCH),
            )
            if not entries:
                break
            with self._client.pipeline(transaction=True) as pipe:
                for entry_id, fields in entries:
                    raw = cast("bytes | str", fields.get(b"r", fields.get("r")))
                    record = _decode(raw)
                    for suffix in _suffixes(record):
                        if suffix:
                            pipe.zrem(self._prefix + suffix, entry_id)
                pipe.xdel(self._log, *(entry_id for entry_id, _ in entries))
                removed += int(pipe.execute()[-1])
        return removed

    def close(self) -> None:
        """Close the client if :meth:`from_url` made it; a client passed in is left open."""
        if self._owns_client:
            self._client.close()


def _json(record: AuditRecord) -> bytes:
    try:
        return _encode(record)
    except UnicodeEncodeError:  # a lone surrogate, in an error message say: escape it
        fields = record.to_dict()
        for name, value in fields.items():
            if isinstance(value, str):
                fields[name] = storable(value)
        return _encode(fields)


def _key(text: str) -> bytes:
    # surrogatepass: an id written straight to the store (not through the hooks, which keep
    # printable ASCII ones only) is indexed under the very bytes the lookups will send.
    return text.encode("utf-8", "surrogatepass")


def _suffixes(record: AuditRecord) -> tuple[str, str, str]:
    """The record's index keys after the prefix ('' where it has no such id)."""
    return (
        "" if record.correlation_id is None else f":c:{record.correlation_id}",
        "" if record.event_id is None else f":e:{record.event_id}",
        "" if record.tenant_id is None else f":t:{record.tenant_id}",
    )
