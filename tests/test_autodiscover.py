"""bus.autodiscover imports the modules that subscribe handlers; bus.describe lists them."""

import importlib
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tidings import EventBus


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh package on sys.path whose handlers module subscribes to a bus it is handed."""
    name = f"autodisc_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "events.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from typing import ClassVar
            from tidings import DomainEvent

            @dataclass(frozen=True)
            class Shipped(DomainEvent):
                event_type: ClassVar[str] = "autodisc.shipped"
            """
        )
    )
    (root / "handlers.py").write_text(
        textwrap.dedent(
            f"""
            from {name}.events import Shipped
            from {name}.wiring import bus

            @bus.subscribe(Shipped, name="autodisc.on_shipped")
            def on_shipped(event):
                pass
            """
        )
    )
    (root / "wiring.py").write_text("from tidings import EventBus\n\nbus = EventBus()\n")
    (tmp_path / f"{name}_plain.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def test_autodiscover_imports_a_packages_handlers_module(package: str) -> None:
    """``autodiscover("shop")`` imports ``shop.handlers``, whose handlers join the bus."""
    bus = importlib.import_module(f"{package}.wiring").bus
    assert bus.handler("autodisc.on_shipped") is None
    imported = bus.autodiscover(package, f"{package}_plain")
    assert imported == (f"{package}.handlers", f"{package}_plain")
    assert bus.handler("autodisc.on_shipped") is not None
    assert "autodisc.on_shipped <- autodisc.shipped" in bus.describe()


def test_autodiscover_fails_loudly_on_a_missing_module() -> None:
    """A mistyped package name is an ImportError at start-up, not a silently idle worker."""
    with pytest.raises(ImportError):
        EventBus().autodiscover("no_such_package_for_tidings")


def test_describe_says_when_nothing_is_subscribed() -> None:
    """An empty bus says so, so an operator sees a worker that serves nothing."""
    assert EventBus().describe() == "no handlers subscribed"
