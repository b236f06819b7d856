"""Rounding noise from a counter-based hash: uniform(i) is a pure function of the element index i
and a 62-bit stream key.

The key comes from (seed, rank, tensor name, step) through BLAKE2b, so two different tuples never
share a stream (seed s on rank r and seed s + 1 on rank r - 1 draw unrelated noise). The value of an
element depends neither on the order in which tensors are encoded nor on the thread count, so a
seeded run is bit-reproducible. The hash works in int32 arithmetic (wrapping multiply, masked
shifts) that eager torch, inductor's C++ and Triton all compute identically.
"""
from __future__ import annotations

import hashlib
import os

import torch

_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x846CA68B - (1 << 32)  # as a signed int32
_KEY_MASK = (1 << 31) - 1
_UNIFORM_BITS = 24


def stream_key(seed: int, rank: int, name: str, step: int) -> tuple[int, int]:
    """Two 31-bit halves of the key of the stream (seed, rank, name, step)."""
    digest = hashlib.blake2b(f"{seed}\x00{rank}\x00{name}\x00{step}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value & _KEY_MASK, (value >> 32) & _KEY_MASK


def shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits on int32 without sign extension."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, "lowbias32" constants): a bijection on int32."""
    x = x ^ shift_right_logical(x, 16)
    x = x * _MULTIPLIER_1
    x = x ^ shift_right_logical(x, 15)
    x = x * _MULTIPLIER_2
    return x ^ shift_right_logical(x, 16)


def uniform(index: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """float32 uniform in [0, 1) with 24-bit resolution for each int32 element index."""
    hashed = _mix(_mix(index ^ key[0]) ^ key[1])
    return shift_right_logical(hashed, 32 - _UNIFORM_BITS).to(torch.float32) * (1.0 / (1 << _UNIFORM_BITS))


def random_key() -> tuple[int, int]:
    """A fresh key from the operating system's randomness, for encoding without a seed."""
    value = int.from_bytes(os.urandom(8), "little")
    return value & _KEY_MASK, (value >> 32) & _KEY_MASK
