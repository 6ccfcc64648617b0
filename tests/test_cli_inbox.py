"""``tidings inbox prune``: deletes a SQL inbox's old rows in batches, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from conftest import require_server
from tidings.cli import make_cli
from tidings.inbox.sql import SqlInbox


def _inbox_with_rows(url: str, table: str) -> SqlInbox:
    inbox = SqlInbox(sa.create_engine(url), table_name=table)
    inbox.create_tables()
    for n in range(5):
        with inbox.guard("h", f"old{n}"):
            pass
    old = datetime.now(UTC) - timedelta(days=10)
    with inbox.engine.begin() as connection:
        connection.execute(sa.update(inbox.table).values(processed_at=old))
    with inbox.guard("h", "new"):
        pass
    return inbox


@pytest.mark.parametrize(
    "server", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def test_prune_deletes_rows_older_than_the_retention(server, tmp_path, unique_name):
    """`inbox prune --older-than 7d` deletes the 10-day-old rows only and says how many."""
    url = f"sqlite:///{tmp_path / 'inbox.db'}" if server == "sqlite" else require_server(server)
    inbox = _inbox_with_rows(url, unique_name)
    try:
        result = CliRunner().invoke(
            make_cli(),
            ["inbox", "prune", "--db", url, "--table", unique_name, "--older-than", "7d",
             "--batch-size", "2"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "Deleted 5 inbox rows older than 7d" in result.output
        assert inbox.is_done("h", "new")
        assert not inbox.is_done("h", "old0")
    finally:
        inbox.table.drop(inbox.engine)
        inbox.engine.dispose()


def test_prune_redacts_the_url_and_refuses_a_bad_age(tmp_path):
    """Messages never show the database password; an age like "7 days" is refused by name."""
    runner = CliRunner()
    secret = "postgresql+psycopg://app:s3cret@127.0.0.1:1/nowhere"  # noqa: S105 - a fake
    result = runner.invoke(make_cli(), ["inbox", "prune", "--db", secret, "--older-than", "7d"])
    assert result.exit_code != 0
    assert "s3cret" not in result.output
    assert "app:***@" in result.output
    result = runner.invoke(
        make_cli(), ["inbox", "prune", "--db", "sqlite://", "--older-than", "7 days"]
    )
    assert result.exit_code == 2
    assert "not an age" in result.output
