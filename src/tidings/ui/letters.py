"""The dead-letter pages: a filtered list, one letter in full, and replay or purge.

Replay and purge go through a confirmation page whose form is POSTed with the process's CSRF
token; both are refused with 403 unless the config allows them, and a replay needs a replayer.
The letters an action means are read before any is changed (one ``id``, or every letter
matching the filters, oldest first), as ``tidings dlq`` does.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from tidings.deadletter import find, iter_matching, parse_since
from tidings.ports import DeadLetter, DeadLetterFilter, DeadLetterStore, Replayer
from tidings.ui._base import Pages, RefusedError, block, safe

__all__ = ["LetterPages"]

_PAGE = 50
_FORM_BYTES = 64 * 1024
_FORM_FIELDS = 20


def _since(text: str) -> datetime | None:
    """An ISO-8601 time or an age like 30m (see :func:`~tidings.deadletter.parse_since`)."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise RefusedError(400, f"since: {exc}") from None


def _filter(params: Any) -> DeadLetterFilter:
    def get(name: str) -> str | None:
        value = str(params.get(name, "")).strip()
        return value or None

    return DeadLetterFilter(
        handler=get("handler"),
        event_type=get("event_type"),
        since=_since(str(params.get("since", ""))),
        reason=get("reason"),
    )


def _filter_fields(params: Any) -> dict[str, str]:
    """The filter's fields as given (for links and hidden form fields)."""
    names = ("handler", "event_type", "since", "reason")
    return {name: str(params.get(name, "")) for name in names if params.get(name)}


def _failed_by(letter: DeadLetter, until: datetime) -> bool:
    """Whether ``letter`` was dead-lettered at or before ``until`` (an unreadable time: yes)."""
    try:
        failed_at = datetime.fromisoformat(letter.failed_at)
    except ValueError:
        return True
    return (failed_at if failed_at.tzinfo else failed_at.replace(tzinfo=UTC)) <= until


def _letter_row(letter: DeadLetter) -> dict[str, str]:
    reason = letter.reason.strip().partition("\n")[0]
    return {
        "id": safe(letter.id),
        "failed_at": safe(letter.failed_at[:19].replace("T", " ")),
        "transport": safe(letter.transport),
        "destination": safe(letter.destination),
        "handler": safe(letter.handler),
        "event_type": safe(letter.event_type),
        "attempts": str(letter.attempts),
        "reason": safe(reason, 120),
    }


def _replay(store: DeadLetterStore, replayer: Replayer, letter_id: str) -> dict[str, str]:
    """Replay one letter, removing it once the replay returned; say what happened."""
    shown = safe(letter_id)
    letter = store.get(letter_id)
    if letter is None:
        return {"id": shown, "done": "gone (no such letter)"}
    try:
        replayer.replay(letter)
    except Exception as exc:  # noqa: BLE001 - a failure keeps the letter, and is reported
        return {
            "id": shown,
            "done": f"replay failed, kept: {safe(type(exc).__name__)}: {safe(exc)}",
        }
    store.remove(letter.id)
    return {"id": shown, "done": f"replayed to {safe(letter.destination)}"}


class LetterPages(Pages):
    """The dead-letter routes' handlers."""

    def _letters(self) -> DeadLetterStore:
        if self.config.dead_letters is None:
            raise RefusedError(
                404, "no dead-letter store configured: start tidings ui with --store"
            )
        return self.config.dead_letters

    def letters(self, request: Request) -> Response:
        """GET /letters: a page of letters the filters match, newest first."""
        store = self._letters()
        where = _filter(request.query_params)
        try:
            offset = max(int(request.query_params.get("offset", "0")), 0)
        except ValueError:
            raise RefusedError(400, "offset is a whole number") from None
        page = find(store, where, limit=_PAGE + 1, offset=offset)
        return self.render(
            "letters.html",
            total=store.count(),
            filters=_filter_fields(request.query_params),
            letters=[_letter_row(letter) for letter in page[:_PAGE]],
            offset=offset,
            more=len(page) > _PAGE,
            page=_PAGE,
        )

    def letter(self, request: Request) -> Response:
        """GET /letters/{id}: every field of one letter, its body as text or hex."""
        letter_id = str(request.path_params["letter_id"])
        letter = self._letters().get(letter_id)
        if letter is None:
            raise RefusedError(404, f"no dead letter with id {safe(letter_id)}")
        try:
            body, body_kind = block(letter.body.decode("utf-8")), "UTF-8 text"
        except UnicodeDecodeError:
            rows = range(0, len(letter.body), 16)
            body = "\n".join(f"{i:08x}  {letter.body[i : i + 16].hex(' ')}" for i in rows)
            body_kind = "not UTF-8, in hex"
        headers = {safe(key, 200): safe(value, 1000) for key, value in letter.headers.items()}
        return self.render(
            "letter.html",
            letter=_letter_row(letter),
            letter_id=letter.id,
            event_id=safe(letter.event_id),
            event_query=letter.event_id or "",
            reason=block(letter.reason),
            headers=headers,
            body=body,
            body_kind=body_kind,
            body_bytes=len(letter.body),
            traceback=block(letter.traceback),
        )

    def confirm(self, request: Request) -> Response:
        """GET /letters/confirm: what a replay or purge would touch, and the form to do it."""
        action = str(request.query_params.get("action", ""))
        if action not in ("replay", "purge"):
            raise RefusedError(400, "action is replay or purge")
        store = self._letters()
        until = datetime.now(UTC)
        ids = self._chosen(store, request.query_params, until)
        filters = _filter_fields(request.query_params)
        since = _filter(request.query_params).since
        if since is not None:  # an age (30m) is fixed now: the form means these letters
            filters["since"] = since.isoformat()
        return self.render(
            "confirm.html",
            action=action,
            ids=ids,
            shown=[safe(letter_id) for letter_id in ids[:_PAGE]],
            filters=filters,
            letter_id=str(request.query_params.get("id", "")),
            until=until.isoformat(),
            can_replay=self.config.replayer is not None,
            csrf=self.config.csrf_token,
        )

    def _chosen(self, store: DeadLetterStore, params: Any, until: datetime) -> list[str]:
        """The letters an action means: one ``id``, or every one matching the filters.

        Only letters dead-lettered by ``until`` (the confirmation page's time) count, so that
        a POST acts on the letters the operator was shown, not on those that came since.
        """
        letter_id = str(params.get("id", ""))
        if letter_id:
            return [letter_id] if store.get(letter_id) is not None else []
        where = _filter(params)
        ids = dict.fromkeys(
            letter.id for letter in iter_matching(store, where) if _failed_by(letter, until)
        )
        return list(reversed(ids))  # oldest first

    async def act(self, request: Request) -> Response:
        """POST /letters/replay or /letters/purge: checked, then done in the thread pool."""
        body = await request.body()
        kind = request.headers.get("content-type", "").partition(";")[0].strip()
        if kind != "application/x-www-form-urlencoded" or len(body) > _FORM_BYTES:
            return self.render("error.html", 400, reason="a small url-encoded form is expected")
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        fields = dict(pairs[:_FORM_FIELDS])
        return await run_in_threadpool(self.guarded(lambda r: self._act(r, fields)), request)

    def _act(self, request: Request, form: dict[str, str]) -> Response:
        if not self.config.allow_replay:
            raise RefusedError(403, "read-only: start tidings ui with --allow-replay to change it")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).hostname not in self.config.hosts:
            raise RefusedError(403, "the form was posted from another site")
        if not hmac.compare_digest(form.get("csrf", ""), self.config.csrf_token):
            raise RefusedError(403, "the form's token is missing or stale: reload the page")
        if form.get("confirm") != "yes":
            raise RefusedError(400, "not confirmed")
        action = str(request.path_params["action"])
        if action not in ("replay", "purge"):
            raise RefusedError(404, "POST /letters/replay or /letters/purge")
        store = self._letters()
        try:
            until = datetime.fromisoformat(form.get("until", ""))
        except ValueError:
            raise RefusedError(400, "the form has no confirmation time: reload the page") from None
        ids = self._chosen(store, form, until if until.tzinfo else until.replace(tzinfo=UTC))
        if form.get("count") != str(len(ids)):
            raise RefusedError(
                409,
                f"{len(ids)} letter(s) match now, not the {safe(form.get('count', '?'))[:20]} "
                "you confirmed: review them again",
            )
        outcomes: list[dict[str, str]] = []
        if action == "purge":
            for letter_id in ids:
                gone = store.remove(letter_id)
                outcomes.append({"id": safe(letter_id), "done": "purged" if gone else "gone"})
        else:
            replayer = self.config.replayer
            if replayer is None:
                raise RefusedError(400, "no replayer: start tidings ui with --app module:bus")
            outcomes = [_replay(store, replayer, letter_id) for letter_id in ids]
        return self.render("done.html", action=action, outcomes=outcomes)
