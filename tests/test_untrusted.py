"""Strict counters, log-safe text and redacted URLs: the rules for values from outside."""

import pytest

from tidings._untrusted import MAX_COUNTER, log_safe, parse_counter, redact_url


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("3", 3),
        (b"12", 12),
        (7, 7),
        (str(MAX_COUNTER), MAX_COUNTER),
        (str(MAX_COUNTER + 1), None),
        ("²", None),
        ("٣", None),
        ("-1", None),
        (" 3", None),
        ("3\n", None),
        ("1e9", None),
        ("", None),
        ("9" * 5000, None),
        (b"\xff", None),
        (True, None),
        (-1, None),
        (MAX_COUNTER * 10**50, None),
        (3.0, None),
        (None, None),
    ],
)
def test_parse_counter_takes_only_bounded_ascii_digits(value, expected):
    """Only ASCII digits of bounded length and value are a counter; anything else is None."""
    assert parse_counter(value) == expected


def test_log_safe_escapes_control_characters_and_caps_length():
    """CR, LF, ESC, bidi overrides and lone surrogates are escaped; long text is cut."""
    text = log_safe("a\r\nb\x1b[31m\u202e\ud800" + "x" * 500, limit=40)
    assert "\r" not in text
    assert "\n" not in text
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "\ud800" not in text
    assert text.startswith("a\\r\\nb\\x1b[31m")
    assert text.endswith("…(511 chars)")
    assert log_safe("order-1") == "order-1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        ("postgresql://app@db/x?password=s3cret&sslmode=require", None),
        ("redis://localhost:6379/1", "redis://localhost:6379/1"),
        ("celery+redis://u:p%40ss@h/0?queues=a,b", "celery+redis://u:***@h/0?queues=a,b"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
    ],
)
def test_redact_url_hides_passwords(url, expected):
    """Userinfo passwords and password-like query parameters never survive redaction."""
    redacted = redact_url(url)
    assert "s3cret" not in redacted
    assert "p%40ss" not in redacted
    if expected is not None:
        assert redacted == expected
    else:
        assert "password=***" in redacted
        assert "sslmode=require" in redacted


def test_log_safe_keep_newlines_keeps_lf_and_tab_and_escapes_the_rest():
    """With keep_newlines LF and tab stay; CR, ESC, U+2028/2029, bidi and surrogates escape."""
    text = "line 1\n\tline 2\r\x1b[31m\u2028\u2029\u202e\ud800"
    kept = log_safe(text, 1000, keep_newlines=True)
    assert kept == "line 1\n\tline 2\\r\\x1b[31m\\u2028\\u2029\\u202e\\ud800"
    assert "\n" not in log_safe(text, 1000)
    assert "\t" not in log_safe(text, 1000)
