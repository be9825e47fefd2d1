"""SpaceByte's routing rule, the fixed baseline the learned router must beat.

SpaceByte (Slagle 2024, "SpaceByte: Towards Deleting Tokenization from Large Language
Modeling", arXiv:2404.14408, section 2) applies its large global blocks only after
*spacelike* bytes: a byte is spacelike unless it is an ASCII letter, an ASCII digit, or a UTF-8
continuation byte (0x80-0xBF). A global block is inserted after a spacelike byte that follows a
non-spacelike byte, so a run of spaces or punctuation costs one global block, at its first byte.

In pico's terms the "global block after byte t" is the latent stack applied to position t's
residual, whose output predicts byte t+1 (the first byte of the next word, the hardest to guess).
UTF-8 lead bytes (0xC0-0xFF) are spacelike under this rule, as in SpaceByte; the special ids
BOS, EOS and PAD (256-258) are spacelike too, so a sequence that starts with BOS routes it.
"""

from __future__ import annotations

import torch


def is_spacelike(x: torch.Tensor) -> torch.Tensor:
    """Bool mask of spacelike ids: everything but [0-9A-Za-z] and continuation bytes 0x80-0xBF."""
    digit = (x >= ord("0")) & (x <= ord("9"))
    upper = (x >= ord("A")) & (x <= ord("Z"))
    lower = (x >= ord("a")) & (x <= ord("z"))
    continuation = (x >= 0x80) & (x <= 0xBF)
    return ~(digit | upper | lower | continuation)


def spacelike_boundaries(x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions SpaceByte routes, a spacelike byte whose predecessor is not spacelike.

    Position 0 has no predecessor inside the sequence and counts as following a non-spacelike
    byte, so it is routed when it is spacelike (a leading BOS always is). The decision at t reads
    only bytes t-1 and t, so the rule is causal.
    """
    space = is_spacelike(x)
    prev = torch.zeros_like(space)
    prev[:, 1:] = space[:, :-1]
    return space & ~prev
