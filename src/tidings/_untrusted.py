"""Reading what came from outside: strict counters, log-safe text, redacted URLs.

Anyone who can write to a queue or a stream controls a message's headers and fields, so
nothing read from them is trusted: counters are ASCII digits of bounded length and value,
text bound for a log line has its control characters escaped and its length capped, and URLs
(which carry passwords) are redacted before they are printed anywhere.
"""

from __future__ import annotations

import logging
import re
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

__all__ = [
    "MAX_COUNTER",
    "RedactingFilter",
    "log_safe",
    "parse_counter",
    "plain_id",
    "redact_text",
    "redact_url",
]

MAX_COUNTER: Final = 1_000_000
"""The largest attempt or delivery counter read from a message; anything above is nonsense."""

_COUNTER_DIGITS: Final = len(str(MAX_COUNTER))
_DIGITS: Final = re.compile(r"[0-9]+")
_UNSAFE: Final = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
# The same, but LF and tab pass: for multi-line text shown as a block (a body, a traceback).
_UNSAFE_IN_BLOCK: Final = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SECRET_KEYS: Final = frozenset({"password", "passwd", "pwd", "secret", "token", "sslpassword"})


def parse_counter(value: object) -> int | None:
    """Return the counter ``value`` spells, or ``None`` when it is not a sane counter.

    A sane counter is an ``int`` (not a ``bool``) or a ``str``/``bytes`` of ASCII digits only,
    at most as many digits as :data:`MAX_COUNTER`, with a value from 0 to :data:`MAX_COUNTER`.
    ``"²"``, ``"-1"``, ``" 3"``, ``"1e9"`` and five thousand digits are all ``None``: the
    caller treats the message as one whose counters are nonsense (dead-letters it). Constant
    time whatever the input's length.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value <= MAX_COUNTER else None
    if isinstance(value, bytes | bytearray):
        value = value.decode("ascii", "replace") if len(value) <= _COUNTER_DIGITS else None
    # str.isdigit() takes "²" and other scripts' digits: only ASCII digits match here.
    if not isinstance(value, str) or len(value) > _COUNTER_DIGITS or not _DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if number <= MAX_COUNTER else None


def plain_id(value: object, limit: int = 256) -> str | None:
    """Return ``value`` if it is an id fit to carry: printable ASCII, 1 to ``limit`` characters.

    The rule the codec applies to envelope ids, for ids read from anywhere else (message
    headers, say); anything else is ``None``, and the caller treats the id as absent.
    """
    if isinstance(value, str) and 0 < len(value) <= limit and value.isascii():
        return value if value.isprintable() else None
    return None


def log_safe(value: object, limit: int = 200, *, keep_newlines: bool = False) -> str:
    """Return ``value`` as text fit for one log line: escaped, and cut at ``limit`` characters.

    Control characters (CR, LF, ESC…), line and paragraph separators, bidi overrides and lone
    surrogates are written as escapes, so a value from a message can neither forge a log line
    nor drive a terminal. Longer text is cut and ends with ``…(N chars)``.

    With ``keep_newlines``, LF and tab are kept as they are (everything else is escaped as
    above, CR, U+2028 and U+2029 included): for a multi-line block shown to a person, such
    as a dead letter's body or traceback, never for a line of a log.
    """
    text = value if isinstance(value, str) else repr(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    unsafe = _UNSAFE_IN_BLOCK if keep_newlines else _UNSAFE
    text = unsafe.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return f"{text}…({len(value) if isinstance(value, str) else 'more'} chars)" if cut else text


def redact_url(url: str) -> str:
    """Return ``url`` with its password, and any secret-looking query parameter, as ``***``.

    ``redis://:s3cret@host/0`` → ``redis://:***@host/0``;
    ``postgresql://app@db/x?password=s3cret`` → ``...?password=***``. A string that does not
    parse as a URL is returned with everything before an ``@`` replaced, to be safe.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***@" + url.rsplit("@", 1)[1] if "@" in url else url
    changed = False
    if password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts, changed = parts._replace(netloc=f"{user}:***@{host}"), True
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in _SECRET_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_KEYS else v) for k, v in pairs], safe="*:/"
            )
            parts, changed = parts._replace(query=query), True
    # Rebuilt only when something was hidden: urlunsplit drops the empty host of sqlite:///x.
    return parts.geturl() if changed else url


def _secrets(url: str) -> set[str]:
    """The secrets in ``url``: password and secret query values, as written and decoded."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        password = parts.password
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        userinfo = url.rsplit("@", 1)[0] if "@" in url else ""
        found.add(userinfo.rpartition(":")[2])
        return {secret for secret in found if secret}
    if password is not None:
        found.update({password, unquote(password), quote(unquote(password), safe="")})
    for key, value in pairs:
        if key.lower() in _SECRET_KEYS:
            found.update({value, quote(value, safe="")})
    return {secret for secret in found if secret}


def redact_text(text: str, *urls: str | None) -> str:
    """Return ``text`` with each of ``urls`` redacted and every secret they hold as ``***``.

    For messages that quote a URL or a driver's own error (SQLAlchemy, psycopg and redis-py
    errors may echo the DSN or the password): each URL is replaced by :func:`redact_url`'s
    form, then any remaining occurrence of its password or secret query values, as written or
    percent-decoded, by ``***``.
    """
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        for secret in sorted(_secrets(url), key=len, reverse=True):
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Keeps the passwords of given URLs out of a logger's records, tracebacks included.

    Installed on a logger (:meth:`install`), it renders each record's message and traceback
    once, through :func:`~tidings._untrusted.redact_text` with every URL it was given, so no
    handler or formatter prints a database or broker password that a driver's error echoed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    @classmethod
    def install(cls, logger: logging.Logger, *urls: str | None) -> RedactingFilter:
        """Add ``urls`` to the logger's redacting filter, installing one if it has none."""
        found = next((f for f in logger.filters if isinstance(f, RedactingFilter)), None)
        if found is None:
            found = cls()
            logger.addFilter(found)
        found.urls.update(url for url in urls if url)
        return found

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place; never drops it."""
        if not self.urls:
            return True
        urls = sorted(self.urls)
        record.msg = redact_text(record.getMessage(), *urls)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, *urls)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, *urls)
        return True
