"""The audit's bounded queue and the thread that writes it to the store in batches.

A hook appends a record to a deque (no I/O, no lock unless the queue is full); one daemon
thread takes up to ``batch`` records at a time and hands them to the store's ``write``. It
wakes every ``flush_interval`` seconds, or as soon as a batch is waiting.

**When the store falls behind.** The queue holds at most ``max_queued`` records; past that the
oldest are dropped, counted, and a WARNING says how many, at most once per ``warn_every``
seconds. A batch the store refuses is dropped the same way. Never blocking the handler, and
keeping the newest (what an operator looks for first), is the trade: the audit trail is
evidence, not the delivery guarantee, which stays with the outbox and the inbox.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence

from tidings.audit._record import AuditRecord, AuditStore

__all__ = ["Writer"]

log = logging.getLogger("tidings.audit")

CLOSE_TIMEOUT = 10.0
"""Seconds :meth:`Writer.close` waits for the thread, then for a write under way."""


class Writer:
    """The bounded queue and the daemon thread that empties it into ``store``, in batches.

    :meth:`put` is safe from any thread and never waits on the store; the thread starts with
    the writer. :meth:`flush` writes what is queued in the calling thread (one flush at a
    time); :meth:`close` stops the thread and writes the rest. ``dropped`` and ``failed``
    count the records lost to a full queue and to store errors. ``worker`` is ``host:pid``.
    """

    def __init__(
        self,
        store: AuditStore,
        batch: int,
        flush_interval: float,
        max_queued: int,
        warn_every: float,
    ) -> None:
        self.store = store
        self.batch = batch
        self.flush_interval = flush_interval
        self.max_queued = max_queued
        self.warn_every = warn_every
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.dropped = 0
        self.failed = 0
        self._error = "none"
        self._reported = (0, 0)
        self._warned_at = float("-inf")
        self._queue: deque[AuditRecord] = deque()
        self._full = threading.Lock()
        self._writing = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="tidings-audit-writer", daemon=True)
        thread.start()
        return thread

    def put(self, record: AuditRecord) -> None:
        """Queue ``record``; never blocks on the store."""
        queued = self._queue
        if len(queued) >= self.max_queued:
            with self._full:
                while len(queued) >= self.max_queued:
                    try:
                        queued.popleft()
                    except IndexError:  # the writer emptied it meanwhile
                        break
                    self.dropped += 1
        queued.append(record)
        if len(queued) >= self.batch and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self, *, last: bool = False) -> None:
        """Write every queued record, a batch at a time; warn of any lost (``last``: now).

        The last flush (:meth:`close`, at exit) waits at most :data:`CLOSE_TIMEOUT` seconds for
        a write under way in the thread, so a store that hangs cannot hang the process's exit;
        what it could not write is counted and reported as lost.
        """
        queued = self._queue
        if not self._writing.acquire(timeout=CLOSE_TIMEOUT if last else -1):
            self.failed += len(queued)
            self._error = "a write still under way when the audit was closed"
            self._warn(last)
            return
        try:
            while queued:
                records: list[AuditRecord] = []
                try:
                    while len(records) < self.batch:
                        records.append(queued.popleft())
                except IndexError:
                    pass
                self._write(records)
            self._warn(last)
        finally:
            self._writing.release()

    def _write(self, records: Sequence[AuditRecord]) -> None:
        try:
            self.store.write(records)
        except Exception as exc:  # noqa: BLE001 - the audit must never stop the worker
            self.failed += len(records)
            self._error = f"{type(exc).__name__}"

    def _warn(self, last: bool) -> None:
        counts = (self.dropped, self.failed)
        if counts == self._reported:
            return
        now = time.monotonic()
        if now - self._warned_at < self.warn_every and not last:
            return
        dropped, failed = counts[0] - self._reported[0], counts[1] - self._reported[1]
        self._reported, self._warned_at = counts, now
        log.warning(
            "audit trail: %d record(s) dropped because the queue was full (max_queued) and %d "
            "because the store refused them (last error: %s); the store is too slow or down",
            dropped,
            failed,
            self._error,
        )

    def close(self) -> None:
        """Stop the thread once it has written everything queued; then write any left."""
        self._closed = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_TIMEOUT)
        self.flush(last=True)

    def restart_in_child(self) -> None:
        """In a forked child: forget the parent's queue and locks, start a thread of its own."""
        self._queue = deque()
        self._full = threading.Lock()
        self._writing = threading.Lock()
        self._wake = threading.Event()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        if not self._closed:
            self._thread = self._start()
