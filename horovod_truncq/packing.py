"""Dense bit packing: n codes of b bits (1 <= b <= 8) in ceil(n * b / 8) bytes.

Layout: a little-endian bit stream. Code i occupies stream bits [b*i, b*i + b), least significant
bit first, so 8 codes of b bits fill exactly b bytes and the last byte is zero-padded. The functions
work on CPU and CUDA tensors alike (vectorised torch, no host round-trip) and are the one place a
faster GPU kernel has to replace.
"""
from __future__ import annotations

import torch


def packed_size(numel: int, bits: int) -> int:
    """Bytes taken by `numel` codes of `bits` bits."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor on the same device."""
    _check_bits(bits)
    codes = codes.reshape(-1)
    numel = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    groups = (numel + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:numel] = codes
    padded = padded.view(groups, 8)
    word = padded[:, 0].clone()
    for k in range(1, 8):
        word |= padded[:, k] << (bits * k)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=1)
    return out.to(torch.uint8).reshape(-1)[: packed_size(numel, bits)]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes as an int64 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits "
                         f"(expected {packed_size(numel, bits)})")
    if bits == 8:
        return packed.to(torch.int64)
    groups = (numel + 7) // 8
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    padded[: packed.numel()] = packed
    padded = padded.view(groups, bits)
    word = padded[:, 0].clone()
    for j in range(1, bits):
        word |= padded[:, j] << (8 * j)
    mask = (1 << bits) - 1
    codes = torch.stack([(word >> (bits * k)) & mask for k in range(8)], dim=1)
    return codes.reshape(-1)[:numel]
