"""The quantizers: truncated TUQSGD, TNQSGD, TBQSGD and the QSGD and NQSGD baselines.

Each turns a gradient into one self-describing uint8 payload (wire.py) and back. A truncated scheme
clamps every coordinate to [-a, a] and rounds it stochastically to one of 2^bits levels, so the
decoded value is unbiased for the truncated one; its levels travel in the payload. The baselines
scale by the L2 norm of each bucket and spend one bit on the sign. Encoding makes no host
round-trip; decoding the W payloads of a tensor reads one small summary on the host to validate
them all (kernels.py has the passes over memory).
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from . import kernels, noise, packing, wire
from . import levels as lv
from .tails import TAILS, TAILS_BY_ID, Laplace

if TYPE_CHECKING:
    from .compressor import ExchangeCompressor

log = logging.getLogger("horovod_truncq")

Shape = Union[torch.Size, Sequence[int]]
MAX_ELEMENTS = (1 << 31) - 1  # element indices are int32 inside the kernels


@functools.lru_cache(maxsize=4096)
def _device_header(scheme_id: int, bits: int, tail_id: int, numel: int, device: torch.device) -> torch.Tensor:
    """The fixed header on `device`, copied from the host once per tensor size instead of per call
    (a copy from pageable host memory would synchronise a CUDA stream)."""
    return torch.tensor(list(wire.header_bytes(scheme_id, bits, tail_id, numel)), dtype=torch.uint8, device=device)


class Quantizer:
    """Base class: payload framing, rounding-noise streams, validation, Horovod's Compressor API.

    Subclasses set `scheme`, `scheme_id`, `min_bits` and implement `side_info_count`, `_encode`
    (finite-or-not 1-D float32 -> float32 side information, uint8 codes, non-finite flag) and
    `_sum` (packed words and side information of W payloads -> float32 sum).

    Rounding noise is keyed by (seed, rank, name, step): `encode(..., name=, step=)` names the
    stream; without a step, each name counts its own calls. `rank` is set by the exchange.
    """

    scheme = "base"
    scheme_id = 0
    min_bits = 1
    tail_id = 0

    def __init__(self, bits: int = 4, seed: Optional[int] = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not self.min_bits <= bits <= 8:
            raise ValueError(f"{type(self).__name__} takes bits from {self.min_bits} to 8, got {bits!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.bits = bits
        self.seed = seed
        self.rank = 0
        self._stream_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        self._steps: dict[str, int] = {}
        self._warned_nonfinite = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}{self._repr_extra()})"

    def _repr_extra(self) -> str:
        return ""

    # ---------------------------------------------------------------- sizes
    def side_info_count(self, numel: int) -> int:
        """float32 values of side information in the payload of a `numel`-element tensor."""
        raise NotImplementedError

    def payload_size(self, numel: int) -> int:
        """Bytes of the payload for a tensor of `numel` elements, without encoding it."""
        return wire.HEADER_BYTES + 4 * self.side_info_count(numel) + packing.packed_size(numel, self.bits)

    # ---------------------------------------------------------------- randomness
    def for_rank(self, rank: int) -> "Quantizer":
        """A copy that draws the noise streams of `rank`, with its own step counters."""
        twin = copy.copy(self)
        twin.rank, twin._steps = rank, {}
        return twin

    def stream_key(self, name: str = "", step: Optional[int] = None) -> tuple[int, int]:
        """The noise key for tensor `name` at `step` (the next step of `name` when None)."""
        if step is None:
            step = self._steps.get(name, 0)
        self._steps[name] = step + 1
        return noise.stream_key(self._stream_seed, self.rank, name, step)

    # ---------------------------------------------------------------- scheme hooks
    def _encode(self, x: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _sum(self, words: torch.Tensor, side: torch.Tensor, numel: int) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- public API
    def encode(self, tensor: torch.Tensor, *, name: str = "", step: Optional[int] = None) -> torch.Tensor:
        """The 1-D uint8 payload for `tensor`, on its device: exactly the bytes that travel.

        `name` and `step` pick the rounding-noise stream (see the class docstring).
        """
        if not torch.is_floating_point(tensor):
            raise TypeError(f"{type(self).__name__}.encode takes floating-point tensors, got {tensor.dtype}")
        x = tensor.detach().reshape(-1).to(torch.float32)
        numel = x.numel()
        if numel > MAX_ELEMENTS:
            raise ValueError(f"tensors of more than {MAX_ELEMENTS} elements are not supported, got {numel}")
        header = _device_header(self.scheme_id, self.bits, self.tail_id, numel, x.device).clone()
        key = self.stream_key(name, step)
        if numel == 0:
            return torch.cat([header, torch.zeros(4 * self.side_info_count(0), dtype=torch.uint8, device=x.device)])
        side, codes, nonfinite = self._encode(x, key)
        # Finite input can still overflow float32 side information (a norm or mean of huge values):
        # that is flagged like NaN/Inf input, and the stored side information stays finite.
        side_finite = torch.isfinite(side)
        header[wire.FLAGS_OFFSET] = (nonfinite | ~side_finite.all()).to(torch.uint8) * wire.FLAG_NONFINITE
        side = torch.where(side_finite, side, 0.0)
        words = kernels.pack_kernel(numel, codes, bits=self.bits)
        return torch.cat([header, side.view(torch.uint8), words.view(torch.uint8)])

    def decode_sum(self, payloads: torch.Tensor, shape: Shape) -> torch.Tensor:
        """The float32 sum of the dequantized tensors in `payloads`, a (W, payload_size) uint8 tensor
        (one row per sender), as a tensor of `shape` on the payloads' device.

        Validates every row with one host read. Raises ValueError when a row was not made by this
        scheme and bit width for a tensor of this many elements, or is truncated or corrupted. When a
        sender's gradient held NaN or Inf, the whole sum is NaN (logged once).
        """
        if payloads.dtype != torch.uint8 or payloads.dim() != 2:
            raise ValueError(f"payloads must be a 2-D uint8 tensor (senders, bytes), got {payloads.dtype} "
                             f"of shape {tuple(payloads.shape)}")
        numel = math.prod(shape)
        senders, size = payloads.shape
        if size != self.payload_size(numel) or senders == 0:
            self._raise_invalid(payloads, numel)
        if payloads.stride(1) != 1 or payloads.stride(0) % 4 or payloads.storage_offset() % 4:
            payloads = payloads.contiguous().clone()  # sections must be readable as float32 and int32
        side_end = wire.HEADER_BYTES + 4 * self.side_info_count(numel)
        side = payloads[:, wire.HEADER_BYTES:side_end].view(torch.float32)
        expected = _device_header(self.scheme_id, self.bits, self.tail_id, numel, payloads.device)
        heads = payloads[:, :wire.HEADER_BYTES]
        mismatch = heads != expected
        mismatch[:, wire.FLAGS_OFFSET] = heads[:, wire.FLAGS_OFFSET] > wire.FLAG_NONFINITE
        valid = ~mismatch.any(dim=1) & torch.isfinite(side).all(dim=1)
        all_valid, flagged = torch.stack([valid.all(), (heads[:, wire.FLAGS_OFFSET] > 0).any()]).tolist()
        if not all_valid:
            self._raise_invalid(payloads, numel)
        if numel == 0:
            return torch.zeros(shape, dtype=torch.float32, device=payloads.device)
        if flagged:
            if not self._warned_nonfinite:
                log.warning("%r: a gradient held NaN or Inf, or overflowed float32 in its norm or mean; the "
                            "decoded tensor is all NaN so that a loss-scaling optimizer skips the step "
                            "(further occurrences not logged)", self)
                self._warned_nonfinite = True
            return torch.full(shape, float("nan"), dtype=torch.float32, device=payloads.device)
        words = payloads[:, side_end:].view(torch.int32)
        return self._sum(words, side, numel).view(-1)[:numel].view(shape)

    def decode(self, payload: torch.Tensor, shape: Shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized tensor of `shape` and `dtype` from one payload (see decode_sum)."""
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
        return self.decode_sum(payload.view(1, -1), shape).to(dtype)

    def _raise_invalid(self, payloads: torch.Tensor, numel: int) -> None:
        """Say what is wrong with the first invalid row (error path: host reads are fine here)."""
        if payloads.shape[0] == 0:
            raise ValueError("no payloads to decode")
        expected_size = self.payload_size(numel)
        for row, payload in enumerate(payloads):
            where = f"payload {row} of {payloads.shape[0]}"
            head = wire.parse_header(bytes(payload[: wire.HEADER_BYTES].tolist()))
            if (head.scheme, head.bits, head.tail, head.numel) != (self.scheme_id, self.bits, self.tail_id, numel):
                raise ValueError(f"{where} does not match {self!r} for {numel} elements: it holds "
                                 f"{_describe(head.scheme, head.bits, head.tail)} for {head.numel} elements")
            if payload.numel() != expected_size:
                raise ValueError(f"{where} has {payload.numel()} bytes, expected {expected_size} for "
                                 f"{numel} elements: truncated or padded")
            side_end = wire.HEADER_BYTES + 4 * self.side_info_count(numel)
            if not bool(torch.isfinite(payload[wire.HEADER_BYTES:side_end].clone().view(torch.float32)).all()):
                raise ValueError(f"{where}: side information is not finite: corrupted payload")
        raise AssertionError("payloads were reported invalid but every row checks out")

    # Horovod's Compressor interface for a local round trip (exchange.py routes payloads between
    # ranks instead).
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
    """Shared by the truncated schemes: fit the tail model, choose a, build the levels, round."""

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

    def side_info_count(self, numel: int) -> int:
        return self.s + 1

    def _choose_levels(self, params: torch.Tensor, amax: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
        """The s + 1 ascending float32 levels on [-a, a] for the fitted tail parameters and the
        largest and smallest magnitude."""
        raise NotImplementedError

    def _levels_and_flag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax, amin, total, nonfinite = kernels.abs_stats_kernel(x.numel(), x).unbind()
        params = self.tail.fit(x, total / x.numel()).double()
        levels = self._choose_levels(params, amax, amin)
        return levels, nonfinite > 0

    def _encode(self, x: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels, nonfinite = self._levels_and_flag(x)
        return levels, kernels.round_to_levels_kernel(x.numel(), x, levels, key, 0), nonfinite

    def _sum(self, words: torch.Tensor, side: torch.Tensor, numel: int) -> torch.Tensor:
        return kernels.sum_levels_kernel(numel, words, side, bits=self.bits)

    @staticmethod
    def _clamp_threshold(a: torch.Tensor, amax: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
        """a never exceeds max|g| (beyond it only adds variance); with every magnitude equal (constant
        or one-element tensors) a = max|g| exactly; all-zero input gives a = 0 and exact zeros."""
        return torch.where(amax == amin, amax, torch.minimum(a, amax)).float()

    def threshold(self, tensor: torch.Tensor) -> float:
        """The truncation threshold a this quantizer picks for a finite, non-empty `tensor`."""
        return float(self.levels(tensor)[-1])

    def levels(self, tensor: torch.Tensor) -> torch.Tensor:
        """The 2^bits levels this quantizer picks for a finite, non-empty `tensor`."""
        return self._levels_and_flag(tensor.detach().reshape(-1).float())[0]


class TUQSGD(_Truncated):
    """Truncated uniform quantization: 2^bits equally spaced levels on [-a, a]."""

    scheme = "tuqsgd"
    scheme_id = 1

    def _choose_levels(self, params, amax, amin):
        if self.tail is Laplace:
            a = lv.laplace_uniform_threshold(params[0], self.s)
        else:
            a = lv.uniform_threshold(self.tail, params, amax, self.s)
        return lv.uniform_levels(self._clamp_threshold(a, amax, amin), self.s)


class TNQSGD(_Truncated):
    """Truncated non-uniform quantization: level density proportional to p^(1/3) on [-a, a]."""

    scheme = "tnqsgd"
    scheme_id = 2

    def _choose_levels(self, params, amax, amin):
        if self.tail is Laplace:
            a = lv.laplace_nonuniform_threshold(params[0], self.s)
        else:
            a = lv.nonuniform_threshold(self.tail, params, amax, self.s)
        a = self._clamp_threshold(a, amax, amin)
        return lv.nonuniform_levels(self.tail, params.float(), a, self.s).float()


class TBQSGD(_Truncated):
    """Truncated bi-scaled quantization: a fine uniform grid on [-c, c], a coarse one out to a."""

    scheme = "tbqsgd"
    scheme_id = 3
    min_bits = 2

    def _choose_levels(self, params, amax, amin):
        a, c, s1 = lv.biscaled_threshold(self.tail, params, amax, self.s).unbind()
        a = self._clamp_threshold(a, amax, amin)
        return lv.biscaled_levels(a, torch.minimum(c.float(), a), s1.float(), self.s)


@functools.lru_cache(maxsize=64)
def _magnitudes(scheme: str, count: int, device: torch.device) -> torch.Tensor:
    """The fixed magnitude levels in [0, 1] of QSGD (uniform) and NQSGD (powers of two)."""
    if scheme == "qsgd":
        return torch.linspace(0, 1, count, device=device)
    exponents = torch.arange(count - 2, -1, -1, device=device, dtype=torch.float32)
    return torch.cat([torch.zeros(1, device=device), torch.exp2(-exponents)])


class _NormScaled(Quantizer):
    """Shared by QSGD and NQSGD: |g| / ||bucket||_2 rounded to magnitude levels in [0, 1], sign bit.

    Code = sign << (bits - 1) | magnitude index. Side information: one float32 norm per bucket
    (the whole tensor when bucket_size is None; a bucket never exceeds the tensor).
    """

    min_bits = 2

    def __init__(self, bits: int = 4, bucket_size: Optional[int] = None, seed: Optional[int] = None) -> None:
        super().__init__(bits, seed)
        if bucket_size is not None and (isinstance(bucket_size, bool) or not isinstance(bucket_size, int)
                                        or bucket_size < 1):
            raise ValueError(f"bucket_size must be a positive int or None, got {bucket_size!r}")
        self.bucket_size = bucket_size
        self.magnitude_count = 2 ** (bits - 1)

    def _repr_extra(self) -> str:
        return f", bucket_size={self.bucket_size}" if self.bucket_size else ""

    def _bucket(self, numel: int) -> int:
        return max(1, min(self.bucket_size or numel, numel))

    def side_info_count(self, numel: int) -> int:
        return max(1, -(-numel // self._bucket(numel)))

    def _encode(self, x: torch.Tensor, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        numel, bucket = x.numel(), self._bucket(x.numel())
        whole = numel // bucket * bucket
        rows, rest = x[:whole].view(-1, bucket), x[whole:].view(1, -1)
        norms = kernels.bucket_norms_kernel(numel, rows)
        if rest.numel():
            norms = torch.cat([norms, kernels.bucket_norms(rest)])
        inverse = torch.where((norms > 0) & torch.isfinite(norms), 1 / norms, 0.0)
        magnitudes = _magnitudes(self.scheme, self.magnitude_count, x.device)
        codes = kernels.round_scaled_kernel(numel, rows, inverse[: rows.shape[0]], magnitudes, key, 0, bits=self.bits)
        if rest.numel():
            codes = torch.cat([codes, kernels.round_scaled(rest, inverse[rows.shape[0]:], magnitudes, key, whole,
                                                           bits=self.bits)])
        return norms, codes, torch.zeros((), dtype=torch.bool, device=x.device)

    def _sum(self, words: torch.Tensor, side: torch.Tensor, numel: int) -> torch.Tensor:
        magnitudes = _magnitudes(self.scheme, self.magnitude_count, words.device)
        return kernels.sum_scaled_kernel(numel, words, side, magnitudes, bucket=self._bucket(numel), bits=self.bits)


class QSGD(_NormScaled):
    """QSGD (Alistarh et al. 2017): 2^(bits-1) uniform magnitude levels {0, 1/s', ..., 1}."""

    scheme = "qsgd"
    scheme_id = 4


class NQSGD(_NormScaled):
    """NUQSGD (Ramezani-Kebrya et al.): magnitude levels {0, 2^-(k-1), ..., 1/2, 1}."""

    scheme = "nqsgd"
    scheme_id = 5


SCHEMES = {cls.scheme: cls for cls in (TUQSGD, TNQSGD, TBQSGD, QSGD, NQSGD)}
_SCHEMES_BY_ID = {cls.scheme_id: cls.scheme for cls in SCHEMES.values()}


def _describe(scheme_id: int, bits: int, tail_id: int) -> str:
    scheme = _SCHEMES_BY_ID.get(scheme_id, f"unknown scheme {scheme_id}")
    tail = f", tail {TAILS_BY_ID[tail_id].name}" if tail_id in TAILS_BY_ID else ""
    return f"{scheme} with {bits} bits{tail}"
