"""One stream consumer's own connection to Redis, and what it owes there.

A consumer does not settle its inbox claims nor acknowledge its entries the moment a batch is
handled: it *owes* them, and pays with its next round trip, ahead of that round trip's own
commands (claims, a read), so that a batch costs one round trip instead of three. Redis runs
the commands of one round trip in order, so a batch is always settled before it is
acknowledged, and both before the next read; a crash before leaves the batch pending, to be
reclaimed (its inbox markers then skip the handlers that ran, once they are settled, or the
claims expire after the inbox's lease).

Commands are sent on the consumer's own connection (:attr:`Link.connection`) and their replies
read later, so that the consumer can handle one batch while Redis works on the next one's
claims and read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from tidings._redis import OwnConnection
from tidings.inbox.redis import RedisInbox
from tidings.ports import BatchInbox, Claim, Inbox
from tidings.transports._streams_scripts import MOVE_DUE, MOVE_LONGEST, MOVE_MOST_VALUES

__all__ = ["Commands", "Link", "Owed"]

Entry = tuple[str, str, dict[bytes, bytes]]
"""(stream, entry id, fields) as read."""

Settlement = tuple[Sequence[Claim], Sequence[Claim]]
"""The (done, failed) claims of one batch."""


class Commands(list[tuple[Any, ...]]):
    """Commands sent in one go; a :class:`~tidings.inbox.redis.CommandQueue`."""

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> None:
        """Queue ``EVAL``."""
        self.append(("EVAL", script, numkeys, *keys_and_args))


@dataclass(slots=True)
class Owed:
    """What one batch of commands paid: where its replies are, and what to put back on error."""

    first: int
    settlements: list[Settlement]
    settled: int
    acks: list[tuple[str, str]]
    acked: int


class Link:
    """A consumer's connection, its debts (settlements, acknowledgements) and retry schedule.

    Args:
        client: the transport's client; its pool lends the connection.
        inbox: the transport's inbox; claims and settlements travel on this connection when it
            is a :class:`~tidings.inbox.redis.RedisInbox` on the same client, else they are made
            with the inbox's own calls.
        group: the consumer group, for acknowledgements.
        retry, redeliver: the service's retry set and redelivery stream (see ``MOVE_DUE``).
        unmovable: the list where the mover puts retry members it cannot move.
        count: most redeliveries moved at once.

    Not thread-safe: one per consumer thread.
    """

    def __init__(
        self,
        client: redis.Redis,
        inbox: Inbox | None,
        *,
        group: str,
        retry: str,
        redeliver: str,
        unmovable: str,
        count: int,
    ) -> None:
        self.client, self.inbox, self.group = client, inbox, group
        self.retry, self.redeliver, self.count = retry, redeliver, count
        self.unmovable = unmovable
        # Set when the mover put members aside: the consumer dead-letters them.
        self.unmovable_waiting = True
        self.inline = (
            isinstance(inbox, RedisInbox) and inbox.client.connection_pool is client.connection_pool
        )
        self.settlements: list[Settlement] = []
        self.acks: list[tuple[str, str]] = []
        self.due_at: float | None = time.time()  # when the next redelivery falls due
        self.connection = OwnConnection(client)

    # -- what is owed ------------------------------------------------------------------------

    def settle_later(self, done: Sequence[Claim], failed: Sequence[Claim]) -> None:
        """Owe the settling of a batch's claims (a :data:`~tidings.delivery.Settle`)."""
        self.settlements.append((done, failed))

    def ack_later(self, entries: Sequence[Entry]) -> None:
        """Owe the acknowledgement of ``entries``, to be paid after their settling."""
        self.acks += [(stream, entry_id) for stream, entry_id, _ in entries]

    def pay(self, commands: Commands) -> Owed:
        """Queue the retry mover, then what is owed: settlements, then acknowledgements.

        Settlements of an inbox not on this connection are made right away, with its own calls.
        What is queued is no longer owed unless :meth:`paid` is not reached: then
        :meth:`default` puts it back.
        """
        settlements, acks = self.settlements, self.acks
        self.settlements, self.acks = [], []
        inbox = self.inbox
        if settlements and not self.inline:
            assert isinstance(inbox, BatchInbox)  # noqa: S101 - only batches are deferred
            try:
                while settlements:
                    inbox.settle(*settlements[0])
                    settlements.pop(0)
            except BaseException:
                self._owe(settlements, acks)
                raise
        first = len(commands)
        commands.eval(
            MOVE_DUE,
            3,
            self.retry,
            self.redeliver,
            self.unmovable,
            time.time(),
            self.count,
            MOVE_MOST_VALUES,
            MOVE_LONGEST,
        )
        settled = 0
        if settlements:
            assert isinstance(inbox, RedisInbox)  # noqa: S101 - inline
            settled = sum(inbox.settle_on(commands, done, failed) for done, failed in settlements)
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in acks:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            commands.append(("XACK", stream, self.group, *ids))
        return Owed(first, settlements, settled, acks, len(by_stream))

    def paid(self, owed: Owed, replies: Sequence[Any]) -> None:
        """Check the replies to what :meth:`pay` queued (``replies`` are the whole batch's).

        Raises:
            redis.RedisError: the retry mover, a settlement or an acknowledgement failed (what
                failed is owed again).
        """
        at = owed.first
        moved = replies[at]
        if isinstance(moved, Exception):
            self.default(owed)
            raise moved
        self.due_at = None if moved[1] in (b"", "") else float(moved[1])
        if len(moved) > 2 and moved[2]:
            self.unmovable_waiting = True
        at += 1
        if owed.settled:
            assert isinstance(self.inbox, RedisInbox)  # noqa: S101 - inline
            try:
                self.inbox.settled(replies[at : at + owed.settled])
            except redis.RedisError:
                self.default(owed)
                raise
        at += owed.settled
        for reply in replies[at : at + owed.acked]:
            # A vanished group (Redis lost its data) has nothing left to acknowledge.
            if isinstance(reply, Exception) and "NOGROUP" not in str(reply):
                self._owe([], owed.acks)
                raise reply

    def default(self, owed: Owed) -> None:
        """Owe again what ``owed`` paid (its round trip failed; paying twice is harmless)."""
        self._owe(owed.settlements, owed.acks)

    def _owe(self, settlements: list[Settlement], acks: list[tuple[str, str]]) -> None:
        """Put ``settlements`` and ``acks`` back ahead of what is owed since."""
        self.settlements = settlements + self.settlements
        self.acks = acks + self.acks

    def retry_due(self, due_at: float) -> None:
        """Note a redelivery falling due at ``due_at`` (epoch seconds)."""
        self.due_at = due_at if self.due_at is None else min(self.due_at, due_at)

    def wait_ms(self, block_ms: int) -> int:
        """How long a read may wait: ``block_ms``, or less when a redelivery falls due sooner."""
        if self.due_at is None:
            return block_ms
        # A score anyone may write (inf, say) bounds nothing: compared before it is rounded.
        left = (self.due_at - time.time()) * 1000
        if not left < block_ms:
            return block_ms
        return round(left) if left > 1 else 1


def read_command(
    group: str, consumer: str, streams: dict[str, str], count: int, block: int | None
) -> tuple[Any, ...]:
    """``XREADGROUP`` of ``streams`` (name → id), waiting up to ``block`` ms when given."""
    command: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block is not None:
        command += ["BLOCK", block]
    return (*command, "STREAMS", *streams, *streams.values())


def entries_of(reply: Any) -> list[Entry]:
    """The entries of an ``XREADGROUP`` reply as the server sent it (RESP2 or RESP3).

    An entry deleted while pending (read from ``0``) comes with no fields: an empty dict.

    Raises:
        redis.RedisError: the reply is an error.
    """
    if isinstance(reply, Exception):
        raise reply
    found: list[Entry] = []
    for stream, entries in reply.items() if isinstance(reply, dict) else reply or ():
        name = text(stream)
        for entry_id, fields in entries:
            if fields is not None and len(fields) == 2:  # the usual entry: the envelope alone
                found.append((name, text(entry_id), {fields[0]: fields[1]}))
            else:
                values = fields or ()
                pairs = dict(zip(values[::2], values[1::2], strict=True))
                found.append((name, text(entry_id), pairs))
    return found


def text(value: bytes | str) -> str:
    """``value`` as text (replies are bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
