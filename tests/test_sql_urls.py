"""Database URLs as users write them: drivers the extras install, mistyped SQLite paths."""

from pathlib import Path

import pytest
from tests.conftest import require_server

from tidings._sql import create_engine, normalize_url
from tidings.errors import UsageError

sa = pytest.importorskip("sqlalchemy")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("mysql://root@h/test", "mysql+pymysql://root@h/test"),
        ("mariadb://root@h/test", "mariadb+pymysql://root@h/test"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_urls_without_a_driver_get_the_one_the_extra_installs(url, expected):
    """``postgres://`` works where ``postgresql://`` does, and both use psycopg 3."""
    assert normalize_url(url) == expected


@pytest.mark.integration
def test_postgres_urls_reach_the_server():
    """A ``postgres://`` URL as Heroku writes it connects through psycopg 3."""
    postgres_url = require_server("postgresql")
    bare = "postgres://" + postgres_url.split("://", 1)[1]
    engine = create_engine(bare)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("select 1")).scalar_one() == 1
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_a_mistyped_sqlite_path_is_refused_and_no_file_is_made(tmp_path: Path):
    """Where a database must exist, a SQLite path that does not is an error, not a new file."""
    missing = tmp_path / "shpo.db"
    with pytest.raises(UsageError, match="no SQLite database"):
        create_engine(f"sqlite:///{missing}", must_exist=True)
    assert not missing.exists()
    existing = tmp_path / "shop.db"
    existing.touch()
    create_engine(f"sqlite:///{existing}", must_exist=True).dispose()
    create_engine("sqlite://", must_exist=True).dispose()
