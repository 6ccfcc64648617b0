"""The tidings pytest plugin, registered through the ``pytest11`` entry point.

Fixtures:

- ``tidings_capture``: a factory; ``tidings_capture(bus)`` captures ``bus`` for the test
  (see :func:`tidings.testing.kit.capture`) and returns the :class:`~tidings.testing.kit.Captured`.
- ``published``: the capture of the bus named by the ini option ``tidings_bus``
  (``"myapp.wiring:bus"``).
- ``deterministic_ids``: repeatable event ids and a frozen clock for the test.

``@pytest.mark.tidings(deliver_twice=True)`` or the ``--tidings-deliver-twice`` option makes
the test's captures deliver every event twice with no inbox. Importing this module imports
nothing but pytest; the kit is imported when a fixture is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tidings.bus import EventBus
    from tidings.testing.kit import Captured

__all__ = [
    "deterministic_ids",
    "published",
    "pytest_addoption",
    "pytest_configure",
    "tidings_capture",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--tidings-deliver-twice`` and the ``tidings_bus`` ini option."""
    parser.addoption(
        "--tidings-deliver-twice",
        action="store_true",
        default=False,
        help="tidings: deliver() hands every event to every handler twice, no inbox",
    )
    parser.addini("tidings_bus", "tidings: the bus the `published` fixture captures (module:attr)")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``tidings`` marker."""
    config.addinivalue_line(
        "markers", "tidings(deliver_twice=False): options of the tidings capture fixtures"
    )


def _twice(request: pytest.FixtureRequest) -> bool:
    marker = request.node.get_closest_marker("tidings")
    if marker is not None and "deliver_twice" in marker.kwargs:
        return bool(marker.kwargs["deliver_twice"])
    return bool(request.config.getoption("--tidings-deliver-twice"))


@pytest.fixture
def tidings_capture(request: pytest.FixtureRequest) -> Iterator[Callable[..., Captured]]:
    """A factory capturing a bus for the test; call it with the bus, get the Captured.

    Keyword arguments go to :func:`~tidings.testing.kit.capture`; ``deliver_twice`` defaults
    to the marker or option. Every capture ends (the transport is restored) after the test.
    """
    from tidings.testing.kit import capture  # noqa: PLC0415 - only when used

    with ExitStack() as stack:

        def start(bus: EventBus, **options: Any) -> Captured:
            options.setdefault("deliver_twice", _twice(request))
            return stack.enter_context(capture(bus, **options))

        yield start


@pytest.fixture
def published(request: pytest.FixtureRequest, tidings_capture: Callable[..., Captured]) -> Captured:
    """The capture of the bus the ini option ``tidings_bus = "module:attr"`` names."""
    spec = str(request.config.getini("tidings_bus") or "")
    if ":" not in spec:
        pytest.fail(
            'the `published` fixture needs `tidings_bus = "module:attr"` in the pytest ini; '
            "or use `tidings_capture(bus)`"
        )
    module, _, attr = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return tidings_capture(target)


@pytest.fixture
def deterministic_ids() -> Iterator[None]:
    """Repeatable ids (seed 0) and ``occurred_at`` frozen at 2026-01-01T00:00:00+00:00."""
    from tidings.testing.kit import deterministic  # noqa: PLC0415 - only when used

    with deterministic():
        yield
