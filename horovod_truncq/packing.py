"""Dense bit packing in 32-bit words: 32 codes of b bits (1 <= b <= 8) in b int32 words.

Layout: n codes are padded with zero codes to 32 m (m = ceil(n / 32)) and cut into blocks of
32 TILE codes, the last block holding the remaining 32 r codes (1 <= r <= TILE). A block of 32 c
codes is read as 32 rows of c (its code i sits in row i // c, column i % c). Column g, the 32 codes
g, c + g, ..., 31 c + g, is a little-endian bit stream of b words: row k occupies its bits
[b k, b k + b), and word j holds bits [32 j, 32 j + 32). Word j of column g is stored at j c + g
within the block's b c words, and the blocks follow each other. Every pass reads and writes whole
contiguous rows of a block (vectorised on CPU, coalesced on GPU), and a block's words, b TILE of
them, stay in the first-level cache while its 32 rows are unpacked. n codes take 4 b m bytes: 8
codes of b bits per b bytes. Every intermediate is int32 or uint8; the functions are plain torch
and run eagerly or inside a compiled kernel (kernels.py), on CPU and CUDA alike.
"""
from __future__ import annotations

from typing import Callable

import torch

BLOCK = 32  # codes per column; a column of b-bit codes is b words
TILE = 64   # columns per block


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int between 1 and 8, got {bits!r}")


def packed_words(numel: int, bits: int) -> int:
    """int32 words taken by `numel` codes of `bits` bits."""
    return bits * -(-numel // BLOCK)


def packed_size(numel: int, bits: int) -> int:
    """Bytes taken by `numel` codes of `bits` bits."""
    return 4 * packed_words(numel, bits)


def _pack_block(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (..., 32, c) -> their b int32 words per column (..., b, c).

    Word j sums the rows k = 32 j // b, ... whose bits overlap it, each shifted into place: their
    bits never collide, so the int32 sum is their bitwise or and never overflows. The rows and
    shifts are tensors of (j, k), so that a compiled kernel is one short loop over them, not an
    unrolled body per word (which took half a minute to compile). Each code is widened to int32
    after the rows are picked: widened first, the compiled pass wrote all the codes out as int32
    before packing them."""
    overlapping = 32 // bits if 32 % bits == 0 else 32 // bits + 2  # most rows that overlap a word
    j = torch.arange(bits, dtype=torch.int32, device=rows.device).view(-1, 1)
    k = (32 * j) // bits + torch.arange(overlapping, dtype=torch.int32, device=rows.device)
    shift = (bits * k - 32 * j).unsqueeze(-1)
    overlaps = (k < BLOCK).unsqueeze(-1) & (shift < 32)
    term = rows[..., k.clamp(max=BLOCK - 1), :].to(torch.int32)
    shifted = torch.where(shift >= 0, term << shift.clamp(min=0), term >> (-shift).clamp(min=0))
    return torch.where(overlaps, shifted, 0).sum(dim=-2, dtype=torch.int32)


def _unpack_block(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_block`: (..., b, c) words -> (..., 32, c) int32 codes.

    Written as one expression over (row k, column g) whose word index and shifts are tensors of k,
    so that a compiled kernel keeps g as its vectorised inner loop and never branches on k."""
    k = torch.arange(BLOCK, dtype=torch.int32, device=words.device)
    first = (k * bits) // 32
    offset = ((k * bits) % 32).unsqueeze(1)
    if 32 % bits == 0:  # 1, 2, 4 or 8 bits: no code straddles two words
        return (words[..., first, :] >> offset) & ((1 << bits) - 1)
    low_mask = ((1 << (32 - offset).to(torch.int64)) - 1).to(torch.int32)  # a logical right shift
    low = (words[..., first, :] >> offset) & low_mask
    second = (first + 1).clamp(max=bits - 1)
    high = torch.where(offset + bits > 32, words[..., second, :] << (32 - offset).clamp(max=31), 0)
    return (low | high) & ((1 << bits) - 1)


def _whole_blocks(columns: int) -> int:
    """Blocks of TILE columns; the last block keeps the 0 to TILE - 1 columns left. Rows of a whole
    number of blocks are then one run of blocks in memory, which a compiled decode writes in place:
    with a last block in each row, it wrote every row into a buffer of its own and copied it
    (docs/quantizers.md, "Speed"). The bytes are the same either way."""
    return columns // TILE


def _split_whole_blocks(tensor: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` entries of the last dimension and the rest. A split rather than two
    slices: torch 2.11 compiles a slice whose end it cannot prove in bounds with an unbacked size,
    which failed to trace ("PendingUnbackedSymbolNotFound") or ran into a NameError."""
    return tensor.split([length, tensor.shape[-1] - length], dim=-1)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2**bits) (any integer dtype) -> int32 words over the last dimension:
    (..., n) -> (..., b m), on the same device. Only the last block holds padding."""
    lead, numel = codes.shape[:-1], codes.shape[-1]
    columns = -(-numel // BLOCK)
    # blocks free of padding; a last block of TILE columns is laid out as a whole one
    full = _whole_blocks(numel // BLOCK) * TILE * BLOCK
    whole, last = _split_whole_blocks(codes, full)
    head = _pack_block(whole.view(*lead, -1, BLOCK, TILE), bits)
    last = torch.nn.functional.pad(last.to(torch.int32), (0, columns * BLOCK - numel))
    rest = _pack_block(last.view(*lead, BLOCK, -1), bits)
    return torch.cat([head.flatten(-3), rest.flatten(-2)], dim=-1)


def map_blocks(words: torch.Tensor, bits: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               total: bool = False) -> torch.Tensor:
    """fn applied to the codes of every block of packed words (..., b m), in code order: (..., 32 m),
    or, when `total`, its sum over the first dimension (32 m,).

    fn(codes, first) gets the int32 codes of the whole blocks, (..., blocks, 32, TILE), and then of
    the last block, (..., 32, r), with `first`, the index of each block row's first code, of shape
    (blocks, 32, 1) and (32, 1), and returns values of the codes' shape. The whole blocks are
    flattened before they are summed, so that a compiled pass writes their sum straight into the
    result; the last block is summed as 32 rows, so that its pass stays vectorised over columns."""
    head, tail = map_block_parts(words, bits, fn)
    head, tail = head.flatten(-3), tail.flatten(-2)
    if total:
        head, tail = head.sum(dim=0), tail.sum(dim=0)
    return torch.cat([head, tail], dim=-1)


def map_block_parts(words: torch.Tensor, bits: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`map_blocks` before its parts are joined: fn of the whole blocks (..., blocks, 32, TILE) and
    of the last block (..., 32, r)."""
    lead, length = words.shape[:-1], words.shape[-1]
    columns = length // bits
    blocks = _whole_blocks(columns)
    rest = columns - blocks * TILE
    row = torch.arange(BLOCK, dtype=torch.int32, device=words.device).view(BLOCK, 1)
    block_start = torch.arange(blocks, dtype=torch.int32, device=words.device).view(-1, 1, 1) * (BLOCK * TILE)
    whole, last = _split_whole_blocks(words, blocks * TILE * bits)
    head = fn(_unpack_block(whole.view(*lead, blocks, bits, TILE), bits), block_start + row * TILE)
    tail = fn(_unpack_block(last.view(*lead, bits, rest), bits), blocks * (BLOCK * TILE) + row * rest)
    return head, tail


def block_part_views(values: torch.Tensor, bits: int, words_per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of `values` (rows, 32 m), the codes of rows of b m packed words, shaped as the two parts
    of `map_block_parts`, for a pass that writes into the caller's memory."""
    columns = words_per_row // bits
    blocks = _whole_blocks(columns)
    whole, last = _split_whole_blocks(values, blocks * TILE * BLOCK)
    rows = values.shape[0]
    return whole.view(rows, blocks, BLOCK, TILE), last.view(rows, BLOCK, columns - blocks * TILE)


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_words` over the last dimension: (..., b m) int32 -> (..., 32 m) int32 codes."""
    return map_blocks(words, bits, lambda codes, first: codes)


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
    return unpack_words(packed.view(torch.int32), bits)[:numel]
