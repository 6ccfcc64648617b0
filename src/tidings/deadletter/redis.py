"""A :class:`~tidings.ports.DeadLetterStore` in Redis: one hash per letter, one sorted set as index.

Keys, for the default prefix ``tidings:dlq``:

- ``tidings:dlq:letter:<id>``: a hash of the letter's fields. ``body`` holds the message bytes
  exactly as received; ``headers`` is JSON; text fields are UTF-8 (lone surrogates kept, so every
  ``str`` round-trips); a ``None`` field is absent.
- ``tidings:dlq:index``: a sorted set of letter ids scored by the time they were added (this
  process's clock, strictly increasing within a store object), which gives newest-first listing.

``add`` writes both keys in one MULTI/EXEC transaction, so a letter is never half stored. It is as
durable as the server makes it: with ``appendonly yes`` and ``appendfsync always`` a returned
``add`` survives a server crash; with ``everysec`` up to a second of letters may be lost.
On Redis Cluster, put the prefix in a hash tag (``prefix="{tidings:dlq}"``) so that both keys
live in one slot, as a transaction needs.

**Bounded.** ``add`` cuts an over-long letter rather than refuse it (the body to
``max_body_bytes``, 1 MiB by default; reason, traceback, text fields and headers to the bounds
of :mod:`tidings.deadletter._bounds`), saying so in its reason. And letters are kept for
``max_age`` seconds (default 14 days) and at most ``max_letters`` of them (default 100,000):
each ``add`` looks, in its own transaction, for letters past either bound and removes up to
:data:`TRIM_BATCH` of the oldest in one more round trip (only when there are some), so the store
keeps pace with any rate of adds; :meth:`RedisDeadLetterStore.trim` removes all of them at once.
``None`` turns a bound off.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tidings.deadletter._bounds import MAX_BODY_BYTES, bounded_letter
from tidings.errors import UsageError
from tidings.ports import DeadLetter, DeadLetterFilter

if TYPE_CHECKING:
    from redis import Redis
    from redis.typing import EncodableT

__all__ = ["CLOCK_SLACK", "MAX_AGE", "MAX_LETTERS", "TRIM_BATCH", "RedisDeadLetterStore"]

MAX_AGE: Final = 14 * 24 * 3600.0
"""Default retention of a letter, in seconds: 14 days."""

MAX_LETTERS: Final = 100_000
"""Default most letters kept; past it the oldest go first."""

TRIM_BATCH: Final = 100
"""Most letters one ``add`` removes for the retention."""

CLOCK_SLACK: Final = 300.0
"""Seconds before a filter's ``since`` that a search starts reading the index at.

The index is scored by the time of ``add``, which is after the letter's ``failed_at`` when both
come from one clock; the slack covers a letter made on a host whose clock runs ahead.
"""

_PURGE_BATCH = 1000
_SCAN_PAGE = 1000
_FILTERED = ("handler", "event_type", "reason", "failed_at")
_URL_OPTIONS: Final = ("max_age", "max_letters", "max_body_bytes")
_OPTIONAL = ("handler", "event_type", "event_id")
_TEXT = ("id", "failed_at", "reason", "traceback", "transport", "destination", *_OPTIONAL)


def _encode(text: str) -> bytes:
    # surrogatepass: an exception message may carry lone surrogates; keep them rather than fail.
    return text.encode("utf-8", "surrogatepass")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


class RedisDeadLetterStore:
    """Keeps dead letters in Redis under ``prefix``; see the module docstring for the layout.

    Thread-safe and process-safe: every write is one transaction, reads tolerate a letter removed
    meanwhile. The client must return bytes (``decode_responses=False``, redis-py's default),
    because a body need not be text: one that decodes is refused with
    :class:`~tidings.errors.UsageError`. A client passed in stays the caller's to close;
    :meth:`close` closes only a client made by :meth:`from_url`.

    Args:
        client: a redis-py client returning bytes.
        prefix: the first part of every key.
        max_body_bytes: longest body kept; a longer one is cut (see the module docstring).
        max_age: seconds a letter is kept (``None``: for ever).
        max_letters: most letters kept, the oldest removed first (``None``: no bound).

    Raises:
        UsageError: the client decodes responses.
        ValueError: a bound is not positive.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "tidings:dlq",
        max_body_bytes: int = MAX_BODY_BYTES,
        max_age: float | None = MAX_AGE,
        max_letters: int | None = MAX_LETTERS,
    ) -> None:
        if (
            max_body_bytes < 1
            or (max_age is not None and not max_age > 0)
            or (max_letters is not None and max_letters < 1)
        ):
            msg = (
                "max_body_bytes, max_age and max_letters must be positive (or None for no "
                f"retention), not {max_body_bytes!r}, {max_age!r}, {max_letters!r}"
            )
            raise ValueError(msg)
        pool = getattr(client, "connection_pool", None)
        if getattr(pool, "connection_kwargs", {}).get("decode_responses", False):
            msg = (
                "RedisDeadLetterStore needs a client that returns bytes, because a dead letter's "
                "body may not be text: create it with decode_responses=False (the default)"
            )
            raise UsageError(msg)
        self._client = client
        self._prefix = prefix
        self._index = f"{prefix}:index"
        self._owns_client = False
        self._clock_lock = threading.Lock()
        self._last_score = 0.0
        self.max_body_bytes = max_body_bytes
        self.max_age = max_age
        self.max_letters = max_letters

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "tidings:dlq") -> RedisDeadLetterStore:
        """Return a store on a new client for ``url`` (``redis://`` or ``rediss://``).

        The query options ``max_age`` (seconds, or ``none``), ``max_letters`` (or ``none``) and
        ``max_body_bytes`` set the store's bounds (``redis://host/0?max_age=86400``); the
        other options go to redis-py.

        Raises:
            ImportError: redis-py is missing; the message names the extra to install.
            ValueError: an option is not a positive number (or ``none``).
        """
        try:
            import redis  # noqa: PLC0415 - optional extra, imported when a Redis store is made
        except ImportError as exc:
            msg = "the Redis dead-letter store needs redis-py: pip install 'tidings[redis]'"
            raise ImportError(msg, name=exc.name) from exc
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in pairs if k in _URL_OPTIONS}
        rest = urlencode([(k, v) for k, v in pairs if k not in _URL_OPTIONS])
        options: dict[str, Any] = {}
        try:
            if "max_age" in ours:
                options["max_age"] = None if ours["max_age"] == "none" else float(ours["max_age"])
            if "max_letters" in ours:
                value = ours["max_letters"]
                options["max_letters"] = None if value == "none" else int(value)
            if "max_body_bytes" in ours:
                options["max_body_bytes"] = int(ours["max_body_bytes"])
        except ValueError:
            msg = f"dead-letter store options must be positive numbers or none, not {ours}"
            raise ValueError(msg) from None
        client = redis.Redis.from_url(urlunsplit(parts._replace(query=rest)))
        store = cls(client, prefix=prefix, **options)
        store._owns_client = True
        return store

    @property
    def prefix(self) -> str:
        """The key prefix every key of this store starts with."""
        return self._prefix

    def _key(self, letter_id: str) -> str:
        return f"{self._prefix}:letter:{letter_id}"

    def _score(self) -> float:
        # Strictly increasing within this store object, so letters added in a burst keep order.
        with self._clock_lock:
            self._last_score = max(time.time(), self._last_score + 1e-6)
            return self._last_score

    def add(self, letter: DeadLetter) -> None:
        """Store ``letter`` (replacing one with the same id) in one transaction.

        Refuses nothing: an over-long letter is cut, as the module docstring says, and the cut
        noted in its reason. Then removes up to :data:`TRIM_BATCH` letters past the retention,
        oldest first, in one more round trip (only when there are any).
        """
        letter = bounded_letter(letter, self.max_body_bytes)
        fields: dict[EncodableT, EncodableT] = {
            name: _encode(value) for name in _TEXT if (value := getattr(letter, name)) is not None
        }
        fields["attempts"] = letter.attempts
        fields["body"] = bytes(letter.body)
        # default=str: headers are typed str -> str, but a transport may hand over other values;
        # storing their text beats losing the letter.
        fields["headers"] = json.dumps(letter.headers, default=str).encode("ascii")
        key = self._key(letter.id)
        score = self._score()
        with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.zadd(self._index, {letter.id: score})
            self._find_expired(pipe, score)
            replies = pipe.execute()
        expired = self._expired(replies[3:])
        if expired:
            self._remove_ids(expired)

    def trim(self) -> int:
        """Remove every letter past the retention (age, then count); return how many went."""
        removed = 0
        while True:
            with self._client.pipeline(transaction=False) as pipe:
                self._find_expired(pipe, time.time())
                expired = self._expired(pipe.execute())
            if not expired:
                return removed
            removed += self._remove_ids(expired)

    def _find_expired(self, pipe: Any, now: float) -> None:
        """Queue the two lookups :meth:`_expired` reads: stale letters, and how many there are."""
        cutoff = "-inf" if self.max_age is None else f"({now - self.max_age!r}"
        pipe.zrangebyscore(self._index, "-inf", cutoff, start=0, num=TRIM_BATCH)
        pipe.zcard(self._index)

    def _expired(self, replies: list[Any]) -> list[bytes]:
        """Up to :data:`TRIM_BATCH` ids past the retention, from :meth:`_find_expired`'s replies."""
        stale, total = cast("list[bytes]", replies[0]), int(replies[1])
        if self.max_age is None:
            stale = []
        excess = 0 if self.max_letters is None else total - self.max_letters
        if excess <= len(stale):
            return stale
        oldest = self._client.zrange(self._index, 0, min(excess, TRIM_BATCH) - 1)
        return cast("list[bytes]", oldest)

    def _remove_ids(self, ids: list[bytes]) -> int:
        """Delete these letters (hash and index entry) in one transaction; return how many."""
        with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(*(self._key(_decode(letter_id)) for letter_id in ids))
            pipe.zrem(self._index, *ids)
            _, removed = pipe.execute()
        return int(removed)

    def get(self, letter_id: str) -> DeadLetter | None:
        """Return the dead letter with this id, or ``None``."""
        return _letter(self._client.hgetall(self._key(letter_id)))

    def list(self, *, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters, newest first, skipping ``offset``.

        Raises:
            ValueError: ``limit`` or ``offset`` is negative.
        """
        if limit < 0 or offset < 0:
            msg = f"limit and offset must be >= 0, not {limit} and {offset}"
            raise ValueError(msg)
        if limit == 0:
            return []
        ids = cast("list[bytes]", self._client.zrevrange(self._index, offset, offset + limit - 1))
        with self._client.pipeline(transaction=False) as pipe:
            for letter_id in ids:
                pipe.hgetall(self._key(_decode(letter_id)))
            hashes: list[Any] = pipe.execute()
        return [letter for raw in hashes if (letter := _letter(raw)) is not None]

    def iter_matching(
        self, where: DeadLetterFilter, *, page_size: int = 500
    ) -> Iterator[DeadLetter]:
        """Yield the letters ``where`` matches, newest first, reading ``page_size`` at a time.

        Reads the index from the newest entry down to ``where.since`` (less
        :data:`CLOCK_SLACK`), a thousand ids at a time, and checks each letter's handler, event
        type, reason and time (one pipeline of HMGETs: Redis keeps no index by handler or
        type); only the matches are read whole, at most ``page_size`` in one pipeline. The
        pages follow the score, not an offset, so removing letters meanwhile skips none.

        Raises:
            ValueError: ``page_size`` is below 1.
        """
        if page_size < 1:
            msg = f"page_size must be >= 1, not {page_size}"
            raise ValueError(msg)
        return self._matching(where, page_size)

    def _matching(self, where: DeadLetterFilter, page_size: int) -> Iterator[DeadLetter]:
        # With a filter, the index is read _SCAN_PAGE ids at a time and each letter's filtered
        # fields (not its body) are checked first; only matches are read whole, page_size at a
        # time. Without one, every letter is a match.
        scan = page_size if where.is_empty else max(page_size, _SCAN_PAGE)
        for page in self._index_pages(where, scan):
            ids = page if where.is_empty else self._prefiltered(page, where)
            for chunk in range(0, len(ids), page_size):
                with self._client.pipeline(transaction=False) as pipe:
                    for letter_id in ids[chunk : chunk + page_size]:
                        pipe.hgetall(self._key(_decode(letter_id)))
                    hashes: list[Any] = pipe.execute()
                for raw in hashes:
                    letter = _letter(raw)
                    if letter is not None and where.matches(letter):
                        yield letter

    def _index_pages(self, where: DeadLetterFilter, size: int) -> Iterator[Sequence[bytes]]:
        """Ids newest first, down to ``where.since`` less the slack, ``size`` at a time.

        The pages follow the score: each starts at the last score read (ids read at that score
        are left out), so an id removed meanwhile shifts nothing.
        """
        low = "-inf" if where.since is None else repr(where.since.timestamp() - CLOCK_SLACK)
        high = "+inf"
        at_high: set[bytes] = set()  # ids read at score `high`, which the next page repeats
        while True:
            entries = cast(
                "list[tuple[bytes, float]]",
                self._client.zrevrangebyscore(
                    self._index, high, low, start=0, num=size + len(at_high), withscores=True
                ),
            )
            fresh = [(letter_id, score) for letter_id, score in entries if letter_id not in at_high]
            if not fresh:
                return
            yield [letter_id for letter_id, _ in fresh]
            last = repr(fresh[-1][1])
            tied = {letter_id for letter_id, score in fresh if repr(score) == last}
            at_high = at_high | tied if last == high else tied
            high = last

    def _prefiltered(self, ids: Sequence[bytes], where: DeadLetterFilter) -> Sequence[bytes]:
        """The ids whose handler, event type, reason and failed_at pass ``where``."""
        with self._client.pipeline(transaction=False) as pipe:
            for letter_id in ids:
                pipe.hmget(self._key(_decode(letter_id)), _FILTERED)
            rows = cast("Sequence[Sequence[bytes | None]]", pipe.execute())
        return [letter_id for letter_id, row in zip(ids, rows, strict=True) if _passes(where, row)]

    def remove(self, letter_id: str) -> bool:
        """Delete one dead letter; return whether it existed."""
        with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(letter_id))
            pipe.zrem(self._index, letter_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def purge(self) -> int:
        """Delete every dead letter; return how many this call deleted.

        Works in batches, each one transaction; letters added while it runs may survive it.
        """
        purged = 0
        while ids := cast("list[bytes]", self._client.zrange(self._index, 0, _PURGE_BATCH - 1)):
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(*(self._key(_decode(letter_id)) for letter_id in ids))
                pipe.zrem(self._index, *ids)
                _, removed = pipe.execute()
            purged += int(removed)
        return purged

    def count(self) -> int:
        """Return how many dead letters are stored."""
        return int(self._client.zcard(self._index))

    def close(self) -> None:
        """Close the client if :meth:`from_url` made it; a client passed in is left open."""
        if self._owns_client:
            self._client.close()


def _passes(where: DeadLetterFilter, row: Sequence[bytes | None]) -> bool:
    """Whether the :data:`_FILTERED` fields of a letter (None: absent) pass ``where``."""
    handler, event_type, reason, failed_at = row
    if reason is None or failed_at is None:  # removed meanwhile
        return False
    light = DeadLetter(
        body=b"",
        reason=_decode(reason),
        handler=None if handler is None else _decode(handler),
        event_type=None if event_type is None else _decode(event_type),
        failed_at=_decode(failed_at),
        id="",
    )
    return where.matches(light)


def _letter(raw: Mapping[Any, Any]) -> DeadLetter | None:
    if not raw:
        return None
    fields = {_decode(name): value for name, value in raw.items()}
    text = {name: _decode(fields[name]) for name in _TEXT if name in fields}
    return DeadLetter(
        body=bytes(fields["body"]),
        reason=text["reason"],
        traceback=text["traceback"],
        attempts=int(fields["attempts"]),
        handler=text.get("handler"),
        event_type=text.get("event_type"),
        event_id=text.get("event_id"),
        headers=json.loads(fields["headers"]),
        transport=text["transport"],
        destination=text["destination"],
        id=text["id"],
        failed_at=text["failed_at"],
    )
