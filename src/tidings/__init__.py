"""tidings: domain events that must not get lost.

Typed immutable events, a CloudEvents JSON codec, context (correlation, causation, tenant) that
follows every hop, and an event bus. Importing tidings starts nothing: no threads, no clients,
no signal handlers.
"""

from tidings.bus import EventBus, Handler
from tidings.codec import Codec, Envelope, Limits, decimal_bounds, decode, encode, read
from tidings.context import EventContext, current_context, event_context
from tidings.errors import (
    DuplicateEventTypeError,
    DuplicateHandlerError,
    EventDecodeError,
    EventDefinitionError,
    EventEncodeError,
    EventTypeMismatchError,
    HandlerFailedError,
    InboxBusyError,
    MissingDependencyError,
    PayloadTooDeepError,
    PayloadTooLargeError,
    PublishError,
    TidingsError,
    UnknownEventTypeError,
    UsageError,
)
from tidings.events import DomainEvent
from tidings.registry import EventRegistry, default_registry, get_event_class, register_event

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "DomainEvent",
    "DuplicateEventTypeError",
    "DuplicateHandlerError",
    "Envelope",
    "EventBus",
    "EventContext",
    "EventDecodeError",
    "EventDefinitionError",
    "EventEncodeError",
    "EventRegistry",
    "EventTypeMismatchError",
    "Handler",
    "HandlerFailedError",
    "InboxBusyError",
    "Limits",
    "MissingDependencyError",
    "PayloadTooDeepError",
    "PayloadTooLargeError",
    "PublishError",
    "TidingsError",
    "UnknownEventTypeError",
    "UsageError",
    "__version__",
    "current_context",
    "decimal_bounds",
    "decode",
    "default_registry",
    "encode",
    "event_context",
    "get_event_class",
    "read",
    "register_event",
]
