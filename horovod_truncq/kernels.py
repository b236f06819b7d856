"""The codec's passes over gradient memory, compiled with torch.compile where possible.

Encoding a tensor is one statistics pass (`abs_stats` or `bucket_norms`), a few scalar-sized
operations that pick the levels (quantizers.py), one fused rounding pass that reads the gradient
once and writes one uint8 code per element (`round_to_levels`, `round_scaled`) and one packing
pass that writes the words into the payload (`pack_into`). Decoding W payloads of a tensor is one
fused pass per packing block (`sum_levels`, `sum_scaled`) that unpacks, finds every code's level in
its sender's table and sums in float32; the `dequantize_*` passes keep the W rows apart instead.
Every pass works on a batch of rows (chunks of one flat gradient, each with its own levels or norms).

Finding intervals and levels without gathers, which inductor's CPU code does one lane at a time:
rounding compares |g| with the upper half of the (antisymmetric) levels only; at 8 bits it computes
the code where the levels have at most two spacings (TUQSGD, TBQSGD, QSGD), reads it off the float's
bits (NQSGD) or searches near a closed-form guess (TNQSGD, Laplace model). Decoding reads tables of
up to 16 levels with selects, computes uniform (TUQSGD, QSGD) and power-of-two (NQSGD) levels, and
gathers from 256-level tables (TNQSGD, TBQSGD at 8 bits) in scalar code (`_gathers_byte_codes`).

Each pass is plain torch: inductor turns it into vectorised C++ on CPU and Triton on CUDA, once per
bit width (compiling.py: tensor sizes are dynamic and do not recompile). Both paths compute the same
codes bit for bit; the eager path allocates temporaries of the tensor's size that the compiled one
fuses away.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import levels as lv
from . import noise
from .compiling import Kernel
from .packing import TILE, map_block_parts, map_blocks, pack_words
from .tails import TAILS

_TINY = torch.finfo(torch.float32).tiny
_SEARCH_BY_COMPARISON = 16      # tables up to this size: compare with every level, no gathers
_SEARCH_UP_TO = 9               # tables up to this size are searched even where arithmetic could round: faster


# ---------------------------------------------------------------- statistics
# Sums accumulate in float64: rounded to float32, they come out the same whatever the summation
# order (thread count, compiled or eager), and so do the levels and norms computed from them.
def abs_stats(x: torch.Tensor) -> torch.Tensor:
    """float64 (rows, 4): max |x|, min |x|, sum |x| and 1 if any NaN/Inf else 0, for each row of a
    (rows, n) float32 tensor. A row holding NaN or Inf has a non-finite sum (a float64 sum of float32
    magnitudes cannot overflow), which flags it; its other statistics are then meaningless, and the
    payload is flagged rather than decoded."""
    magnitude = x.abs()
    total = magnitude.sum(dim=-1, dtype=torch.float64)
    return torch.stack([magnitude.amax(dim=-1).double(), magnitude.amin(dim=-1).double(), total,
                        (~torch.isfinite(total)).double()], dim=-1)


def bucket_norms(buckets: torch.Tensor) -> torch.Tensor:
    """float32 L2 norm over the last dimension (inf or NaN where a bucket is not finite)."""
    return buckets.double().square().sum(dim=-1).sqrt().float()


# ---------------------------------------------------------------- rounding
def _interval(v: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For v within an ascending table: index j of the interval [table[j], table[j+1]] holding v, as
    float32, and both ends. `table` is (L,), shared by all of v, or (rows, L), one per row of v. Small
    tables compare v with every level (selects, no gathers); larger ones binary-search. The index
    stays float32 because inductor's CPU code converts floats to uint8 cheaply and masks or int32
    to uint8 slowly."""
    size, rows = table.shape[-1], (table.shape[0] if table.dim() > 1 else 1)
    if table.dim() > 1:
        table = table.view(rows, *[1] * (v.dim() - 1), size)
    if size <= _SEARCH_BY_COMPARISON:
        index = torch.zeros_like(v)
        lo, hi = table[..., 0].expand(v.shape), table[..., 1].expand(v.shape)
        for j in range(1, size - 1):
            above = v >= table[..., j]
            index = torch.where(above, float(j), index)
            lo, hi = torch.where(above, table[..., j], lo), torch.where(above, table[..., j + 1], hi)
        return index, lo, hi
    flat = table.reshape(-1)
    row = torch.arange(rows, dtype=torch.int32, device=v.device).view(-1, *[1] * (v.dim() - 1)) * size if rows > 1 else 0
    index = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    step = 1 << (size - 1).bit_length() - 1
    while step:
        candidate = (index + step).clamp(max=size - 2)
        index = torch.where(flat[candidate + row] <= v, candidate, index)
        step >>= 1
    return index.float(), flat[index + row], flat[index + 1 + row]


def _interval_near(v: torch.Tensor, table: torch.Tensor, position: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_interval` for v (rows, n) in a table (rows, L), given each v's fractional position in it to
    within half an interval: the entry nearest that position is the one boundary in doubt, so one
    gather reads it and a second reads the entry on v's side of it (a binary search gathers twice
    per halving). Indices stay float32 until they index: inductor's CPU code handles int64 vectors
    slowly. Non-finite positions (rows flagged NaN) stay in range."""
    size = table.shape[-1]
    nearest = torch.floor(torch.where(position > 0, position + 0.5, 0.0).clamp(max=size - 1))  # NaN to 0
    middle = table.gather(-1, nearest.to(torch.int64))
    lower = torch.where(v >= middle, nearest, nearest - 1).clamp(0, size - 2)
    from_middle = lower == nearest
    other = table.gather(-1, torch.where(from_middle, nearest + 1, nearest - 1).to(torch.int64))
    return lower, torch.where(from_middle, middle, other), torch.where(from_middle, other, middle)


def _noise(v: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """The rounding noise of each element of v: element i (row-major) draws index start + i."""
    index = torch.arange(v.numel(), dtype=torch.int32, device=v.device).view(v.shape) + start
    return noise.uniform(index, key)


def _round(v: torch.Tensor, table: torch.Tensor, key: tuple[int, int], start: int,
           stochastic: bool = True, position: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Codes (float32 integers) of stochastic rounding of v to `table`: the upper end of its interval with
    probability (v - lo) / (hi - lo), so E[table[code]] = v, with `_noise`. Not `stochastic`: the
    nearer end (the lower one on a tie). `position`: v's fractional position in the table to within
    half an interval (`_interval_near`), instead of a search."""
    lower, lo, hi = _interval(v, table) if position is None else _interval_near(v, table, position)
    if stochastic:
        up = _noise(v, key, start) * (hi - lo) < v - lo  # u < (v - lo) / (hi - lo), without a division
    else:
        up = v > (lo + hi) * 0.5
    return torch.where(up, lower + 1.0, lower)


def _round_two_steps(v: torch.Tensor, table: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """Codes (float32 integers) of stochastic rounding of v in [table[0], table[-1]] to an ascending
    table that is equally spaced up to some entry and equally spaced by another step from there on
    (TBQSGD's upper half: fine, then coarse; a single step for TUQSGD and QSGD), without a search.

    Each grid, extended over the whole range, gives v a fractional position p, affine in v; where
    v lies on the other grid, the one with the larger step gives the smaller position. So p is the
    smaller of the two when the first step is the smaller (the larger otherwise), and floor(p + u)
    is the upper neighbour with probability frac(p). v at the last entry gets the top code exactly.
    table is (L,) or (rows, L) with one row per row of v."""
    top = table.shape[-1] - 1
    if table.dim() > 1:
        table = table.view(table.shape[0], *[1] * (v.dim() - 1), table.shape[-1])
    first, last = table[..., 0], table[..., -1]
    inner, outer = table[..., 1] - first, last - table[..., -2]
    # 1 / step in float64, then rounded to float32: the IEEE float32 quotient on every device (a
    # float64 quotient rounds twice harmlessly), where Triton's float32 `/` is approximate
    from_first = torch.where(inner > 0, (v - first) * (1 / inner.double()).float(), float("inf"))
    from_last = torch.where(outer > 0, top - (last - v) * (1 / outer.double()).float(), float("-inf"))
    position = torch.where(inner <= outer, torch.minimum(from_first, from_last), torch.maximum(from_first, from_last))
    code = torch.floor(position + _noise(v, key, start)).clamp(0, top)
    return torch.where(v >= last, float(top), code)


def _round_powers_of_two(ratio: torch.Tensor, count: int, key: tuple[int, int], start: int) -> torch.Tensor:
    """Codes (float32 integers) of stochastic rounding of ratio in [0, 1] to the magnitudes
    {0, 2^-(count-2), ..., 1/2, 1} (NQSGD), read off the float32 bits instead of searched for.

    A ratio of at least 2^-(count-2) >= 2^-126 is a normal float 2^e (1 + f): it lies in
    [2^e, 2^(e+1)], interval e + count - 1, and goes up with probability f, its 23 mantissa bits
    (exactly (ratio - lo) / (hi - lo)); smaller ratios lie in [0, 2^-(count-2)] and go up with
    probability ratio * 2^(count-2), computed exactly. The codes are those of `_round`."""
    below = ratio < 2.0 ** -(count - 2)
    bits = ratio.view(torch.int32)
    fraction = torch.where(below, ratio * 2.0 ** (count - 2), (bits & 0x7FFFFF).float() * 2.0 ** -23)
    lower = torch.where(below, 0.0, ((bits >> 23) - (127 - (count - 1))).float())
    return torch.where(_noise(ratio, key, start) < fraction, lower + 1.0, lower)


def searched_near_a_guess(levels: int) -> bool:
    """Whether `round_to_levels` uses a companding guess for this many levels (the upper half is
    too large to compare with every level), rather than ignoring it."""
    return levels // 2 + 1 > _SEARCH_BY_COMPARISON


def round_to_levels(x: torch.Tensor, levels: torch.Tensor, key: tuple[int, int], start: int,
                    companding: Optional[torch.Tensor] = None, stochastic: bool = True,
                    rule: str = "search") -> torch.Tensor:
    """uint8 codes of each row of x (rows, n), clamped to [first, last] of its row of levels (rows, L).

    The levels are antisymmetric (levels.py), so |x| is rounded on the upper half, preceded by the
    largest negative level (the interval that straddles zero): [-m0, m0, m1, ..., a], L/2 + 1 entries
    and half the comparisons. The sign then mirrors the code. `rule` "two_steps": levels of at most two
    spacings, rounded arithmetically (`_round_two_steps`; stochastic rounding of more than
    _SEARCH_UP_TO entries only); else "search". `companding` (rows, 2), [k0, k1]: levels whose
    upper-half index is about (exp(k0 |x|) - 1) k1 + 1/2 (TNQSGD under the Laplace model), searched
    near that guess (`_interval_near`) when the table is too large to compare with every level."""
    half = levels.shape[-1] // 2
    upper = levels[:, half - 1:]
    magnitude = x.abs().clamp(max=levels[:, -1:])
    if rule == "two_steps" and stochastic and upper.shape[-1] > _SEARCH_UP_TO:
        index = _round_two_steps(magnitude, upper, key, start)
    elif companding is not None and searched_near_a_guess(levels.shape[-1]):
        position = (torch.exp(magnitude * companding[:, :1]) - 1) * companding[:, 1:] + 0.5
        index = _round(magnitude, upper, key, start, stochastic, position)
    else:
        index = _round(magnitude, upper, key, start, stochastic)
    return torch.where(x < 0, half - index, index + (half - 1)).to(torch.uint8)


def round_scaled(buckets: torch.Tensor, inverse_norms: torch.Tensor, magnitudes: torch.Tensor,
                 key: tuple[int, int], start: int, bits: int, rule: str = "search") -> torch.Tensor:
    """uint8 codes sign << (bits - 1) | magnitude index for |x| / norm of each bucket: buckets
    (..., bucket), inverse_norms (...), magnitudes (L,) ascending from 0 to 1. `rule` says how the
    interval is found: "two_steps" (equally spaced: arithmetic above _SEARCH_UP_TO levels),
    "powers_of_two" (NQSGD's magnitudes: from the float's bits) or "search"."""
    ratio = (buckets.abs() * inverse_norms.unsqueeze(-1)).clamp(0, 1)
    sign = torch.where(buckets < 0, float(1 << (bits - 1)), 0.0)
    if rule == "two_steps" and magnitudes.shape[-1] > _SEARCH_UP_TO:
        index = _round_two_steps(ratio, magnitudes, key, start)
    elif rule == "powers_of_two":
        index = _round_powers_of_two(ratio, magnitudes.shape[-1], key, start)
    else:
        index = _round(ratio, magnitudes, key, start)
    return (index + sign).to(torch.uint8)


def pack_into(codes: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """packing.pack_words of codes (rows, n) written into `out` (rows, b m), the code section of the
    payloads: the compiled pass stores the words in place, with no intermediate and no copy."""
    out.copy_(pack_words(codes, bits))


# ---------------------------------------------------------------- decoding
def _lookup(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[code] for int32 codes (rows, ...), table (L,) or (rows, L). Tables of up to 16 levels
    are read by a tree of selects on the code's bits (inductor's CPU code gathers one lane at a time);
    larger ones are gathered."""
    size = table.shape[-1]
    if size > _SEARCH_BY_COMPARISON:
        rows = table.shape[0] if table.dim() > 1 else 1
        source = table.reshape(rows, *[1] * (codes.dim() - 2), size).expand(*codes.shape[:-1], size)
        return torch.gather(source, -1, codes.long().expand(*source.shape[:-1], codes.shape[-1]))
    if table.dim() > 1:
        table = table.view(table.shape[0], *[1] * (codes.dim() - 1), size)
    values, bit = [table[..., j] for j in range(size)], 0
    while len(values) > 1:
        is_set = (codes & (1 << bit)) != 0
        values = [torch.where(is_set, high, low) for low, high in zip(values[::2], values[1::2])]
        bit += 1
    return values[0].expand(codes.shape)


def _per_row(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """values (rows,) shaped to broadcast over codes (rows, ...)."""
    return values.view(-1, *[1] * (codes.dim() - 1))


def grid_values(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """levels[row][code] for uniform levels (levels.uniform_levels), computed rather than looked up:
    (2 code - s) h clamped to [-a, a], with h the level just above zero and a the last. The same
    rounded product as the level itself, so the same float, in a few operations per code."""
    half, end = levels.shape[-1] // 2, _per_row(levels[:, -1], codes)
    value = (2 * codes - (levels.shape[-1] - 1)).float() * _per_row(levels[:, half], codes)
    return torch.minimum(torch.maximum(value, -end), end)


def _level_values(codes: torch.Tensor, levels: torch.Tensor, grid: str) -> torch.Tensor:
    return grid_values(codes, levels) if grid == "uniform" else _lookup(codes, levels)


def _write_head(head: torch.Tensor, words: torch.Tensor, bits: int, fn) -> torch.Tensor:
    """map_blocks of fn over words (rows, b m) with its whole blocks stored into `head` and its last
    block returned (packing.block_part_views names both parts of the caller's buffer). Given the
    joined result, inductor computed it into two new buffers of its own; given two views of one
    buffer, it guarded on that buffer's size. Where several rows' heads are not contiguous it still
    computes into one new buffer and copies (docs/quantizers.md, "Speed")."""
    values_head, values_tail = map_block_parts(words, bits, fn)
    head.copy_(values_head)
    return values_tail


def dequantize_levels(head: torch.Tensor, words: torch.Tensor, levels: torch.Tensor, bits: int,
                      grid: str = "table") -> torch.Tensor:
    """float32 levels[row][code] for every code of each row of packed words (rows, b m), levels
    (rows, L), each row in code order, padding codes included: the whole blocks written into `head`
    and the last block returned (`_write_head`) for the caller to copy in. The caller keeps the buffer
    from step to step (a new large tensor on the CPU costs a page fault per 4 kB page). `grid`
    "uniform": levels made by levels.uniform_levels, computed by `grid_values` instead of looked up."""
    return _write_head(head, words, bits, lambda codes, first: _level_values(codes, levels, grid))


def sum_levels(words: torch.Tensor, levels: torch.Tensor, bits: int, grid: str = "table") -> torch.Tensor:
    """The float32 sum over rows of `dequantize_levels`: (32 m,)."""
    return map_blocks(words, bits, lambda codes, first: _level_values(codes, levels, grid), total=True)


def _magnitude_values(index: torch.Tensor, magnitudes: torch.Tensor, grid: str) -> torch.Tensor:
    """magnitudes[index], computed where the magnitudes have a closed form: "uniform", j h clamped to
    1 (QSGD's, quantizers._magnitudes), or "powers_of_two", 0 then 2^(j - L + 1) (NQSGD's, built from
    the exponent bits); else ("table") looked up. The computed floats are the table's. On CUDA the
    powers of two are looked up too: a GPU gathers from a small table cheaply, and inductor's Triton
    code can widen the integer codes to 64 bits, which a bitcast to float32 then refuses."""
    if grid == "uniform":
        return torch.minimum(index.float() * magnitudes[1], magnitudes[-1])
    if grid == "powers_of_two" and index.device.type == "cpu":
        power = ((index + (127 - (magnitudes.shape[-1] - 1))) << 23).view(torch.float32)
        return torch.where(index > 0, power, 0.0)
    return _lookup(index, magnitudes)


def _scaled(codes: torch.Tensor, first: torch.Tensor, norms: torch.Tensor, magnitudes: torch.Tensor,
            bucket: int, bits: int, grid: str) -> torch.Tensor:
    """±magnitudes[code] * norm of the code's bucket for the codes of one block (see map_blocks).
    `bucket` 0: one norm per row, whatever its length (a static 0 rather than the row length, so
    that a new tensor size does not compile again)."""
    magnitude = _magnitude_values(codes & ((1 << (bits - 1)) - 1), magnitudes, grid)
    signed = torch.where(codes >> (bits - 1) > 0, -magnitude, magnitude)
    if bucket == 0:
        return signed * norms.view(-1, *[1] * (codes.dim() - 1))
    buckets = norms.shape[1]
    index = first
    if buckets > 1 and not (first.dim() == 3 and bucket % TILE == 0):
        # a whole block's row lies in one bucket when the bucket size is a multiple of TILE; else per code
        index = first + torch.arange(codes.shape[-1], dtype=torch.int32, device=codes.device)
    # i // bucket without int32 division (not vectorised on CPU): (i + 0.5) / bucket lies 0.5 / bucket
    # from an integer, and float64 rounds it by less than i * 2^-53 / bucket, so its floor is exact
    quotient = torch.floor((index.double() + 0.5) / bucket).to(torch.int32).clamp(max=buckets - 1)
    sender = torch.arange(norms.shape[0], dtype=torch.int32, device=codes.device) * buckets
    return signed * norms.reshape(-1)[quotient + sender.view(-1, *[1] * quotient.dim())]


def dequantize_scaled(head: torch.Tensor, words: torch.Tensor, norms: torch.Tensor, magnitudes: torch.Tensor,
                      bucket: int, bits: int, grid: str = "table") -> torch.Tensor:
    """float32 ±magnitudes[code] * norm of the code's bucket for each row of packed words (rows, b m),
    norms (rows, buckets), written and returned as `dequantize_levels` does; padding codes have zero
    magnitude."""
    return _write_head(head, words, bits,
                       lambda codes, first: _scaled(codes, first, norms, magnitudes, bucket, bits, grid))


def sum_scaled(words: torch.Tensor, norms: torch.Tensor, magnitudes: torch.Tensor, bucket: int,
               bits: int, grid: str = "table") -> torch.Tensor:
    """The float32 sum over rows of `dequantize_scaled`: (32 m,)."""
    return map_blocks(words, bits,
                      lambda codes, first: _scaled(codes, first, norms, magnitudes, bucket, bits, grid),
                      total=True)


# ---------------------------------------------------------------- threshold search
def biscaled_search(params: torch.Tensor, amax: torch.Tensor, tail: str, s: int) -> torch.Tensor:
    """TBQSGD's [a, c, s1] per row (levels.biscaled_threshold) under the tail model named `tail`.
    Run eagerly, its 4 rounds over a 64 x 64 grid are some 450 small operations, each a kernel launch
    on CUDA; compiled, they are a few loops (docs/quantizers.md, "Speed"). It works in float64, where
    the compiled search gave the eager one's thresholds bit for bit."""
    return lv.biscaled_threshold(TAILS[tail], params, amax, s)


def _gathers_byte_codes(static: dict) -> bool:
    """Level passes of 8-bit codes in 256-level tables: a gather per code is the whole pass.
    Inductor's vectorised CPU code gathers through a stack buffer (indices stored, 16 scalar loads,
    values reloaded); its scalar code loads each level directly and, codes being whole bytes, unpacks
    them in two operations: a sixth to a third less time (docs/quantizers.md, "Speed"). At 5 and 6
    bits, whose codes straddle words, the vectorised pass was faster. CUDA code is unaffected."""
    return static["bits"] == 8 and static.get("grid", "table") == "table"


# dynamic_args: how many leading tensor arguments vary in every dimension with the tensor size; in
# the scaled passes the norms (one per bucket) are among them
abs_stats_kernel = Kernel(abs_stats)
bucket_norms_kernel = Kernel(bucket_norms)
round_to_levels_kernel = Kernel(round_to_levels)
round_scaled_kernel = Kernel(round_scaled, dynamic_args=2)
pack_kernel = Kernel(pack_into, dynamic_args=2)
dequantize_levels_kernel = Kernel(dequantize_levels, fuse_reads=True, scalar_when=_gathers_byte_codes, dynamic_args=2)
sum_levels_kernel = Kernel(sum_levels, fuse_reads=True, scalar_when=_gathers_byte_codes)
dequantize_scaled_kernel = Kernel(dequantize_scaled, fuse_reads=True, dynamic_args=3)
sum_scaled_kernel = Kernel(sum_scaled, fuse_reads=True, dynamic_args=2)
biscaled_search_kernel = Kernel(biscaled_search, min_elements=0)  # cheaper compiled at any tensor size
