"""Where one demo run leaves its audit trail and dead letters, and the commands that read them.

Every process of a run (the demo's own: web, relay and, embedded, the workers; and the Celery
worker's) installs the audit trail on the same store: in Redis with a Redis broker, else a
table in the shop's database. :class:`Trail` says where, so the end of the run can print
``tidings trace``, ``tidings dlq list`` and ``tidings ui`` command lines that open them (and,
for the ops page, the shop's outbox).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from tidings._untrusted import redact_url

__all__ = ["Trail"]


@dataclass(frozen=True)
class Trail:
    """The run's audit store and dead-letter store, as the ``tidings`` commands name them.

    Attributes:
        audit_url: the audit store's URL (Redis, or the shop's SQL database).
        audit_name: its Redis key prefix or SQL table name.
        dlq_url: the dead-letter store's URL.
        dlq_options: what selects the run's letters in it: ``("--service", queue)`` for a
            transport's default Redis store, ``("--name", table)`` for a SQL table.
        outbox_url: the shop's database, where the outbox is.
        outbox_table: the outbox's table.
    """

    audit_url: str
    audit_name: str
    dlq_url: str
    dlq_options: tuple[str, ...]
    outbox_url: str
    outbox_table: str

    def trace(self, correlation_id: str) -> list[str]:
        """The ``tidings trace`` arguments for one request of the run."""
        return ["trace", correlation_id, "--audit", self.audit_url, "--name", self.audit_name]

    def dlq_list(self) -> list[str]:
        """The ``tidings dlq list`` arguments for the run's dead letters."""
        return ["dlq", "list", "--store", self.dlq_url, *self.dlq_options]

    def ui(self) -> list[str]:
        """The ``tidings ui`` arguments for the run's audit trail, dead letters and outbox."""
        return [
            "ui",
            "--audit", self.audit_url, "--audit-name", self.audit_name,
            "--store", self.dlq_url, *self.dlq_options,
            "--db", self.outbox_url, "--table", self.outbox_table,
        ]  # fmt: skip

    @staticmethod
    def shown(arguments: list[str]) -> str:
        """``tidings`` and ``arguments`` as a shell command line, passwords replaced."""
        return shlex.join(["tidings", *(_redacted(argument) for argument in arguments)])


def _redacted(argument: str) -> str:
    """A URL with its secrets as ``***``; anything else (and a URL without any) as it is."""
    try:
        parts = urlsplit(argument)
        secret = parts.password is not None or bool(parts.query)
    except ValueError:
        secret = "@" in argument
    return redact_url(argument) if secret else argument
