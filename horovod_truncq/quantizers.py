"""The codec: truncated TUQSGD, TNQSGD, TBQSGD and the QSGD and NQSGD baselines.

A quantizer is configuration (scheme, bits, tail model, bucket size, seed) and knows nothing of
ranks, steps or transport. Each turns rows of a gradient into self-describing uint8 payloads
(wire.py) and back. A truncated scheme clamps every coordinate to [-a, a] and rounds it
stochastically to one of 2^bits levels, so the decoded value is unbiased for the truncated one; its
levels travel in the payload. The baselines scale by the L2 norm of each bucket and spend one bit on
the sign. The rounding noise is drawn from a stream key (noise.py) that the caller passes. Encoding
makes no host round-trip; decoding W payloads reads one small summary on the host to validate them
all (kernels.py has the passes over memory).
"""
from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch

from . import kernels, noise, packing, wire
from . import levels as lv
from .tails import TAILS, TAILS_BY_ID, Laplace

log = logging.getLogger("horovod_truncq")

Shape = Union[torch.Size, Sequence[int]]
Key = tuple[int, int]
MAX_ELEMENTS = (1 << 31) - 1  # element indices are int32 inside the kernels


@functools.lru_cache(maxsize=4096)
def _device_header(scheme_id: int, bits: int, tail_id: int, numel: int, device: torch.device) -> torch.Tensor:
    """The fixed header on `device`, copied from the host once per tensor size instead of per call,
    through pinned memory on CUDA: a copy from pageable memory would make the host wait."""
    header = torch.tensor(list(wire.header_bytes(scheme_id, bits, tail_id, numel)), dtype=torch.uint8)
    if device.type == "cuda":
        return header.pin_memory().to(device, non_blocking=True)
    return header.to(device)


class Quantizer:
    """Base class: payload framing, validation and decoding.

    Subclasses set `scheme`, `scheme_id`, `min_bits` and implement `side_info_count`, `_encode`
    (rows of float32, finite or not -> side information, uint8 codes, non-finite flags) and
    `_dequantize` (packed words and side information of W payloads -> float32 values).

    `seed` makes `encode` without a key reproducible (every such call draws the same noise); the
    exchange derives its keys from it per rank, stream and step (state.py). Without a seed, `encode`
    draws a fresh random key per call.
    """

    scheme = "base"
    scheme_id = 0
    min_bits = 1
    tail_id = 0
    truncated = False  # True for the truncated schemes, False for the QSGD-style baselines
    # how rounding finds an element's interval: "search" (comparisons or a binary search), "two_steps"
    # (levels of at most two spacings: arithmetic) or "powers_of_two" (NQSGD: the float's exponent)
    rounding = "search"
    # how decoding finds a code's level: "table" (look it up), or computed from the levels' closed form,
    # "uniform" (TUQSGD, QSGD) or "powers_of_two" (NQSGD), to the same float
    grid = "table"
    # Horovod's Compressor protocol (compress/decompress) for hvd.DistributedOptimizer(compression=q):
    # the package wires it to the Horovod front end (__init__.py), so the codec imports no transport.
    horovod_adapter: ClassVar[Optional[Callable[["Quantizer"], Any]]] = None

    def __init__(self, bits: int = 4, seed: Optional[int] = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not self.min_bits <= bits <= 8:
            raise ValueError(f"{type(self).__name__} takes bits from {self.min_bits} to 8, got {bits!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.bits = bits
        self.seed = seed
        self.under_feedback = False
        self._warned_nonfinite = False

    def __repr__(self) -> str:
        described = f"{type(self).__name__}(bits={self.bits}{self._repr_extra()})"
        return f"{described} under error feedback" if self.under_feedback else described

    def _repr_extra(self) -> str:
        return ""

    def _options(self) -> dict:
        return {}

    def with_bits(self, bits: int) -> "Quantizer":
        """The same scheme and options at another bit width."""
        twin = type(self)(bits=bits, seed=self.seed, **self._options())
        twin.under_feedback = self.under_feedback
        return twin

    def for_error_feedback(self) -> "Quantizer":
        """The codec that error feedback encodes with: the same, except that the truncated schemes at
        1 bit send the scaled sign (see _Truncated)."""
        twin = copy.copy(self)
        twin.under_feedback = True
        return twin

    # ---------------------------------------------------------------- sizes
    def side_info_count(self, numel: int) -> int:
        """float32 values of side information in the payload of a `numel`-element tensor."""
        raise NotImplementedError

    def layout(self, numel: int) -> wire.Layout:
        """Where the sections of the payload of a `numel`-element tensor lie."""
        return wire.Layout(self.side_info_count(numel), packing.packed_words(numel, self.bits))

    def payload_size(self, numel: int) -> int:
        """Bytes of the payload for a tensor of `numel` elements, without encoding it."""
        return self.layout(numel).size

    # ---------------------------------------------------------------- scheme hooks
    def _encode(self, x: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, n) float32 -> side information (rows, k), uint8 codes (rows, n), non-finite flags (rows,)."""
        raise NotImplementedError

    def _dequantize(self, words: torch.Tensor, side: torch.Tensor, numel: int, total: bool,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Packed words (W, b m) and side information (W, k) -> float32 (32 m,) sum over the W rows
        when `total`, else the rows one after another (W * 32 m,), written into `out` where given."""
        raise NotImplementedError

    def _write_rows(self, out: Optional[torch.Tensor], words: torch.Tensor,
                    dequantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The 32 m values of each row of words (W, b m), flat, in `out` or a new tensor: `dequantize`
        (a kernels.dequantize_* pass) writes the whole blocks into their view and returns the last block's."""
        rows = words.shape[0]
        if out is None:
            out = torch.empty(rows * packing.BLOCK * (words.shape[1] // self.bits), device=words.device)
        head, tail = packing.block_part_views(out.view(rows, -1), self.bits, words.shape[1])
        tail.copy_(dequantize(head))
        return out

    # ---------------------------------------------------------------- public API
    def encode(self, tensor: torch.Tensor, key: Optional[Key] = None) -> torch.Tensor:
        """The 1-D uint8 payload for `tensor`, on its device: exactly the bytes that travel.

        `key` picks the rounding noise (noise.stream_key); None: the seed's key, or a random one
        without a seed."""
        if not torch.is_floating_point(tensor):
            raise TypeError(f"{type(self).__name__}.encode takes floating-point tensors, got {tensor.dtype}")
        if key is None:
            key = noise.stream_key(self.seed, 0, "", 0) if self.seed is not None else noise.random_key()
        return self.encode_rows(tensor.detach().reshape(1, -1), key)[0]

    def encode_rows(self, rows: torch.Tensor, key: Key) -> torch.Tensor:
        """One payload per row of a (rows, n) floating-point tensor, each row with its own threshold
        and side information, in one batch of passes: a (rows, payload_size(n)) uint8 tensor. Row r
        draws the noise of elements r n .. (r + 1) n - 1 of the stream `key`."""
        if not torch.is_floating_point(rows) or rows.dim() != 2:
            raise TypeError(f"{type(self).__name__}.encode_rows takes a 2-D floating-point tensor, "
                            f"got {rows.dtype} of shape {tuple(rows.shape)}")
        x = rows.detach().to(torch.float32).contiguous()
        count, numel = x.shape
        if x.numel() > MAX_ELEMENTS:
            raise ValueError(f"tensors of more than {MAX_ELEMENTS} elements are not supported, got {x.numel()}")
        layout = self.layout(numel)
        payloads = torch.empty(count, layout.size, dtype=torch.uint8, device=x.device)
        if count == 0:
            return payloads
        payloads[:, :wire.HEADER_BYTES] = _device_header(self.scheme_id, self.bits, self.tail_id, numel, x.device)
        if numel == 0:
            payloads[:, wire.HEADER_BYTES:] = 0
            return payloads
        side, codes, nonfinite = self._encode(x, key)
        # Finite input can still overflow float32 side information (a norm or mean of huge values):
        # that is flagged like NaN/Inf input, and the stored side information stays finite.
        side_finite = torch.isfinite(side)
        payloads[:, wire.FLAGS_OFFSET] = (nonfinite | ~side_finite.all(dim=1)).to(torch.uint8) * wire.FLAG_NONFINITE
        layout.side(payloads).copy_(torch.where(side_finite, side, 0.0))
        kernels.pack_kernel(x.numel(), codes, layout.codes(payloads), bits=self.bits)
        return payloads

    def decode_sum(self, payloads: torch.Tensor, shape: Shape) -> torch.Tensor:
        """The float32 sum of the dequantized tensors in `payloads`, a (W, payload_size) uint8 tensor
        (one row per sender), as a tensor of `shape` on the payloads' device.

        Validates every row with one host read. Raises ValueError when a row was not made by this
        scheme and bit width for a tensor of this many elements, or is truncated or corrupted. When a
        sender's gradient held NaN or Inf, the whole sum is NaN (logged once).
        """
        numel = math.prod(shape)
        words, side, flagged = self._validated(payloads, numel)
        if flagged or numel == 0:
            return torch.full(shape, float("nan") if flagged else 0.0, dtype=torch.float32, device=payloads.device)
        return self._dequantize(words, side, numel, total=True).view(-1)[:numel].view(shape)

    def decode_rows(self, payloads: torch.Tensor, numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dequantized rows of a (W, payload_size(numel)) uint8 tensor, kept apart: float32 (W, numel).
        Validation and non-finite senders as in `decode_sum` (all NaN when any row is flagged).

        `out`: a contiguous float32 tensor of W * numel elements on the payloads' device to write
        them into (numel a multiple of 32, as the exchange's chunks are), returned viewed as (W, numel)."""
        rows = payloads.shape[0]
        if out is not None and (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != rows * numel
                                or numel % packing.BLOCK or out.device != payloads.device):
            raise ValueError(f"out must be a contiguous float32 tensor of {rows} x {numel} elements on "
                             f"{payloads.device}, and {numel} a multiple of {packing.BLOCK}; got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        words, side, flagged = self._validated(payloads, numel)
        if flagged or numel == 0:
            fill = float("nan") if flagged else 0.0
            if out is not None:
                return out.fill_(fill).view(rows, numel)
            return torch.full((rows, numel), fill, dtype=torch.float32, device=payloads.device)
        values = self._dequantize(words, side, numel, total=False, out=None if out is None else out.view(-1))
        return values.view(rows, -1)[:, :numel]

    def dequantize_own(self, payloads: torch.Tensor, numel: int) -> torch.Tensor:
        """What the receivers of payloads just made by `encode_rows` will decode, as float32
        (rows, numel), with no validation and so no host read: for error feedback. Rows flagged
        non-finite come back as NaN."""
        if numel == 0:
            return torch.zeros(payloads.shape[0], 0, device=payloads.device)
        layout = self.layout(numel)
        values = self._dequantize(layout.codes(payloads), layout.side(payloads).contiguous(), numel, total=False)
        values = values.view(payloads.shape[0], -1)[:, :numel]
        return torch.where(layout.flags(payloads).unsqueeze(1) > 0, float("nan"), values)

    def decode(self, payload: torch.Tensor, shape: Shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized tensor of `shape` and `dtype` from one payload (see decode_sum)."""
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
        return self.decode_sum(payload.view(1, -1), shape).to(dtype)

    def _validated(self, payloads: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(codes as int32 words (W, b m), read in place, side information (W, k), any row flagged
        non-finite) after checking every row with one host read."""
        if payloads.dtype != torch.uint8 or payloads.dim() != 2:
            raise ValueError(f"payloads must be a 2-D uint8 tensor (senders, bytes), got {payloads.dtype} "
                             f"of shape {tuple(payloads.shape)}")
        layout = self.layout(numel)
        if payloads.shape[1] != layout.size or payloads.shape[0] == 0:
            self._raise_invalid(payloads, numel)
        if payloads.stride(1) != 1 or payloads.stride(0) % 4 or payloads.storage_offset() % 4:
            payloads = payloads.contiguous().clone()  # sections must be readable as float32 and int32
        side = layout.side(payloads)
        expected = _device_header(self.scheme_id, self.bits, self.tail_id, numel, payloads.device)
        heads = payloads[:, :wire.HEADER_BYTES]
        mismatch = heads != expected
        mismatch[:, wire.FLAGS_OFFSET] = layout.flags(payloads) > wire.FLAG_NONFINITE
        valid = ~mismatch.any(dim=1) & torch.isfinite(side).all(dim=1)
        all_valid, flagged = torch.stack([valid.all(), (layout.flags(payloads) > 0).any()]).tolist()
        if not all_valid:
            self._raise_invalid(payloads, numel)
        if flagged and not self._warned_nonfinite:
            log.warning("%r: a gradient held NaN or Inf, or overflowed float32 in its norm or mean; the "
                        "decoded tensor is all NaN so that a loss-scaling optimizer skips the step "
                        "(further occurrences not logged)", self)
            self._warned_nonfinite = True
        # The codes are read in place: the fused decode pass reads each row's words in order, and a
        # contiguous copy would cost more than the pass gains from it.
        return layout.codes(payloads), side.contiguous(), bool(flagged)

    def _raise_invalid(self, payloads: torch.Tensor, numel: int) -> None:
        """Say what is wrong with the first invalid row (error path: host reads are fine here)."""
        if payloads.shape[0] == 0:
            raise ValueError("no payloads to decode")
        layout = self.layout(numel)
        for row, payload in enumerate(payloads):
            where = f"payload {row} of {payloads.shape[0]}"
            head = wire.parse_header(bytes(payload[: wire.HEADER_BYTES].tolist()))
            if (head.scheme, head.bits, head.tail, head.numel) != (self.scheme_id, self.bits, self.tail_id, numel):
                raise ValueError(f"{where} does not match {self!r} for {numel} elements: it holds "
                                 f"{_describe(head.scheme, head.bits, head.tail)} for {head.numel} elements")
            if payload.numel() != layout.size:
                raise ValueError(f"{where} has {payload.numel()} bytes, expected {layout.size} for "
                                 f"{numel} elements: truncated or padded")
            if not bool(torch.isfinite(layout.side(payload.view(1, -1).clone())).all()):
                raise ValueError(f"{where}: side information is not finite: corrupted payload")
        raise AssertionError("payloads were reported invalid but every row checks out")

    # Horovod's Compressor protocol (see horovod_adapter)
    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        return self._horovod().compress(tensor)

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        return self._horovod().decompress(tensor, ctx)

    def _horovod(self) -> Any:
        if Quantizer.horovod_adapter is None:
            raise TypeError("a quantizer's compress/decompress serve hvd.DistributedOptimizer(compression=q); "
                            "use encode and decode to quantize a tensor yourself")
        return Quantizer.horovod_adapter(self)


class _Truncated(Quantizer):
    """Shared by the truncated schemes: fit the tail model, choose a, build the levels, round.

    At 1 bit under error feedback the levels are ±mean|x| and each element goes to the nearer one
    (the scaled sign). Stochastic rounding to ±a puts an error of about a into every small element,
    and feedback would carry that noise into the next step; the scaled sign is the 1-bit quantizer
    with the least squared error for any x, ||x - Q(x)||^2 = ||x||^2 - n mean|x|^2, so the residual
    stays smaller than its input.
    """

    default_tail = "laplace"
    truncated = True

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

    def _options(self) -> dict:
        return {"tail": self.tail.name}

    def side_info_count(self, numel: int) -> int:
        return self.s + 1

    def _choose_levels(self, params: torch.Tensor, amax: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
        """The s + 1 ascending float32 levels on [-a, a] for the fitted tail parameters and the
        largest and smallest magnitude."""
        raise NotImplementedError

    @property
    def scaled_sign(self) -> bool:
        """Whether this copy sends the scaled sign (1 bit under error feedback)."""
        return self.under_feedback and self.bits == 1

    def _levels_and_flag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Levels (rows, 2^bits), non-finite flags (rows,) and fitted tail parameters (rows, k), None
        for the scaled sign, for a (rows, n) float32 tensor."""
        amax, amin, total, nonfinite = kernels.abs_stats_kernel(x.numel(), x).unbind(dim=-1)
        if self.scaled_sign:
            return lv.uniform_levels(self._clamp_threshold(total / x.shape[-1], amax, amin), 1), nonfinite > 0, None
        params = self.tail.fit(x, total / x.shape[-1]).double()
        return self._choose_levels(params, amax, amin), nonfinite > 0, params

    def _companding(self, params: torch.Tensor, levels: torch.Tensor) -> Optional[torch.Tensor]:
        """[k0, k1] per row such that an element's upper-half level index is about
        (exp(k0 |x|) - 1) k1 + 1/2, where the levels have such a closed form (kernels.round_to_levels)."""
        return None

    def _encode(self, x: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels, nonfinite, params = self._levels_and_flag(x)
        companding = None if params is None else self._companding(params, levels)
        codes = kernels.round_to_levels_kernel(x.numel(), x, levels, key, 0, companding,
                                               stochastic=not self.scaled_sign, rule=self.rounding)
        return levels, codes, nonfinite

    def _dequantize(self, words: torch.Tensor, side: torch.Tensor, numel: int, total: bool,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if total:
            return kernels.sum_levels_kernel(numel * side.shape[0], words, side, bits=self.bits, grid=self.grid)
        return self._write_rows(out, words, lambda head: kernels.dequantize_levels_kernel(
            numel * side.shape[0], head, words, side, bits=self.bits, grid=self.grid))

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
        return self._levels_and_flag(tensor.detach().reshape(1, -1).float())[0][0]


class TUQSGD(_Truncated):
    """Truncated uniform quantization: 2^bits equally spaced levels on [-a, a]."""

    scheme = "tuqsgd"
    scheme_id = 1
    rounding = "two_steps"
    grid = "uniform"

    def _choose_levels(self, params, amax, amin):
        if self.tail is Laplace:
            a = lv.laplace_uniform_threshold(params[..., 0], self.s)
        else:
            a = lv.uniform_threshold(self.tail, params, amax, self.s)
        return lv.uniform_levels(self._clamp_threshold(a, amax, amin), self.s)


class TNQSGD(_Truncated):
    """Truncated non-uniform quantization: level density proportional to p^(1/3) on [-a, a]."""

    scheme = "tnqsgd"
    scheme_id = 2

    def _choose_levels(self, params, amax, amin):
        if self.tail is Laplace:
            a = lv.laplace_nonuniform_threshold(params[..., 0], self.s)
        else:
            a = lv.nonuniform_threshold(self.tail, params, amax, self.s)
        a = self._clamp_threshold(a, amax, amin)
        return lv.nonuniform_levels(self.tail, params.float(), a, self.s).float()

    def _companding(self, params: torch.Tensor, levels: torch.Tensor) -> Optional[torch.Tensor]:
        """Under the Laplace model the upper-half level i sits where the root mass reaches
        (2 i - 1) / s of its value at a (levels.nonuniform_levels): |x| lies near index
        (s R(|x|) / R(a) + 1) / 2 with R(x) proportional to -expm1(-x / (3 gamma))."""
        if self.tail is not Laplace or not kernels.searched_near_a_guess(self.s + 1):
            return None
        k0 = -1 / (3 * params[..., 0])
        return torch.stack([k0, self.s / (2 * torch.expm1(k0 * levels[:, -1].double()))], dim=-1).float()


class TBQSGD(_Truncated):
    """Truncated bi-scaled quantization: a fine uniform grid on [-c, c], a coarse one out to a."""

    scheme = "tbqsgd"
    scheme_id = 3
    min_bits = 2
    rounding = "two_steps"

    def _choose_levels(self, params, amax, amin):
        a, c, s1 = kernels.biscaled_search_kernel(amax.numel(), params, amax, tail=self.tail.name,
                                                  s=self.s).unbind(dim=-1)
        a = self._clamp_threshold(a, amax, amin)
        return lv.biscaled_levels(a, torch.minimum(c.float(), a), s1.float(), self.s)


@functools.lru_cache(maxsize=64)
def _magnitudes(scheme: str, count: int, device: torch.device) -> torch.Tensor:
    """The fixed magnitude levels in [0, 1] of QSGD (uniform) and NQSGD (powers of two). QSGD's are
    j h clamped to 1, h = 1 / (count - 1) rounded up so that the last is exactly 1: one rounded
    product each, which decoding computes instead of looking up (kernels._scaled)."""
    if scheme == "qsgd":
        step = lv.step_rounded_up(torch.tensor(1.0), count - 1)
        return torch.minimum(torch.arange(count, dtype=torch.float32) * step, torch.tensor(1.0)).to(device)
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

    def _options(self) -> dict:
        return {"bucket_size": self.bucket_size}

    def _bucket(self, numel: int) -> int:
        return max(1, min(self.bucket_size or numel, numel))

    def side_info_count(self, numel: int) -> int:
        return max(1, -(-numel // self._bucket(numel)))

    def _encode(self, x: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, numel = x.shape
        bucket = self._bucket(numel)
        whole = numel // bucket * bucket
        full, rest = x[:, :whole].view(rows, -1, bucket), x[:, whole:]
        norms = kernels.bucket_norms_kernel(x.numel(), full)
        if rest.shape[1]:
            norms = torch.cat([norms, kernels.bucket_norms(rest).unsqueeze(1)], dim=1)
        inverse = torch.where((norms > 0) & torch.isfinite(norms), 1 / norms, 0.0)
        magnitudes = _magnitudes(self.scheme, self.magnitude_count, x.device)
        codes = kernels.round_scaled_kernel(x.numel(), full, inverse[:, : full.shape[1]], magnitudes, key, 0,
                                            bits=self.bits, rule=self.rounding).view(rows, whole)
        if rest.shape[1]:  # noise indices after those of the whole buckets
            tail = kernels.round_scaled(rest, inverse[:, -1], magnitudes, key, rows * whole, bits=self.bits,
                                        rule=self.rounding)
            codes = torch.cat([codes, tail], dim=1)
        return norms, codes, torch.zeros(rows, dtype=torch.bool, device=x.device)

    def _dequantize(self, words: torch.Tensor, side: torch.Tensor, numel: int, total: bool,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        magnitudes = _magnitudes(self.scheme, self.magnitude_count, words.device)
        static = {"bucket": self.bucket_size or 0, "bits": self.bits, "grid": self.grid}
        if total:
            return kernels.sum_scaled_kernel(numel * side.shape[0], words, side, magnitudes, **static)
        return self._write_rows(out, words, lambda head: kernels.dequantize_scaled_kernel(
            numel * side.shape[0], head, words, side, magnitudes, **static))


class QSGD(_NormScaled):
    """QSGD (Alistarh et al. 2017): 2^(bits-1) uniform magnitude levels {0, 1/s', ..., 1}."""

    scheme = "qsgd"
    scheme_id = 4
    rounding = "two_steps"
    grid = "uniform"


class NQSGD(_NormScaled):
    """NUQSGD (Ramezani-Kebrya et al.): magnitude levels {0, 2^-(k-1), ..., 1/2, 1}."""

    scheme = "nqsgd"
    scheme_id = 5
    rounding = "powers_of_two"
    grid = "powers_of_two"


SCHEMES = {cls.scheme: cls for cls in (TUQSGD, TNQSGD, TBQSGD, QSGD, NQSGD)}
_SCHEMES_BY_ID = {cls.scheme_id: cls.scheme for cls in SCHEMES.values()}


def _describe(scheme_id: int, bits: int, tail_id: int) -> str:
    scheme = _SCHEMES_BY_ID.get(scheme_id, f"unknown scheme {scheme_id}")
    tail = f", tail {TAILS_BY_ID[tail_id].name}" if tail_id in TAILS_BY_ID else ""
    return f"{scheme} with {bits} bits{tail}"
