import pytest
import sqlalchemy as sa
from tests.apps import celery_sql_shop
from tests.conftest import require_server
from tests.workers import celery_worker, wait_until

pytestmark = pytest.mark.integration


def test_handler_writes_commit_with_the_inbox_row_once_per_event(redis_url, unique_name):
    """Writes through the SQL inbox connection leave one row per event, redelivered or not."""
    require_server("postgresql")
    bus, transport, engine, shipments, client = celery_sql_shop.make(
        unique_name, unique_name, unique_name
    )
    env = {
        "SQLSHOP_QUEUE": unique_name,
        "SQLSHOP_PREFIX": unique_name,
        "SQLSHOP_TABLE": unique_name,
    }
    events = [celery_sql_shop.ShipmentRequested(order_id=f"o-{i}") for i in range(10)]
    marker = celery_sql_shop.ShipmentRequested(order_id="marker")

    def rows() -> list[tuple[str, str]]:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(sa.select(shipments))]

    try:
        with celery_worker("tests.apps.celery_sql_shop", unique_name, env):
            bus.publish(*events)
            bus.publish(*events)  # every event delivered a second time
            for event in events[:3]:
                bus.publish(event)  # and some a third, one by one
            bus.publish(marker)
            wait_until(lambda: any(r[1] == "marker" for r in rows()), what="the marker row")
        found = rows()
        assert sorted(r[0] for r in found) == sorted(e.event_id for e in [*events, marker])
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f'DROP TABLE IF EXISTS "{unique_name}"'))
            connection.execute(sa.text(f'DROP TABLE IF EXISTS "{unique_name}_inbox"'))
        engine.dispose()
        for key in client.scan_iter(f"{unique_name}*"):
            client.delete(key)
        transport.close()
        client.close()
