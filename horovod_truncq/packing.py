"""Dense bit packing in 32-bit words: 32 codes of b bits (1 <= b <= 8) in b int32 words.

Layout: n codes are padded with zero codes to 32 m (m = ceil(n / 32)) and read as 32 rows of m
(code i sits in row i // m, column i % m). Column g, the 32 codes g, m + g, ..., 31 m + g, is a
little-endian bit stream of b words: row k occupies its bits [b k, b k + b), and word j holds bits
[32 j, 32 j + 32). Word j of column g is stored at j m + g, so the packed array is b rows of m words
and every pass reads and writes whole contiguous rows (vectorised on CPU, coalesced on GPU). n codes
take 4 b m bytes: 8 codes of b bits per b bytes. Every intermediate is int32 or uint8; the functions
are plain torch and run eagerly or inside a compiled kernel (kernels.py), on CPU and CUDA alike.
"""
from __future__ import annotations

import functools

import torch

BLOCK = 32  # codes per block; a block of b-bit codes is b words


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int between 1 and 8, got {bits!r}")


def packed_words(numel: int, bits: int) -> int:
    """int32 words taken by `numel` codes of `bits` bits."""
    return bits * -(-numel // BLOCK)


def packed_size(numel: int, bits: int) -> int:
    """Bytes taken by `numel` codes of `bits` bits."""
    return 4 * packed_words(numel, bits)


def _shifted(code: torch.Tensor, shift: int) -> torch.Tensor:
    return code << shift if shift >= 0 else code >> -shift


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2**bits) (any integer dtype) -> int32 words over the last dimension:
    (..., n) -> (..., b m), on the same device."""
    numel = codes.shape[-1]
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, -(-numel // BLOCK) * BLOCK - numel))
    rows = padded.view(*codes.shape[:-1], BLOCK, -1)
    words = []
    for word in range(bits):
        # the rows whose bits overlap this word, each shifted into place (their bits never collide)
        terms = [_shifted(rows[..., k, :], bits * k - 32 * word)
                 for k in range(BLOCK) if -bits < bits * k - 32 * word < 32]
        words.append(functools.reduce(torch.bitwise_or, terms))
    return torch.stack(words, dim=-2).flatten(-2)


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_words` over the last dimension: (..., b m) int32 -> (..., 32, m) int32 codes,
    code i at [..., i // m, i % m].

    Written as one expression over (row k, column g) whose word index and shifts are tensors of k,
    so that a compiled kernel keeps g as its vectorised inner loop and never branches on k."""
    rows = words.view(*words.shape[:-1], bits, -1)
    k = torch.arange(BLOCK, dtype=torch.int32, device=words.device)
    first = (k * bits) // 32
    offset = ((k * bits) % 32).unsqueeze(1)
    if 32 % bits == 0:  # 1, 2, 4 or 8 bits: no code straddles two words
        return (rows[..., first, :] >> offset) & ((1 << bits) - 1)
    low_mask = ((1 << (32 - offset).to(torch.int64)) - 1).to(torch.int32)  # a logical right shift
    low = (rows[..., first, :] >> offset) & low_mask
    second = (first + 1).clamp(max=bits - 1)
    high = torch.where(offset + bits > 32, rows[..., second, :] << (32 - offset).clamp(max=31), 0)
    return (low | high) & ((1 << bits) - 1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor of packed_size bytes."""
    check_bits(bits)
    return pack_words(codes.reshape(-1), bits).view(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes as an int32 tensor."""
    check_bits(bits)
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits "
                         f"(expected {packed_size(numel, bits)})")
    return unpack_words(packed.view(torch.int32), bits).reshape(-1)[:numel]
