"""How quantized gradients move between ranks: two strategies behind one interface.

An exchange is prepared once with the (name, numel) of the gradients it will carry, in the order
they usually become ready, then takes one rank's gradient at a time (`submit`, from the backward
hook), starts collectives asynchronously under deterministic names, and hands back a waiter that
returns the float32 sum over the ranks of the process set. The compressor (compressor.py) only
knows this interface.

- AllgatherExchange: every rank allgathers every rank's payload of each tensor and sums them. A rank
  receives (W - 1) b/8 bytes per element: more than fp32's ring allreduce once W > 64/b.
- TwoPhaseExchange: gradients are gathered into buckets; each bucket is cut into W chunks, rank r
  owns chunk r. Phase 1: one alltoall sends chunk r of every rank to rank r, which sums the W
  contributions in float32. Phase 2: the owner re-quantizes its sum and one allgather delivers every
  reduced chunk to every rank. A rank receives about 2 (W - 1)/W b/8 bytes per element at any W.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import horovod.torch as hvd
import torch

from .packing import BLOCK
from .quantizers import Quantizer
from .traffic import TrafficCounter, gather_bytes

Waiter = Callable[[], torch.Tensor]
DEFAULT_BUCKET_BYTES = 25 * 2 ** 20  # of float32 gradient, as DDP's default bucket


class Exchange(Protocol):
    name: str

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter) -> None:
        """Called once before the first submit, with the quantized gradients' (name, numel)."""

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str) -> Waiter:
        """Start sending `tensor`; the returned callable blocks and returns the float32 sum over ranks
        as a 1-D tensor of tensor.numel() elements."""


class AllgatherExchange:
    """Every rank allgathers every rank's payload of a tensor, then decodes and sums them in one pass.
    Payloads of one tensor have the same size on every rank, which keeps NCCL on its single-call path."""

    name = "allgather"

    def __repr__(self) -> str:
        return "AllgatherExchange()"

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter) -> None:
        self._process_set, self._traffic = process_set, traffic

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str) -> Waiter:
        payload = quantizer.encode(tensor, name=name)
        handle = hvd.allgather_async(payload, name=f"truncq.allgather.{name}", process_set=self._process_set)
        numel, size, ranks = tensor.numel(), payload.numel(), self._process_set.size()
        self._traffic.add_transfer(gather_bytes(size, ranks))

        def wait() -> torch.Tensor:
            gathered = hvd.synchronize(handle)
            if gathered.numel() != ranks * size:
                raise ValueError(f"parameter {name!r}: ranks sent payloads of different sizes "
                                 f"({gathered.numel()} bytes from {ranks} ranks, {size} from this one): "
                                 f"they disagree on scheme, bits or tensor size")
            try:
                return quantizer.decode_sum(gathered.view(ranks, size), (numel,))
            except ValueError as error:
                raise ValueError(f"parameter {name!r}: a rank's payload does not match {quantizer!r} "
                                 f"(payload i is rank i of the process set): {error}") from error

        return wait


@dataclass
class _Bucket:
    """A fixed group of gradients exchanged together, and its state during one step."""

    name: str
    slots: dict[str, tuple[int, int]]  # gradient name -> (offset, numel) in the flat bucket
    numel: int
    staged: dict[str, torch.Tensor] = field(default_factory=dict)  # until copied into the bucket
    arrived: set[str] = field(default_factory=set)
    waiting: int = 0                # waiters of this step that have not taken their slice
    scatter: Optional[int] = None   # phase 1 handle (alltoall)
    gather: Optional[int] = None    # phase 2 handle (allgather)
    result: Optional[torch.Tensor] = None


class TwoPhaseExchange:
    """Bucketed two-phase exchange: alltoall of quantized chunks, float32 reduction by each chunk's
    owner, re-quantization, allgather. Every rank, the owner included, uses the decoded re-quantized
    chunks, so all replicas hold bit-identical gradients.

    Args:
        bucket_bytes: float32 bytes of gradient per bucket (default 25 MiB, DDP's default). Buckets
            are cut from the gradients in the order given to `prepare` and are the same on every
            rank. A bucket goes out when its last gradient arrives; the first wait of a step sends
            every bucket still incomplete, with zeros for gradients that did not arrive, so no rank
            waits for a bucket that never fills.
        second_bits: bits of the owner's re-quantization (default: the quantizer's own).

    The owner re-quantizes the sum of its chunk; an Average divides the decoded result afterwards.
    The quantizers are scale-equivariant (levels and norms scale with the data), so this equals
    re-quantizing the average. A NaN or Inf in any rank's chunk makes its whole bucket NaN.
    """

    name = "two-phase"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, second_bits: Optional[int] = None) -> None:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 4:
            raise ValueError(f"bucket_bytes must be an int of at least 4, got {bucket_bytes!r}")
        if second_bits is not None and (isinstance(second_bits, bool) or not isinstance(second_bits, int)
                                        or not 1 <= second_bits <= 8):
            raise ValueError(f"second_bits must be an int from 1 to 8 or None, got {second_bits!r}")
        self.bucket_bytes = bucket_bytes
        self.second_bits = second_bits
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[str, _Bucket] = {}
        self._draining = False
        self._quantizer: Optional[Quantizer] = None
        self._second: Optional[Quantizer] = None
        self._device = torch.device("cpu")

    def __repr__(self) -> str:
        return f"TwoPhaseExchange(bucket_bytes={self.bucket_bytes}, second_bits={self.second_bits})"

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter) -> None:
        self._process_set, self._traffic = process_set, traffic
        slots: dict[str, tuple[int, int]] = {}
        total = 0
        for index, (name, numel) in enumerate(sizes):
            slots[name] = (total, numel)
            total += numel
            if 4 * total >= self.bucket_bytes or index == len(sizes) - 1:
                bucket = _Bucket(f"{len(self._buckets)}.{next(iter(slots))}", slots, total)
                self._buckets.append(bucket)
                self._bucket_of.update((member, bucket) for member in slots)
                slots, total = {}, 0

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str) -> Waiter:
        bucket = self._bucket_of.get(name)
        if bucket is None:
            raise ValueError(f"parameter {name!r} was not among the gradients the two-phase exchange was prepared for")
        if self._draining:  # the previous step's waits are over: a new step begins
            self._new_step()
        if name in bucket.arrived:
            raise ValueError(f"parameter {name!r} was submitted twice in one step")
        if self._quantizer is None:
            self._quantizer = quantizer
            self._second = quantizer if self.second_bits in (None, quantizer.bits) else quantizer.with_bits(self.second_bits)
        bucket.staged[name] = tensor
        bucket.arrived.add(name)
        bucket.waiting += 1
        self._device = tensor.device
        if len(bucket.arrived) == len(bucket.slots):
            self._scatter(bucket)
        return functools.partial(self._wait, bucket, name)

    def _new_step(self) -> None:
        self._draining = False
        for bucket in self._buckets:
            bucket.staged, bucket.arrived, bucket.waiting = {}, set(), 0
            bucket.scatter, bucket.gather, bucket.result = None, None, None

    def _chunk(self, bucket: _Bucket) -> int:
        """Elements per owner: the bucket split in W equal chunks of whole 32-code blocks."""
        ranks = self._process_set.size()
        return -(-bucket.numel // (ranks * BLOCK)) * BLOCK

    def _scatter(self, bucket: _Bucket) -> None:
        """Phase 1: quantize the W chunks of this rank's bucket (one threshold each) and alltoall them.
        Gradients that did not arrive this step count as zeros."""
        ranks, device = self._process_set.size(), self._device
        parts = [bucket.staged[name].reshape(-1).float() if name in bucket.staged
                 else torch.zeros(numel, device=device) for name, (_, numel) in bucket.slots.items()]
        parts.append(torch.zeros(ranks * self._chunk(bucket) - bucket.numel, device=device))
        chunks = torch.cat(parts).view(ranks, -1)
        bucket.staged = {}  # copied: the gradients need not outlive the backward pass
        payloads = self._quantizer.encode_rows(chunks, name=f"{bucket.name}.scatter")
        bucket.scatter = hvd.alltoall_async(payloads, name=f"truncq.two-phase.{bucket.name}.scatter",
                                            process_set=self._process_set)
        self._traffic.add_transfer(gather_bytes(payloads.shape[1], ranks))

    def _reduce(self, bucket: _Bucket) -> None:
        """End of phase 1 and start of phase 2: sum the W contributions to this rank's chunk,
        re-quantize the sum, allgather it."""
        received, _ = hvd.synchronize(bucket.scatter)
        chunk = self._chunk(bucket)
        try:
            reduced = self._quantizer.decode_sum(received, (chunk,))
        except ValueError as error:
            raise ValueError(f"bucket {bucket.name!r}: a rank's chunk does not match {self._quantizer!r} (payload i "
                             f"is rank i of the process set; ranks disagree on the settings?): {error}") from error
        payload = self._second.encode(reduced, name=f"{bucket.name}.gather")
        bucket.gather = hvd.allgather_async(payload.view(1, -1), name=f"truncq.two-phase.{bucket.name}.gather",
                                            process_set=self._process_set)
        self._traffic.add_transfer(gather_bytes(payload.numel(), self._process_set.size()))

    def _wait(self, bucket: _Bucket, name: str) -> torch.Tensor:
        if not self._draining:
            # First wait of the step: every gradient of the step has been submitted on this rank.
            self._draining = True
            for pending in self._buckets:
                if pending.scatter is None:
                    self._scatter(pending)
            for launched in self._buckets:
                self._reduce(launched)
        if bucket.result is None:
            gathered = hvd.synchronize(bucket.gather)
            try:
                bucket.result = self._second.decode_rows(gathered, self._chunk(bucket)).view(-1)
            except ValueError as error:
                raise ValueError(f"bucket {bucket.name!r}: a reduced chunk does not match {self._second!r}: "
                                 f"{error}") from error
        offset, numel = bucket.slots[name]
        mine = bucket.result[offset:offset + numel].clone()  # a gradient of its own, not a view of the bucket
        bucket.waiting -= 1
        if bucket.waiting == 0:
            bucket.result = None
        return mine
