"""The foundation's benchmark cases: events, codec and the in-process bus against the seed."""

from __future__ import annotations

from benchmarks import events
from benchmarks.harness import Case
from benchmarks.seed_baseline import seed_decode, seed_encode
from tidings import EventBus, decode, encode


def cases() -> list[Case]:
    """Return the cases, each against a faithful re-implementation of the seed's approach."""
    kwargs = events.fields()
    ours_event = events.OrderPlaced(**kwargs)
    seed_event = events.SeedOrderPlaced(**kwargs)
    ours_bytes = encode(ours_event)
    seed_bytes = seed_encode(seed_event)

    def no_op(event: object) -> None:
        return None

    bus = EventBus()
    bus.add_handler(no_op, events.OrderPlaced, name="bench.no_op")

    def construct_ours() -> object:
        return events.OrderPlaced(**kwargs)

    def construct_seed() -> object:
        return events.SeedOrderPlaced(**kwargs)

    return [
        Case("event construction (10 mixed fields)", construct_ours, construct_seed, 2),
        Case(
            "encode: event → JSON bytes",
            lambda: encode(ours_event),
            lambda: seed_encode(seed_event),
        ),
        Case(
            "decode: JSON bytes → event",
            lambda: decode(ours_bytes),
            lambda: seed_decode(seed_bytes),
        ),
        Case(
            "round trip: event → bytes → event",
            lambda: decode(encode(ours_event)),
            lambda: seed_decode(seed_encode(seed_event)),
            10,
        ),
        Case(
            "publish, one no-op handler vs calling it",
            lambda: bus.publish(ours_event),
            lambda: no_op(ours_event),
        ),
        Case(
            "publish, one no-op handler vs seed construction",
            lambda: bus.publish(ours_event),
            construct_seed,
            4,
        ),
    ]
