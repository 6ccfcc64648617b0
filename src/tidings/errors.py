"""The errors tidings raises: one root, a few precise subclasses, each message saying the fix."""

from __future__ import annotations

__all__ = [
    "DuplicateEventTypeError",
    "DuplicateHandlerError",
    "EventDecodeError",
    "EventDefinitionError",
    "EventEncodeError",
    "EventTypeMismatchError",
    "HandlerFailedError",
    "InboxBusyError",
    "MissingDependencyError",
    "PayloadTooDeepError",
    "PayloadTooLargeError",
    "PublishError",
    "TidingsError",
    "UnknownEventTypeError",
    "UsageError",
]


class TidingsError(Exception):
    """Root of every error tidings raises on purpose; catch it to handle them all."""


class EventDefinitionError(TidingsError, TypeError):
    """An event class cannot be registered as written (not a frozen dataclass, no event_type)."""


class DuplicateEventTypeError(TidingsError, ValueError):
    """A different class is already registered under this event_type (or alias)."""


class DuplicateHandlerError(TidingsError, ValueError):
    """A handler name is taken on this bus; names are idempotency keys and must be unique."""


class EventEncodeError(TidingsError, TypeError):
    """An event holds a value that has no JSON form (for example an arbitrary object)."""


class EventDecodeError(TidingsError, ValueError):
    """A payload or dict could not be turned into an event.

    ``field`` names the offending field (a dotted path for nested values) when one is to blame,
    else ``None``. Every subclass is a decode failure: a worker dead-letters the message at once
    rather than retrying it, because the same bytes will fail the same way again.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLargeError(EventDecodeError):
    """A payload is longer than the configured byte limit; it was refused before parsing."""


class PayloadTooDeepError(EventDecodeError):
    """A payload nests arrays/objects deeper than the configured limit; refused before parsing."""


class UnknownEventTypeError(EventDecodeError, LookupError):
    """No class is registered (or aliased) under the payload's event type."""

    def __init__(self, event_type: str) -> None:
        super().__init__(
            f"unknown event type {event_type!r}: register its class with @register_event "
            "(or add an alias if it was renamed) in the process that decodes it",
            field="event_type",
        )
        self.event_type = event_type


class EventTypeMismatchError(EventDecodeError):
    """The payload names a registered class that is not the expected class or a subclass of it.

    Refused so that data can never choose a class outside what the caller asked for.
    """


class HandlerFailedError(ExceptionGroup[Exception], TidingsError):
    """One or more handlers raised while an event was dispatched.

    Every handler still ran; this groups their exceptions. Each grouped exception carries a note
    naming the handler and the event. Catch it with ``except*`` for the inner types, or with
    ``except TidingsError`` for all.
    """


class UsageError(TidingsError, TypeError):
    """The API was called in a way that cannot work; the message names the call to make instead."""


class InboxBusyError(TidingsError):
    """Another worker holds the claim on this (handler, event id); retry the delivery later.

    ``retry_after`` says, in seconds, when the claim expires if its holder has died.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PublishError(TidingsError):
    """The broker did not accept every event of a publish; send them again.

    Some may have been accepted: sending again is safe, because handlers run behind an inbox.
    """


class MissingDependencyError(TidingsError, ImportError):
    """A module the transport needs is not installed; the message names the extra to install.

    Raised by ``EventBus.publish``/``apublish`` in place of the transport's ``ImportError``
    (or a ``PublishError`` it caused): sending again fails the same way until it is installed.
    ``name`` is the missing module's name, when known.
    """
