"""An :class:`~tidings.audit.AuditStore` in Redis: one stream of records, sorted sets as indexes.

Keys, for the default prefix ``tidings:audit``:

- ``tidings:audit:log``: a stream with one entry per record (field ``r``: the record as JSON;
  ``b``: its index bucket), in the order the store received them: the only copy of a record.
- ``tidings:audit:c:<bucket>``, ``tidings:audit:e:<bucket>`` and ``tidings:audit:t:<bucket>``:
  the correlation, event and tenant indexes of the records received in one time bucket (a
  day, or ``max_age`` if shorter), each a sorted set of members ``<id> NUL <at> NUL <entry
  id>`` all scored 0, so that they sort by id, then by time (``at`` is written fixed-width).

Why this layout: a lookup is one lexical range (``ZRANGEBYLEX``) per bucket of the retention
(8 for the default 7 days) and one ``XRANGE id id`` per record found, run server-side in one
script: it reads the records it returns and nothing else, however long the trail. A write adds
to three sorted sets that already exist, so a record creates no key and sets no expiry of its
own: Redis's cost per record is an ``XADD`` and up to three ``ZADD``, about half of what a
sorted set per correlation id (made, and given an expiry, for every request) costs. The record
is stored once; an index entry is its ids and a 15-byte pointer.

``write`` runs one Lua script per batch, so a batch costs one round trip and is never half
indexed. **Retention** is ``max_age`` (7 days by default): each write trims the stream to it
(``XTRIM MINID ~``, in whole stream nodes), and a bucket's indexes expire ``max_age`` after
the bucket ends, so an index entry outlives its record by at most one bucket (the lookups
skip it). :meth:`RedisAuditStore.trim` removes the records received more than any age ago, and
their index entries, at once. With ``max_age=None`` one bucket holds every record, until
:meth:`~RedisAuditStore.trim`.

**The layout is the writers'.** ``tidings:audit:layout`` (a hash: ``bucket``, ``max_age``)
says how the records were bucketed, written by each store at its first write; a store reading
(``tidings trace``, ``tidings ui``, opened with any ``max_age``) looks there first, so it finds
records written with another retention. Every writer of one prefix should use the same
``max_age``. A layout that is not two bounded numbers, or would make a lookup read more than
:data:`_MOST_BUCKETS` buckets, is ignored (the reader's own is used).

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

# KEYS[1]: the stream. ARGV[1]: the prefix; ARGV[2]: the bucket; ARGV[3]: when its indexes
# expire (Unix seconds, 0 for never); ARGV[4]: the stream's MINID ('' for none); then one per
# record: "at NUL correlation NUL event NUL tenant NUL json" (an id not indexed is empty; JSON
# holds no raw NUL). One argument a record: redis-py encodes each argument in Python, the
# larger part of a write's cost in the writing process.
_WRITE = """
local prefix, bucket, expire_at, minid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local keys = {prefix .. ':c:' .. bucket, prefix .. ':e:' .. bucket, prefix .. ':t:' .. bucket}
local used = {false, false, false}
for i = 5, #ARGV do
  local arg = ARGV[i]
  local ends = {}
  local from = 1
  for j = 1, 4 do  -- plain find: cheaper than a pattern for the server, which Redis shares
    ends[j] = string.find(arg, '\\0', from, true)
    from = ends[j] + 1
  end
  local at = string.sub(arg, 1, ends[1] - 1)
  local ids = {
    string.sub(arg, ends[1] + 1, ends[2] - 1),
    string.sub(arg, ends[2] + 1, ends[3] - 1),
    string.sub(arg, ends[3] + 1, ends[4] - 1),
  }
  local id = redis.call('XADD', KEYS[1], '*', 'r', string.sub(arg, from), 'b', bucket)
  for j = 1, 3 do
    if ids[j] ~= '' then
      redis.call('ZADD', keys[j], 0, ids[j] .. '\\0' .. at .. '\\0' .. id)
      used[j] = true
    end
  end
end
if expire_at > 0 then
  for j = 1, 3 do
    if used[j] then
      redis.call('EXPIREAT', keys[j], expire_at)
    end
  end
end
if minid ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
end
return 0
"""

# KEYS[1]: the stream. ARGV[1]: an index's key prefix (prefix:c:); ARGV[2]: the id; ARGV[3],
# ARGV[4]: the first and last bucket; ARGV[5]: 'all' (oldest first), or 'newest' with ARGV[6]
# the earliest fixed-width at ('' for any) and ARGV[7] the limit. Returns the records' JSON.
_READ = """
local index, id, first, last = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local skip = #id + 20
local found = {}
local function take(members)
  for _, member in ipairs(members) do
    local entry_id = string.sub(member, skip)
    local entry = redis.call('XRANGE', KEYS[1], entry_id, entry_id)[1]
    if entry then
      found[#found + 1] = entry[2][2]
    end
  end
end
if ARGV[5] == 'all' then
  for b = first, last do
    take(redis.call('ZRANGEBYLEX', index .. b, '[' .. id .. '\\0', '(' .. id .. '\\1'))
  end
else
  local remaining = tonumber(ARGV[7])
  local low = '[' .. id .. '\\0' .. ARGV[6]
  for b = last, first, -1 do
    if remaining <= 0 then
      break
    end
    local members = redis.call(
      'ZREVRANGEBYLEX', index .. b, '(' .. id .. '\\1', low, 'LIMIT', 0, remaining)
    remaining = remaining - #members
    take(members)
  end
end
return found
"""

_DAY = 86400
_MOST_BUCKETS = 400
"""The most index buckets a lookup reads; a stored layout needing more is not trusted."""
_AT_LIMIT = 9_999_999_999.0
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
        self._bucket = None if max_age is None else max(1, int(min(_DAY, max_age)))
        self._layout_key = f"{prefix}:layout"
        self._layout_written = False
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

    def _buckets(self, now: float) -> tuple[int, int]:
        """The first and last bucket a live record can be in (a bucket more each side).

        By the layout the writers stored, if it can be trusted; else this store's own.
        """
        bucket, max_age = self._bucket, self.max_age
        stored = cast(
            "list[bytes | None]", self._client.hmget(self._layout_key, "bucket", "max_age")
        )
        try:
            found = (int(stored[0] or b""), float(stored[1] or b""))
        except ValueError:
            found = None
        if found is not None:
            width, age = found
            if width == 0:
                bucket, max_age = None, None
            elif 0 < width <= _DAY and 0 < age <= width * (_MOST_BUCKETS - 3):
                bucket, max_age = width, age
        if bucket is None or max_age is None:
            return 0, 0
        return int((now - max_age) // bucket) - 1, int(now // bucket) + 1

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Store ``records`` and index them, in one script (one round trip)."""
        if not records:
            return
        if not self._layout_written:  # once: how this store buckets, for its readers
            layout = ["bucket", str(self._bucket or 0), "max_age", repr(self.max_age or 0.0)]
            self._client.hset(self._layout_key, items=layout)
            self._layout_written = True
        now = time.time()
        if self._bucket is None or self.max_age is None:
            bucket, expire_at, minid = 0, 0, ""
        else:
            bucket = int(now // self._bucket)
            expire_at = int((bucket + 1) * self._bucket + self.max_age) + 1
            minid = str(int((now - self.max_age) * 1000))
        args: list[Any] = [self._prefix, bucket, expire_at, minid]
        add = args.append
        for record in records:  # written out, no generator: this is once per record
            c, e, t = record.correlation_id, record.event_id, record.tenant_id
            head = "%s\0%s\0%s" % (  # noqa: UP031 - cheaper than an f-string of three ifs
                "" if c is None or "\0" in c else c,
                "" if e is None or "\0" in e else e,
                "" if t is None or "\0" in t else t,
            )
            at = record.at
            if not 0.0 <= at <= _AT_LIMIT:
                at = min(max(at, 0.0), _AT_LIMIT)
            try:
                body = _encode(record)
            except UnicodeEncodeError:
                body = _json(record)
            add(b"%017.6f\0%b\0%b" % (at, _key(head), body))
        self._write(keys=[self._log], args=args)

    def by_correlation(self, correlation_id: str) -> list[AuditRecord]:
        """Every record of this correlation id, oldest first."""
        return self._all("c", correlation_id)

    def by_event(self, event_id: str) -> list[AuditRecord]:
        """Every record of this event, oldest first."""
        return self._all("e", event_id)

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
        earliest = b"" if since is None else _at(since)
        # Buckets go by when the store received a record, ``at`` by when it started: near a
        # bucket's edge the two differ by the writer's delay, which the sort below evens out.
        found = self._lookup("t", tenant_id, "newest", earliest, limit)
        found.sort(key=lambda record: record.at, reverse=True)
        return found[:limit]

    def _all(self, index: str, value: str) -> list[AuditRecord]:
        found = self._lookup(index, value, "all", b"", 0)
        found.sort(key=lambda record: record.at)
        return found

    def _lookup(
        self, index: str, value: str, mode: str, earliest: bytes, limit: int
    ) -> list[AuditRecord]:
        first, last = self._buckets(time.time())
        args = (f"{self._prefix}:{index}:", _key(value), first, last, mode, earliest, limit)
        found = cast("list[bytes]", self._read(keys=[self._log], args=args))
        return [_decode(raw) for raw in found]

    def trim(self, older_than: float) -> int:
        """Remove every record the store received more than ``older_than`` s ago; how many.

        Works in batches of the oldest stream entries, each removed with its index entries in
        one transaction.

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
                    self._unindex(pipe, entry_id, fields)
                pipe.xdel(self._log, *(entry_id for entry_id, _ in entries))
                removed += int(pipe.execute()[-1])
        return removed

    def _unindex(self, pipe: Any, entry_id: bytes | str, fields: dict[Any, Any]) -> None:
        """Queue the removal of one stream entry's index members."""
        record = _decode(cast("bytes | str", fields.get(b"r", fields.get("r"))))
        bucket = fields.get(b"b", fields.get("b"))
        pointer = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
        bucket_text = bucket.decode() if isinstance(bucket, bytes) else str(bucket)
        for index, value in (
            ("c", record.correlation_id),
            ("e", record.event_id),
            ("t", record.tenant_id),
        ):
            if value is not None and "\0" not in value:
                member = b"%b\0%b\0%b" % (_key(value), _at(record.at), pointer)
                pipe.zrem(f"{self._prefix}:{index}:{bucket_text}", member)

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


def _at(at: float) -> bytes:
    """``at`` written fixed-width, so that index members sort by time as text."""
    return b"%017.6f" % min(max(at, 0.0), _AT_LIMIT)
