"""Large request bodies: those with long data URLs parse as ``json.loads`` parses them
(api/openai/body.py: the cut-out is exact or not taken, whatever the bytes), and the API
process's allocator keeps memory for the next one (runtime/malloc.py)."""

from __future__ import annotations

import base64
import json
import platform
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yichui.api.openai.body import loads
from yichui.runtime import malloc

URL = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 40).decode()


def _same(raw: bytes) -> None:
    try:
        expected: Any = json.loads(raw)
    except ValueError as exc:
        expected = (type(exc), str(exc))
    try:
        got: Any = loads(raw)
    except ValueError as exc:
        got = (type(exc), str(exc))
    assert got == expected


def test_a_chat_body_with_images_parses_as_json_does() -> None:
    doc = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two pictures"},
                    {"type": "image_url", "image_url": {"url": URL}},
                    {"type": "image_url", "image_url": {"url": URL[:-4] + "QUJD"}},
                ],
            }
        ],
    }
    raw = json.dumps(doc).encode()
    assert loads(raw) == doc
    _same(json.dumps(doc, indent=2, ensure_ascii=False).encode())


def test_what_is_not_one_plain_string_token_is_left_to_the_parser() -> None:
    url = URL.encode()
    for raw in [
        b'{"u": "' + url.replace(b"/", b"\\/") + b'"}',  # an escape inside: not cut
        b'{"t": "see \\"' + url + b'"}',  # the data URL inside a longer string
        b'{"t": "see \\"' + url + b'\\" here", "u": "' + url + b'"}',
        b'{"' + url + b'": 1}',  # a key
        b'{"u": "' + url + b'", "u": "x"}',  # a duplicate key: the last wins
        b'{"u": "' + url + b'", "n": 123456789012345678901234567890}',  # a big int stays int
        b'{"u": "' + url + b'", "n": NaN}',
    ]:
        _same(raw)
    assert loads(b'{"u": "' + url + b'", "n": 123456789012345678901234567890}')["n"] == (
        123456789012345678901234567890
    )


def test_bad_json_gets_the_stdlibs_error() -> None:
    url = URL.encode()
    for raw in [
        b'{"u": "' + url + b'"',  # not closed
        b'{"u": "' + url + b'\xff"}',  # not UTF-8 inside the URL
        b'{"u": "' + url + b'", }',
        b'{"u": "' + url,
        b'["' + url + b'" "' + url + b'"]',
    ]:
        _same(raw)


_pieces = st.sampled_from(
    ['"', "\\", '\\"', "data:", '"data:', URL, URL[:100], "{", "}", "[", "]", ",", ":", " ", "a"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=12))
def test_any_bytes_parse_as_json_does(parts: list[str]) -> None:
    _same("".join(parts).encode())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just(URL),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.just(URL), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_json, st.booleans())
def test_any_document_with_urls_round_trips(doc: Any, ascii_only: bool) -> None:
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert loads(raw) == doc


def test_the_allocator_tuning_applies_on_glibc_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``yichui serve`` keeps freed memory for the next body (runtime/malloc.py): applied by
    glibc's mallopt here; not with 0, nor over the operator's own MALLOC_* tunables."""
    assert malloc.tune(0) is False
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert malloc.tune(256 * 1024**2) is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert malloc.tune(256 * 1024**2) is (platform.libc_ver()[0] == "glibc")
