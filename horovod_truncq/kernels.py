"""The codec's passes over gradient memory, compiled with torch.compile where possible.

Encoding a tensor is one statistics pass (`abs_stats` or `bucket_norms`), a few scalar-sized
operations that pick the levels (quantizers.py), one fused rounding pass that reads the gradient
once and writes one uint8 code per element (`round_to_levels`, `round_scaled`) and one packing
pass (packing.pack_words). Decoding W payloads of a tensor is one fused pass (`sum_levels`,
`sum_scaled`) that unpacks, looks every code up in its sender's table and sums in float32.

Each pass is plain torch: inductor turns it into vectorised C++ on CPU and Triton on CUDA, once per
bit width (tensor sizes are dynamic: they do not recompile). Set HOROVOD_TRUNCQ_COMPILE=0 to
run eagerly; where compilation fails (no C++ compiler, no Triton) the eager path takes over with one
logged warning. Both paths compute the same codes bit for bit; the eager path allocates
temporaries of the tensor's size that the compiled one fuses away.
"""
from __future__ import annotations

import logging
import os
import types
from typing import Callable

import torch

from . import noise
from .packing import pack_words, unpack_words

log = logging.getLogger("horovod_truncq")

COMPILE_ENV = "HOROVOD_TRUNCQ_COMPILE"
COMPILE_MIN_ELEMENTS = 1 << 14  # smaller tensors run eagerly: a compiled call's fixed cost is larger
_TINY = torch.finfo(torch.float32).tiny
_SEARCH_BY_COMPARISON = 16      # tables up to this size: compare with every level, no gathers


# ---------------------------------------------------------------- statistics
# Sums accumulate in float64: rounded to float32, they come out the same whatever the summation
# order (thread count, compiled or eager), and so do the levels and norms computed from them.
def abs_stats(x: torch.Tensor) -> torch.Tensor:
    """float64 [max |x|, min |x|, sum |x|, 1 if any NaN/Inf else 0] of a 1-D float32 tensor, with
    non-finite elements read as 0."""
    finite = torch.isfinite(x)
    magnitude = torch.where(finite, x.abs(), 0.0)
    return torch.stack([magnitude.max().double(), magnitude.min().double(), magnitude.sum(dtype=torch.float64),
                        (~finite).any().double()])


def bucket_norms(rows: torch.Tensor) -> torch.Tensor:
    """float32 L2 norm of each row of a 2-D float32 tensor (inf or NaN where the row is not finite)."""
    return rows.double().square().sum(dim=1).sqrt().float()


# ---------------------------------------------------------------- rounding
def _interval(v: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For v within an ascending table: index j of the interval [table[j], table[j+1]] holding v, and
    both ends. Small tables compare v with every level (no gathers); larger ones binary-search."""
    last = table.shape[0] - 1
    if last + 1 <= _SEARCH_BY_COMPARISON:
        index = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
        lo, hi = table[0].expand(v.shape), table[1].expand(v.shape)
        for j in range(1, last):
            above = v >= table[j]
            index = index + above.to(torch.int32)
            lo, hi = torch.where(above, table[j], lo), torch.where(above, table[j + 1], hi)
        return index, lo, hi
    index = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    step = 1 << (last.bit_length() - 1)
    while step:
        candidate = (index + step).clamp(max=last - 1)
        index = torch.where(table[candidate] <= v, candidate, index)
        step >>= 1
    return index, table[index], table[index + 1]


def _round(v: torch.Tensor, table: torch.Tensor, index: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Stochastic rounding of v to `table`: the upper end of its interval with probability
    (v - lo) / (hi - lo), so E[table[code]] = v. `index` numbers the elements for the noise."""
    lower, lo, hi = _interval(v, table)
    up = noise.uniform(index, key) < (v - lo) / (hi - lo).clamp_min(_TINY)
    return (lower + up.to(torch.int32)).to(torch.uint8)


def round_to_levels(x: torch.Tensor, levels: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """uint8 codes of a 1-D tensor clamped to [levels[0], levels[-1]]; element i draws noise at
    index start + i."""
    index = torch.arange(x.shape[0], dtype=torch.int32, device=x.device) + start
    return _round(x.clamp(levels[0], levels[-1]), levels, index, key)


def round_scaled(rows: torch.Tensor, inverse_norms: torch.Tensor, magnitudes: torch.Tensor,
                 key: tuple[int, int], start: int, bits: int) -> torch.Tensor:
    """uint8 codes sign << (bits - 1) | magnitude index for |x| / norm of each row (a bucket)."""
    index = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device).view(rows.shape) + start
    ratio = (rows.abs() * inverse_norms.unsqueeze(1)).clamp(0, 1)
    sign = (rows < 0).to(torch.uint8) << (bits - 1)
    return (_round(ratio, magnitudes, index, key) | sign).view(-1)


# ---------------------------------------------------------------- decoding
def sum_levels(words: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 sum over rows of levels[row][code] for every code of the packed rows: words (W, b m)
    int32, levels (W, L). Returns (32, m) values in packing order, the padding codes included."""
    codes = unpack_words(words, bits)
    offsets = torch.arange(levels.shape[0], dtype=torch.int32, device=words.device).view(-1, 1, 1) * levels.shape[1]
    return levels.reshape(-1)[codes + offsets].sum(dim=0)


def sum_scaled(words: torch.Tensor, norms: torch.Tensor, magnitudes: torch.Tensor, bucket: int,
               bits: int) -> torch.Tensor:
    """float32 sum over rows of ±magnitudes[code] * norm of the code's bucket: norms (W, buckets).
    Returns (32, m) values in packing order; padding codes have zero magnitude."""
    codes = unpack_words(words, bits)
    magnitude = magnitudes[codes & ((1 << (bits - 1)) - 1)]
    signed = torch.where(codes >> (bits - 1) > 0, -magnitude, magnitude)
    rows, columns = codes.shape[-2:]
    index = torch.arange(rows, dtype=torch.int32, device=words.device).unsqueeze(1) * columns + \
        torch.arange(columns, dtype=torch.int32, device=words.device)
    bucket_of = (index // bucket).clamp(max=norms.shape[1] - 1)
    return (signed * norms[:, bucket_of]).sum(dim=0)


# ---------------------------------------------------------------- compile or run eagerly
_compile_failed = False


def compiling_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1") != "0" and not _compile_failed


class Kernel:
    """A pass that runs compiled for tensors of at least COMPILE_MIN_ELEMENTS elements, eagerly
    otherwise. Keyword arguments are static (bit width, bucket size): each combination compiles once,
    with the dimensions of the first tensor argument dynamic. Every index a pass computes is in range
    by construction (codes are masked to their table's size), so inductor's bounds asserts are off."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._compiled: dict[tuple, Callable[..., torch.Tensor]] = {}

    def _compile(self, static: dict) -> Callable[..., torch.Tensor]:
        fn = self.fn

        def bound(*args):
            return fn(*args, **static)

        # Dynamo caches compiled graphs per code object: a code object of its own per pass and static
        # arguments keeps them from evicting each other.
        name = "_".join([fn.__name__, *(f"{key}{value}" for key, value in sorted(static.items()))])
        code = bound.__code__.replace(co_name=name)
        return torch.compile(types.FunctionType(code, bound.__globals__, name, None, bound.__closure__),
                             options={"assert_indirect_indexing": False})

    def __call__(self, numel: int, *args, **static) -> torch.Tensor:
        global _compile_failed
        if numel >= COMPILE_MIN_ELEMENTS and compiling_enabled():
            key = tuple(sorted(static.items()))
            compiled = self._compiled.get(key) or self._compiled.setdefault(key, self._compile(static))
            for dim in range(args[0].dim()):
                torch._dynamo.maybe_mark_dynamic(args[0], dim)
            try:
                return compiled(*args)
            except Exception as error:  # no compiler, no Triton, or an inductor failure
                _compile_failed = True
                log.warning("horovod_truncq: torch.compile failed (%s: %s); the codec runs eagerly from now on "
                            "(slower, same results)", type(error).__name__, str(error).splitlines()[0][:200])
        return self.fn(*args, **static)


abs_stats_kernel = Kernel(abs_stats)
bucket_norms_kernel = Kernel(bucket_norms)
round_to_levels_kernel = Kernel(round_to_levels)
round_scaled_kernel = Kernel(round_scaled)
pack_kernel = Kernel(pack_words)
sum_levels_kernel = Kernel(sum_levels)
sum_scaled_kernel = Kernel(sum_scaled)
