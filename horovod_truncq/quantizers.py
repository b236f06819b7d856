"""The quantizers: truncated TUQSGD, TNQSGD, TBQSGD and the QSGD and NQSGD baselines.

Each turns a gradient into one self-describing uint8 payload (wire.py) and back. A truncated scheme
clamps every coordinate to [-a, a] and rounds it stochastically to one of s + 1 = 2^bits levels, so
the decoded value is unbiased for the truncated one. The baselines scale by the L2 norm and spend one
bit on the sign. Encoding runs on the gradient's device with no host round-trip; decoding reads the
header on the host once to validate it.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from . import levels as lv
from . import packing, wire
from .tails import TAILS, TAILS_BY_ID

if TYPE_CHECKING:
    from .compressor import ExchangeCompressor

log = logging.getLogger("horovod_truncq")

Shape = Union[torch.Size, Sequence[int]]


def stochastic_round(x: torch.Tensor, grid: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Index of the level each x rounds to: the upper neighbour with probability (x - lo) / (hi - lo).

    `grid` is ascending (ties allowed), x lies in [grid[0], grid[-1]] and noise is uniform in [0, 1),
    so E[grid[index]] = x.
    """
    lower = torch.searchsorted(grid, x, right=True, out_int32=True).sub_(1).clamp_(0, grid.numel() - 2)
    lo = grid.index_select(0, lower)
    width = grid.index_select(0, lower + 1).sub_(lo).clamp_min_(torch.finfo(torch.float32).tiny)
    return lower.add_(noise < (x - lo).div_(width))


def stochastic_round_uniform(scaled: torch.Tensor, intervals: int, noise: torch.Tensor) -> torch.Tensor:
    """stochastic_round for the grid 0, 1, ..., intervals, by arithmetic: `scaled` lies in [0, intervals]."""
    lower = scaled.floor().clamp_(0, intervals - 1)
    return lower.add_(noise < scaled - lower).to(torch.int32)


@functools.lru_cache(maxsize=4096)
def _device_header(scheme_id: int, bits: int, tail_id: int, numel: int, device: torch.device) -> torch.Tensor:
    """The fixed header on `device`, copied from the host once per tensor size instead of per call
    (a copy from pageable host memory would synchronise a CUDA stream)."""
    return torch.tensor(list(wire.header_bytes(scheme_id, bits, tail_id, numel)), dtype=torch.uint8, device=device)


class Quantizer:
    """Base class: payload framing, rounding noise, non-finite and degenerate input, Compressor API.

    Subclasses set `scheme`, `scheme_id`, `min_bits` and implement `_side_info_count`,
    `_quantize` (float32 1-D input without NaN/Inf -> codes and float32 side information) and
    `_dequantize` (codes and side information -> float32 values).
    """

    scheme = "base"
    scheme_id = 0
    min_bits = 1
    tail_id = 0

    def __init__(self, bits: int = 4, seed: Optional[int] = None) -> None:
        if not isinstance(bits, int) or not self.min_bits <= bits <= 8:
            raise ValueError(f"{type(self).__name__} takes bits from {self.min_bits} to 8, got {bits!r}")
        self.bits = bits
        self.seed = seed
        self._base_seed = seed if seed is not None else int.from_bytes(os.urandom(7), "little")
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned_nonfinite = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}{self._repr_extra()})"

    def _repr_extra(self) -> str:
        return ""

    # ---------------------------------------------------------------- sizes
    def _side_info_count(self, numel: int) -> int:
        raise NotImplementedError

    def payload_size(self, numel: int) -> int:
        """Bytes of the payload for a tensor of `numel` elements, without encoding it."""
        return wire.HEADER_BYTES + 4 * self._side_info_count(numel) + packing.packed_size(numel, self.bits)

    # ---------------------------------------------------------------- randomness
    def reseed(self, seed: int) -> None:
        """Restart the rounding noise from `seed` on every device."""
        self.seed = self._base_seed = seed
        self._generators = {}

    def _noise(self, numel: int, device: torch.device) -> torch.Tensor:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._base_seed)
            self._generators[device] = generator
        return torch.rand(numel, generator=generator, device=device)

    # ---------------------------------------------------------------- scheme hooks
    def _quantize(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _dequantize(self, codes: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- public API
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """The 1-D uint8 payload for `tensor`, on its device: exactly the bytes that travel."""
        if not torch.is_floating_point(tensor):
            raise TypeError(f"{type(self).__name__}.encode takes floating-point tensors, got {tensor.dtype}")
        x = tensor.detach().reshape(-1).to(torch.float32)
        numel = x.numel()
        header = _device_header(self.scheme_id, self.bits, self.tail_id, numel, x.device).clone()
        if numel == 0:
            side = torch.zeros(self._side_info_count(0), dtype=torch.float32, device=x.device)
            return torch.cat([header, wire.side_info_to_bytes(side)])
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros_like(x))
        codes, side = self._quantize(x, self._noise(numel, x.device))
        # Finite input can still overflow float32 side information (a norm or mean of huge values):
        # that is flagged like NaN/Inf input, and the stored side information stays finite.
        side_finite = torch.isfinite(side)
        header[6] = (~finite.all() | ~side_finite.all()).to(torch.uint8) * wire.FLAG_NONFINITE
        side = torch.where(side_finite, side, torch.zeros_like(side))
        return torch.cat([header, wire.side_info_to_bytes(side), packing.pack(codes, self.bits)])

    def decode(self, payload: torch.Tensor, shape: Shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized tensor of `shape` and `dtype` on the payload's device.

        Raises ValueError when the payload was not made by this scheme and bit width for a tensor
        of this many elements, or is truncated or corrupted.
        """
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
        numel = math.prod(shape)
        head = wire.parse_header(bytes(payload[: wire.HEADER_BYTES].tolist()))
        if (head.scheme, head.bits, head.tail, head.numel) != (self.scheme_id, self.bits, self.tail_id, numel):
            raise ValueError(f"payload does not match {self!r} for {numel} elements: it holds "
                             f"{_describe(head.scheme, head.bits, head.tail)} for {head.numel} elements")
        if payload.numel() != self.payload_size(numel):
            raise ValueError(f"payload has {payload.numel()} bytes, expected {self.payload_size(numel)} for "
                             f"{numel} elements: truncated or padded")
        side_end = wire.HEADER_BYTES + 4 * self._side_info_count(numel)
        side = wire.side_info_from_bytes(payload[wire.HEADER_BYTES:side_end])
        if numel and not bool(torch.isfinite(side).all()):
            raise ValueError("payload side information is not finite: corrupted payload")
        if numel == 0:
            return torch.zeros(shape, dtype=dtype, device=payload.device)
        values = self._dequantize(packing.unpack(payload[side_end:], self.bits, numel), side)
        if head.flags & wire.FLAG_NONFINITE:
            if not self._warned_nonfinite:
                log.warning("%r: gradient held NaN or Inf, or overflowed float32 in its norm or mean; the "
                            "decoded tensor is all NaN so that a loss-scaling optimizer skips the step "
                            "(further occurrences not logged)", self)
                self._warned_nonfinite = True
            values = torch.full_like(values, float("nan"))
        return values.reshape(shape).to(dtype)

    # Horovod's Compressor interface for a local round trip (the exchange in exchange.py routes the
    # payload through allgather instead).
    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(payload, ctx); non-floating tensors pass through unchanged, as in Horovod's fp16."""
        if not torch.is_floating_point(tensor):
            return tensor, (None, None)
        return self.encode(tensor), (tensor.shape, tensor.dtype)

    def decompress(self, tensor: torch.Tensor, ctx: tuple) -> torch.Tensor:
        shape, dtype = ctx
        if shape is None:
            return tensor
        return self.decode(tensor, shape, dtype)

    def bind(self, named_parameters, **options) -> "ExchangeCompressor":
        """The `compression=` object for hvd.DistributedOptimizer (options: see ExchangeCompressor)."""
        from .compressor import ExchangeCompressor
        return ExchangeCompressor(self, named_parameters, **options)


class _Truncated(Quantizer):
    """Shared by the truncated schemes: fit the tail model, choose a, build levels, round."""

    default_tail = "laplace"

    def __init__(self, bits: int = 4, tail: Optional[str] = None, seed: Optional[int] = None) -> None:
        super().__init__(bits, seed)
        tail = tail or self.default_tail
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {sorted(TAILS)}, got {tail!r}")
        self.tail = TAILS[tail]
        self.tail_id = self.tail.id
        self.s = 2 ** bits - 1  # intervals between the 2^bits levels

    def _repr_extra(self) -> str:
        return f", tail={self.tail.name!r}"

    def _extra_count(self) -> int:
        return 0

    def _side_info_count(self, numel: int) -> int:
        return 1 + self._extra_count() + self.tail.num_params

    def _choose(self, params: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """[a, extras...] in float64 for the fitted params."""
        raise NotImplementedError

    def _levels(self, side: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _side_info(self, x: torch.Tensor) -> torch.Tensor:
        """[a, extras..., tail parameters] as float32 for a finite 1-D float32 tensor."""
        absx = x.abs()
        amax, amin = absx.max(), absx.min()
        params = self.tail.fit(absx)
        choice = self._choose(params.double(), amax.double()).float()
        # With every magnitude equal (constant or one-element tensors) a = max|g| is exact; a never
        # exceeds max|g| (the levels' own clamps keep any inner scale c below a), and all-zero input
        # gives a = 0 and exact zeros.
        a = torch.where(amax == amin, amax, torch.minimum(choice[0], amax))
        return torch.cat([a.reshape(1), choice[1:], params.float()])

    def _quantize(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = self._side_info(x)
        return self._round(torch.clamp(x, -side[0], side[0]), side, noise), side

    def _round(self, x: torch.Tensor, side: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return stochastic_round(x, self._levels(side), noise)

    def _dequantize(self, codes: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self._levels(side).index_select(0, codes)

    def threshold(self, tensor: torch.Tensor) -> float:
        """The truncation threshold a this quantizer picks for a finite, non-empty `tensor`."""
        return float(self._side_info(tensor.detach().reshape(-1).float())[0])

    def levels(self, tensor: torch.Tensor) -> torch.Tensor:
        """The s + 1 levels this quantizer picks for a finite, non-empty `tensor`."""
        return self._levels(self._side_info(tensor.detach().reshape(-1).float()))


class TUQSGD(_Truncated):
    """Truncated uniform quantization: s + 1 equally spaced levels on [-a, a].

    Side information: [a, tail parameters].
    """

    scheme = "tuqsgd"
    scheme_id = 1

    def _choose(self, params: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return lv.uniform_threshold(self.tail, params, amax, self.s).reshape(1)

    def _levels(self, side: torch.Tensor) -> torch.Tensor:
        return lv.uniform_levels(side[0], self.s)

    def _round(self, x: torch.Tensor, side: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = side[0]
        per_level = torch.where(a > 0, self.s / (2 * a), torch.zeros_like(a))
        return stochastic_round_uniform((x + a).mul_(per_level), self.s, noise)


class TNQSGD(_Truncated):
    """Truncated non-uniform quantization: level density proportional to p^(1/3) on [-a, a].

    Side information: [a, tail parameters].
    """

    scheme = "tnqsgd"
    scheme_id = 2

    def _choose(self, params: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return lv.nonuniform_threshold(self.tail, params, amax, self.s).reshape(1)

    def _levels(self, side: torch.Tensor) -> torch.Tensor:
        return lv.nonuniform_levels(self.tail, side[1:], side[0], self.s)


class TBQSGD(_Truncated):
    """Truncated bi-scaled quantization: a fine uniform grid on [-c, c], a coarse one out to a.

    Side information: [a, c, s1, tail parameters]; s1 fine intervals, s - s1 coarse ones.
    """

    scheme = "tbqsgd"
    scheme_id = 3
    min_bits = 2

    def _extra_count(self) -> int:
        return 2

    def _choose(self, params: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return lv.biscaled_threshold(self.tail, params, amax, self.s)

    def _levels(self, side: torch.Tensor) -> torch.Tensor:
        a = side[0]
        return lv.biscaled_levels(a, torch.minimum(side[1], a), side[2], self.s)


class _NormScaled(Quantizer):
    """Shared by QSGD and NQSGD: |g| / ||bucket||_2 rounded to magnitude levels in [0, 1], sign bit.

    Code = sign << (bits - 1) | magnitude index. Side information: one float32 norm per bucket.
    """

    min_bits = 2

    def __init__(self, bits: int = 4, bucket_size: Optional[int] = None, seed: Optional[int] = None) -> None:
        super().__init__(bits, seed)
        if bucket_size is not None and (not isinstance(bucket_size, int) or bucket_size < 1):
            raise ValueError(f"bucket_size must be a positive int or None, got {bucket_size!r}")
        self.bucket_size = bucket_size
        self.magnitude_count = 2 ** (bits - 1)

    def _repr_extra(self) -> str:
        return f", bucket_size={self.bucket_size}" if self.bucket_size else ""

    def _magnitudes(self, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _bucket(self, numel: int) -> int:
        return self.bucket_size or max(numel, 1)

    def _side_info_count(self, numel: int) -> int:
        return max(1, -(-numel // self._bucket(numel)))

    def _round_magnitude(self, ratio: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return stochastic_round(ratio, self._magnitudes(ratio.device), noise)

    def _quantize(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numel, bucket = x.numel(), self._bucket(x.numel())
        buckets = torch.nn.functional.pad(x, (0, self._side_info_count(numel) * bucket - numel)).view(-1, bucket)
        norms = buckets.norm(dim=1)
        inverse = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        ratio = (buckets.abs() * inverse.unsqueeze(1)).view(-1)[:numel].clamp_(0, 1)
        index = self._round_magnitude(ratio, noise)
        return index | ((x < 0).to(index.dtype) << (self.bits - 1)), norms

    def _dequantize(self, codes: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        numel, bucket = codes.numel(), self._bucket(codes.numel())
        magnitude = self._magnitudes(codes.device).index_select(0, codes & (self.magnitude_count - 1))
        values = torch.where(codes >> (self.bits - 1) > 0, -magnitude, magnitude)
        padded = torch.nn.functional.pad(values, (0, side.numel() * bucket - numel)).view(-1, bucket)
        return (padded * side.unsqueeze(1)).view(-1)[:numel]


class QSGD(_NormScaled):
    """QSGD (Alistarh et al. 2017): 2^(bits-1) uniform magnitude levels {0, 1/s', ..., 1}."""

    scheme = "qsgd"
    scheme_id = 4

    def _magnitudes(self, device: torch.device) -> torch.Tensor:
        return torch.linspace(0, 1, self.magnitude_count, device=device)

    def _round_magnitude(self, ratio: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        intervals = self.magnitude_count - 1
        return stochastic_round_uniform(ratio * intervals, intervals, noise)


class NQSGD(_NormScaled):
    """NUQSGD (Ramezani-Kebrya et al.): magnitude levels {0, 2^-(k-1), ..., 1/2, 1}."""

    scheme = "nqsgd"
    scheme_id = 5

    def _magnitudes(self, device: torch.device) -> torch.Tensor:
        k = self.magnitude_count - 1
        exponents = torch.arange(k - 1, -1, -1, device=device, dtype=torch.float32)
        return torch.cat([torch.zeros(1, device=device), torch.exp2(-exponents)])


SCHEMES = {cls.scheme: cls for cls in (TUQSGD, TNQSGD, TBQSGD, QSGD, NQSGD)}
_SCHEMES_BY_ID = {cls.scheme_id: cls.scheme for cls in SCHEMES.values()}


def _describe(scheme_id: int, bits: int, tail_id: int) -> str:
    scheme = _SCHEMES_BY_ID.get(scheme_id, f"unknown scheme {scheme_id}")
    tail = f", tail {TAILS_BY_ID[tail_id].name}" if tail_id in TAILS_BY_ID else ""
    return f"{scheme} with {bits} bits{tail}"
