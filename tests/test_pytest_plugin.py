import time

import pytest

pytest_plugins = ["pytester"]

USER_APP = """
from dataclasses import dataclass
from typing import ClassVar

from tidings import DomainEvent, EventBus, register_event


class BrokerTransport:
    name = "broker"

    def bind(self, bus):
        pass

    def subscribed(self, handler):
        pass

    def send(self, events):
        raise ConnectionError("no broker in tests")

    def close(self):
        pass


@register_event
@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "plugin_app.order_placed"
    order_id: str = ""
    total: int = 0


bus = EventBus(transport=BrokerTransport())
emails = []


@bus.subscribe(OrderPlaced, name="app.email")
def email(event):
    emails.append(event.order_id)


def place_order(order_id, total):
    bus.publish(OrderPlaced(order_id=order_id, total=total))
"""


@pytest.fixture
def app(pytester):
    pytester.makepyfile(app=USER_APP)
    pytester.makeini("[pytest]\ntidings_bus = app:bus\n")
    return pytester


def test_user_tests_with_the_fixtures_pass(app):
    """A user's tests using `published` and `tidings_capture` pass with no broker."""
    app.makepyfile(
        test_orders="""
        import app

        def test_view_publishes(published):
            app.place_order("o-1", 5)
            published.assert_published_once(app.OrderPlaced, order_id="o-1", total=5)

        def test_handler_runs(tidings_capture):
            captured = tidings_capture(app.bus)
            app.place_order("o-2", 1)
            [outcome] = captured.deliver()
            assert outcome.handled == ("app.email",)
            assert app.emails[-1] == "o-2"
        """
    )
    app.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_failing_assert_published_shows_the_field_diff(app):
    """A miss reports what was published and a per-field diff of the closest event."""
    app.makepyfile(
        test_orders="""
        import app

        def test_view_publishes(published):
            app.place_order("o-1", 5)
            published.assert_published(app.OrderPlaced, order_id="o-1", total=6)
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*no OrderPlaced(order_id='o-1', total=6) published; 1 OrderPlaced published:*",
            "*- total: expected 6*",
            "*+ total: published 5*",
        ]
    )


def test_deliver_twice_catches_a_non_idempotent_handler(app):
    """The marker and the option make deliver() run each handler twice, exposing doubles."""
    app.makepyfile(
        test_orders="""
        import pytest
        import app

        @pytest.mark.tidings(deliver_twice=True)
        def test_one_email(published):
            before = len(app.emails)
            app.place_order("o-1", 5)
            published.deliver()
            assert len(app.emails) - before == 1, "email sent twice"
        """
    )
    app.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(failed=1)
    app.makepyfile(
        test_orders="""
        import app

        def test_one_email(published):
            before = len(app.emails)
            app.place_order("o-1", 5)
            published.deliver()
            assert len(app.emails) - before == 1, "email sent twice"
        """
    )
    app.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    result = app.runpytest_inprocess("-p", "no:cacheprovider", "--tidings-deliver-twice")
    result.assert_outcomes(failed=1)


def test_deterministic_ids_are_the_same_in_two_runs(app):
    """Two runs of a test with `deterministic_ids` see the same event ids and time."""
    app.makepyfile(
        test_ids="""
        import app

        def test_ids(deterministic_ids):
            event = app.OrderPlaced()
            print("ID", event.event_id, event.occurred_at)
        """
    )
    lines = []
    for _ in range(2):
        result = app.runpytest_inprocess("-s", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        lines.append([line for line in result.outlines if "ID " in line])
    assert lines[0] == lines[1]
    assert "2026-01-01T00:00:00.000000+00:00" in lines[0][0]


def test_a_handler_unit_test_is_fast(app):
    """Measures a handler unit test with no server: the test's call phase, reported."""
    app.makepyfile(
        test_fast="""
        import app

        def test_handler(tidings_capture):
            captured = tidings_capture(app.bus)
            app.place_order("o-1", 5)
            captured.deliver()
            captured.assert_published(app.OrderPlaced, order_id="o-1")
        """
    )
    started = time.perf_counter()
    result = app.runpytest_inprocess("-p", "no:cacheprovider", "--durations=0", "-vv")
    whole = time.perf_counter() - started
    result.assert_outcomes(passed=1)
    durations = [line for line in result.outlines if "test_handler" in line and "s " in line]
    print(f"whole in-process run {whole * 1000:.1f} ms;", *durations, sep="\n")
