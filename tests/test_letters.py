"""Unit tests of the bounds a dead letter puts on a received message's body and headers."""

from __future__ import annotations

import time

from tidings._letters import MAX_HEADER_KEY, MAX_HEADER_VALUE, MAX_HEADERS, bounded_letter_fields


def test_a_small_message_is_kept_whole_with_no_note():
    """A body within the limit and a few text headers are kept as they are, with no note."""
    body, headers, note = bounded_letter_fields(b"abc", {"a": "1", "n": 2, "f": 1.5}, 1024)
    assert (body, headers, note) == (b"abc", {"a": "1", "n": "2", "f": "1.5"}, "")


def test_a_large_body_is_cut_to_the_limit_and_noted():
    """A body over max_bytes keeps its first max_bytes bytes and the note gives both sizes."""
    body, _, note = bounded_letter_fields(b"x" * 5000, {}, 100)
    assert body == b"x" * 100
    assert "body cut from 5000 to 100 bytes" in note


def test_headers_are_bounded_in_number_name_and_value_and_noted():
    """Thousands of headers, long names and megabyte values are cut to the bounds, with a note."""
    many = {"k" * 500: "v" * 2**21, **{f"h{i}": "v" for i in range(3000)}, "list": [1, 2]}
    _, headers, note = bounded_letter_fields(b"", many, 100)
    assert len(headers) == MAX_HEADERS
    assert all(len(k) <= MAX_HEADER_KEY and len(v) <= MAX_HEADER_VALUE for k, v in headers.items())
    assert "2938 header(s) left out" in note
    assert "2 header name(s) or value(s) cut" in note  # the name and the value


def test_a_huge_integer_header_is_described_not_printed():
    """An integer header of thousands of digits costs no quadratic str() and keeps a short text."""
    began = time.monotonic()
    _, headers, _ = bounded_letter_fields(b"", {"retries": 10**20000}, 100)
    assert time.monotonic() - began < 0.5
    assert headers["retries"].startswith("<an integer of")
