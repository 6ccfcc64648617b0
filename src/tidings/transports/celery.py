"""Celery: events as tasks (:class:`CeleryTransport`), and context that follows every task.

``CeleryTransport`` (see its docstring) carries events to Celery workers that handle them once
in effect, with retries and dead letters. It installs the propagation below on its app; an app
that only wants propagation calls :func:`install_context_propagation` itself.

The rest of this docstring is about propagation.

**What is propagated.** The three ids of :class:`tidings.EventContext` (``correlation_id``,
``causation_id``, ``tenant_id``) travel as the message headers ``tidings_correlation_id``,
``tidings_causation_id`` and ``tidings_tenant_id``, for every task of the app, not only
tidings' own: a plain ``@app.task`` sent from a request handler sees the request's ids.

**What you call.** One line in the module that creates your Celery app, which both the web
process and the worker import::

    app = Celery("shop")
    install_context_propagation(app)

Nothing is installed on import, of ``tidings`` or of this module, and this module imports
Celery only when that function is called.

**How.** Three Celery signals:

- ``before_task_publish`` copies each id of :func:`tidings.current_context` that is not ``None``
  into the headers of the message being sent, never replacing a header the caller set. A task
  sent with no context bound carries none of the three headers.
- ``task_prerun`` binds, for the run of a task of this app, exactly the ids its message
  carries, so nothing stale from an earlier task in the same worker process can show through.
  A task whose message carries none (sent by Celery beat, a management command, a shell) gets
  a fresh correlation id of its own at its start, so the events and tasks it starts share one
  (``mint_correlation_id=False`` binds nothing instead). Header values come from the message:
  only printable ASCII ids of up to 256 characters are taken, anything else counts as absent.
  A task run eagerly (``apply()``, ``task_always_eager``) was not published: it keeps the
  caller's context unless its ``headers`` say otherwise.
- ``task_postrun``, which Celery sends after a success, a failure, a ``retry()`` and a
  rejection alike, restores the context that was current before the task.

Every follow-up message is published either from the publisher's context or from inside a
task whose context is bound, so the ids also reach: ``retry()`` and ``autoretry_for`` (Celery
re-sends the request's headers), ``countdown``/``eta``, tasks sent from a task or from a
handler it runs (with the causation bound there), and canvas: a chain's next step and a
chord's callback are sent by the worker from inside the task before them, group members and
chord headers from the publisher (verified with the Redis result backend). Any pool that runs
a task's prerun, body and postrun in one thread works: prefork, solo and threads.

Celery's publish signal names the task, never the app, so that half is process-wide: once
installed on any app, every message published in the process while a context is bound carries
the ids (three short headers, which a worker without propagation ignores). Binding and
restoring, the half that changes what task code sees, is done for the tasks of installed apps
only, so two apps in one process do not interfere.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

from tidings._ids import new_event_id
from tidings._untrusted import plain_id
from tidings.context import EMPTY, EventContext, bind, current_context, reset
from tidings.transports._celery_transport import (
    CeleryTransport,
    DeliveryFailed,
    DeliveryRetried,
    handler_task_name,
)

if TYPE_CHECKING:
    import celery

__all__ = [
    "CAUSATION_HEADER",
    "CORRELATION_HEADER",
    "TENANT_HEADER",
    "CeleryTransport",
    "DeliveryFailed",
    "DeliveryRetried",
    "handler_task_name",
    "install_context_propagation",
]

CORRELATION_HEADER: Final = "tidings_correlation_id"
"""Message header carrying :attr:`tidings.EventContext.correlation_id`."""
CAUSATION_HEADER: Final = "tidings_causation_id"
"""Message header carrying :attr:`tidings.EventContext.causation_id`."""
TENANT_HEADER: Final = "tidings_tenant_id"
"""Message header carrying :attr:`tidings.EventContext.tenant_id`."""

_HEADERS: Final = (CORRELATION_HEADER, CAUSATION_HEADER, TENANT_HEADER)
# Where the token of a task's binding waits for task_postrun: on the request object itself,
# which lives exactly as long as the run (prerun and postrun see the same one).
_BINDING_ATTRIBUTE: Final = "_tidings_context_binding"
_UID: Final = "tidings.transports.celery."

# App -> whether a task that carries no ids gets a minted correlation id.
_installed: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()


def install_context_propagation(
    app: celery.Celery, *, mint_correlation_id: bool | None = None
) -> None:
    """Make every task of ``app`` run with the context of the code that sent it.

    Call once, where the app is created; calling again for the same app changes only
    ``mint_correlation_id``, when given. Thread-safe. The app is held weakly: an app that is garbage
    collected stops counting.

    Args:
        app: the Celery app.
        mint_correlation_id: a task whose message carries no ids (Celery beat, a shell) runs
            with a fresh correlation id of its own (the default); ``False`` runs it with none.

    Raises:
        ImportError: Celery is not installed (``pip install 'tidings[celery]'``).
    """
    signals = _celery_signals()
    with _install_lock:
        if app in _installed:
            if mint_correlation_id is not None:
                _installed[app] = mint_correlation_id
            return
        # One connection per process (dispatch_uid), however many apps install; the receivers
        # tell the apps apart. Module functions never die, so Celery need not hold them weakly.
        signals.before_task_publish.connect(
            _stamp_headers, weak=False, dispatch_uid=_UID + "publish"
        )
        signals.task_prerun.connect(_bind_for_task, weak=False, dispatch_uid=_UID + "prerun")
        signals.task_postrun.connect(_restore_after_task, weak=False, dispatch_uid=_UID + "postrun")
        _installed[app] = mint_correlation_id is not False


def _celery_signals() -> Any:
    try:
        from celery import signals  # noqa: PLC0415 - imported on use, never on import
    except ImportError as exc:
        msg = (
            "Celery context propagation needs Celery: pip install 'tidings[celery]' "
            "(or add celery to your dependencies)"
        )
        raise ImportError(msg, name="celery") from exc
    return signals


def _stamp_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: add the bound ids the caller did not set itself."""
    if headers is None or not _installed:
        return
    context = current_context()
    for name, value in zip(
        _HEADERS, (context.correlation_id, context.causation_id, context.tenant_id), strict=True
    ):
        if value is not None and name not in headers:
            headers[name] = value


def _bind_for_task(sender: Any = None, task: Any = None, **_: Any) -> None:
    """``task_prerun``: bind the ids the message carries, for a task of an installed app."""
    task = sender if task is None else task
    app = getattr(task, "app", None)
    mint = None if app is None else _installed.get(app)
    if mint is None:
        return
    request = task.request
    context = _carried_context(request)
    if context is None:
        # A published task carrying no ids runs with none of an earlier task's, a fresh
        # correlation id of its own if so configured; an eager one was never published, so
        # the caller's context is its publisher's.
        if getattr(request, "is_eager", False):
            context = current_context()
        else:
            context = EventContext(correlation_id=new_event_id()) if mint else EMPTY
    setattr(request, _BINDING_ATTRIBUTE, bind(context))


def _restore_after_task(sender: Any = None, task: Any = None, **_: Any) -> None:
    """``task_postrun``: restore the context that was current before the task's binding."""
    task = sender if task is None else task
    if task is None:
        return
    token = vars(task.request).pop(_BINDING_ATTRIBUTE, None)
    if token is not None:
        reset(token)


def _carried_context(request: Any) -> EventContext | None:
    """The ids a task's message carries, or ``None`` when it carries none of them.

    Protocol 2 copies every custom message header onto the request as an attribute and into
    ``request.headers``; a message converted from protocol 1 and an eager run may have them
    under ``request.headers`` only, or nested one level deeper under ``headers`` (the shape
    some Celery versions give ``apply_async(headers=...)``). Values come from the message, so
    only ids fit to carry are taken (:func:`tidings._untrusted.plain_id`).
    """
    sources: list[Any] = [vars(request)]
    headers = getattr(request, "headers", None)
    if isinstance(headers, dict):
        sources.append(headers)
        if isinstance(headers.get("headers"), dict):
            sources.append(headers["headers"])
    found: dict[str, str] = {}
    for name in _HEADERS:
        for source in sources:
            value = plain_id(source.get(name))
            if value is not None:
                found[name] = value
                break
    if not found:
        return None
    return EventContext(
        correlation_id=found.get(CORRELATION_HEADER),
        causation_id=found.get(CAUSATION_HEADER),
        tenant_id=found.get(TENANT_HEADER),
    )
