"""SpaceByte's rule on hand-made bytes, including multi-byte UTF-8."""

from __future__ import annotations

import torch

from pico.model import BOS, is_spacelike, spacelike_boundaries


def boundaries(data: bytes | list[int]) -> list[int]:
    ids = torch.tensor([list(data)])
    return spacelike_boundaries(ids)[0].nonzero().flatten().tolist()


def test_spacelike_bytes():
    ids = torch.tensor([ord(c) for c in "aZ09 ,\n"] + [0x80, 0xBF, 0xC3, 0xE2, 0xFF, 0x7F, BOS])
    assert is_spacelike(ids).tolist() == [False] * 4 + [True] * 3 + [False, False] + [True] * 5


def test_rule_routes_the_first_spacelike_byte_after_a_word():
    assert boundaries(b"ab cd") == [2]
    assert boundaries(b"a, b") == [1]          # ", " is one run: only its first byte
    assert boundaries(b"x1 2.") == [2, 4]     # digits are word characters
    assert boundaries(b"end.\n\nNew") == [3]
    assert boundaries(b" a") == [0]           # position 0 follows nothing
    assert boundaries([BOS] + list(b"hi there")) == [0, 3]


def test_rule_on_multibyte_utf8():
    # "né e": n, C3 A9 (é), space, e. The lead byte C3 is spacelike, its continuation A9 is not.
    assert list("né e".encode()) == [0x6E, 0xC3, 0xA9, 0x20, 0x65]
    assert boundaries("né e".encode()) == [1, 3]
    # "日本 x": two 3-byte characters; each lead byte (E6, E6) is spacelike and follows a continuation byte.
    data = "日本 x".encode()
    assert len(data) == 8
    assert boundaries(data) == [0, 3, 6]
    # a 4-byte emoji between letters: F0 is a boundary, its three continuation bytes are not
    assert boundaries("a😀b".encode()) == [1]
