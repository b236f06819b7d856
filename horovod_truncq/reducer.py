"""The one place that composes error feedback, the codec and the exchange for a bucket.

A bucket (a fixed list of gradients, flattened into one float32 vector) goes through five stages,
each ending with a collective started (exchange.py) that the next stage waits for:
0. pad to W chunks of whole packing blocks, node-sum;
1. quantize this rank's part (one threshold per chunk) and scatter it;
2. sum the contributions to this rank's chunk in float32, re-quantize the sum and gather it;
3. share the gathered payloads inside the node;
4. decode the W re-quantized chunks: the bucket's sum over ranks, the same bits on every rank.
Every payload carries after it one byte per tensor of the bucket: which tensors its sender, then
its owner's senders, computed. A tensor that no rank computed (a parameter that got no gradient)
comes back exactly zero, not as rounding noise around zero. A NaN or Inf in any rank's chunk makes its whole bucket NaN.

The owner re-quantizes the sum of its chunk; an average divides the decoded result afterwards. The
quantizers are scale-equivariant (levels and norms scale with the data), so this equals
re-quantizing the average.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .exchange import NodePlan, Transfers, TwoPhaseExchange
from .groups import Done, Group, Handle
from .compiling import COMPILE_MIN_ELEMENTS
from .packing import BLOCK, TILE
from .quantizers import Quantizer
from .state import State

STAGES = 5
GATHERING = 3  # the stage a flight is at once its gather, the last step over the slow link, is under way


@dataclass(frozen=True)
class Bucket:
    """A fixed group of gradients exchanged together, the same on every rank."""

    index: int
    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.index}.{self.names[0]}"

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> list[int]:
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        return starts


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[Bucket]:
    """Cut the (name, numel) list, in the order given, into buckets of about `bucket_bytes` float32 bytes."""
    buckets, names, numels = [], [], []
    for index, (name, numel) in enumerate(sizes):
        names.append(name)
        numels.append(numel)
        if 4 * sum(numels) >= bucket_bytes or index == len(sizes) - 1:
            buckets.append(Bucket(len(buckets), tuple(names), tuple(numels)))
            names, numels = [], []
    return buckets


@dataclass
class Flight:
    """One bucket on its way through the stages during one step."""

    bucket: Bucket
    handle: Optional[Handle] = None
    stage: int = 0
    present: Optional[torch.Tensor] = None
    carried: dict = field(default_factory=dict)


def _trailer(present: torch.Tensor, rows: int) -> torch.Tensor:
    """The presence flags as uint8 columns for `rows` rows, padded to whole 32-bit words."""
    flags = present.to(torch.uint8)
    padded = torch.zeros(-(-flags.numel() // 4) * 4, dtype=torch.uint8, device=flags.device)
    padded[:flags.numel()] = flags
    return padded.expand(rows, -1)


class Reducer:
    """Reduces buckets over a group with a quantizer and exchange settings; `state` holds the noise
    keys, the residuals and the byte counter."""

    def __init__(self, quantizer: Quantizer, exchange: TwoPhaseExchange, group: Group, state: State) -> None:
        self.first = quantizer.for_error_feedback() if state.feedback is not None else quantizer
        bits = exchange.second_bits
        self.second = self.first if bits in (None, quantizer.bits) else self.first.with_bits(bits)
        self.group, self.state = group, state
        self.plan = NodePlan.build(exchange.nodes_of(group), group.rank, group.size)
        self.transfers = Transfers(group, self.plan, state.traffic)
        # by (use, bucket index), memory kept from step to step: the padded input, the node's sum and
        # the decoded result. On the CPU a new tensor of a bucket's size costs a page fault per 4 kB
        # page (docs/quantizers.md, "Speed")
        self._kept: dict[tuple[str, int], torch.Tensor] = {}

    def chunk(self, bucket: Bucket) -> int:
        """Elements per owner: the bucket split in W equal chunks of whole 32-code blocks, or, where a
        chunk has at least COMPILE_MIN_ELEMENTS elements (under 0.8% padding), of whole blocks of
        packed words (packing.TILE columns), so that the decode of all W chunks writes in place."""
        block = BLOCK * TILE if bucket.numel >= self.group.size * COMPILE_MIN_ELEMENTS else BLOCK
        return -(-bucket.numel // (self.group.size * block)) * block

    def _encode(self, quantizer: Quantizer, rows: torch.Tensor, stream: str) -> torch.Tensor:
        """Payloads of rows under the noise stream `stream`; with error feedback, of rows plus the
        residual kept under `stream`, keeping the new residual."""
        key, feedback = self.state.key(stream), self.state.feedback
        if feedback is None:
            return quantizer.encode_rows(rows, key)
        x = feedback.corrected(stream, rows)
        payloads = quantizer.encode_rows(x, key)
        feedback.update(stream, x, quantizer.dequantize_own(payloads, x.shape[1]))
        return payloads

    def presence(self, bucket: Bucket, flat: torch.Tensor) -> torch.Tensor:
        """1 for each tensor of the bucket that holds a non-zero (NaN included), else 0: for front
        ends that cannot tell which gradients were computed. One pass over the bucket, a min and a max
        per tensor (segment_reduce, one call, ran many times slower on CPU)."""
        none = flat.new_zeros(())
        extremes = [torch.aminmax(tensor) if tensor.numel() else (none, none)
                    for tensor in flat[:bucket.numel].split(bucket.sizes)]
        low, high = torch.stack([low for low, _ in extremes]), torch.stack([high for _, high in extremes])
        return ((low != 0) | (high != 0)).to(torch.uint8)

    def padded_numel(self, bucket: Bucket) -> int:
        return self.group.size * self.chunk(bucket)

    def _kept_buffer(self, use: str, bucket: Bucket, numel: int, device: torch.device,
                     zeroed: bool = False) -> torch.Tensor:
        """float32 memory of `numel` elements for `use` in `bucket`, the same from step to step (made
        anew where the size or device changed); `zeroed`: made with zeros, for padding that nothing
        writes later."""
        kept = self._kept.get((use, bucket.index))
        if kept is None or kept.numel() != numel or kept.device != device:
            make = torch.zeros if zeroed else torch.empty
            kept = self._kept[(use, bucket.index)] = make(numel, device=device)
        return kept

    def padded_input(self, bucket: Bucket, device: torch.device) -> torch.Tensor:
        """The bucket's input memory, kept from step to step: padded_numel(bucket) float32 elements
        whose padding after the first bucket.numel stays zero. A front end may write its gradients
        into the first bucket.numel and pass it to `start`, which then copies nothing."""
        return self._kept_buffer("input", bucket, self.padded_numel(bucket), device, zeroed=True)

    def start(self, bucket: Bucket, flat: torch.Tensor, present: torch.Tensor) -> Flight:
        """Stage 0 for this rank's bucket: `flat`, float32, holds its bucket.numel elements, followed
        by padding up to padded_numel(bucket) (zeros), or not (then copied into padded_input).
        `present`: uint8, 1 for each tensor this rank computed (a tensor no rank computed comes back
        exactly zero)."""
        flight = Flight(bucket)
        if flat.numel() != self.padded_numel(bucket):
            padded = self.padded_input(bucket, flat.device)
            padded[:bucket.numel].copy_(flat[:bucket.numel])
            flat = padded
        flight.carried["present"] = present
        flight.handle = self.transfers.node_sum(flat.view(self.plan.node, -1), bucket.name)
        flight.stage = 1
        if self.plan.node == 1:  # nothing to sum inside a node: the scatter goes out now, beside the backward pass
            self.advance(flight)
        return flight

    def advance(self, flight: Flight) -> None:
        """Wait for the collective of the current stage and run the next one."""
        received = flight.handle.wait()
        stage = (self._scatter, self._reduce, self._share, self._finish)[flight.stage - 1]
        flight.handle = stage(flight, received)
        flight.stage += 1

    def _scatter(self, flight: Flight, received: torch.Tensor) -> Handle:
        if self.plan.node == 1:
            node_sum = received[0]
        else:
            node_sum = torch.sum(received, dim=0, out=self._kept_buffer("node-sum", flight.bucket, received.shape[1],
                                                                         received.device))
        present = flight.carried.pop("present")
        payloads = self._encode(self.first, node_sum.view(self.plan.peers, -1), f"{flight.bucket.name}.scatter")
        rows = torch.cat([payloads, _trailer(present, payloads.shape[0])], dim=1)
        flight.carried["size"] = payloads.shape[1]
        return self.transfers.scatter(rows, flight.bucket.name)

    def _reduce(self, flight: Flight, received: torch.Tensor) -> Handle:
        size, bucket = flight.carried.pop("size"), flight.bucket
        present = received[:, size:size + len(bucket.sizes)].amax(dim=0)
        try:
            reduced = self.first.decode_sum(received[:, :size], (self.chunk(bucket),))
        except ValueError as error:
            raise ValueError(f"bucket {bucket.name!r}: a rank's chunk does not match {self.first!r} (ranks "
                             f"disagree on the settings?): {error}") from error
        payload = self._encode(self.second, reduced.view(1, -1), f"{bucket.name}.gather")
        flight.carried["size"] = payload.shape[1]
        return self.transfers.gather(torch.cat([payload, _trailer(present, 1)], dim=1), bucket.name)

    def _share(self, flight: Flight, received: torch.Tensor) -> Handle:
        return self.transfers.share(received, flight.bucket.name)

    def _finish(self, flight: Flight, received: torch.Tensor) -> Handle:
        size, bucket = flight.carried.pop("size"), flight.bucket
        try:
            values = self.second.decode_rows(received[:, :size], self.chunk(bucket),
                                             out=self._kept_buffer("decoded", bucket, self.padded_numel(bucket),
                                                                   received.device))
        except ValueError as error:
            raise ValueError(f"bucket {bucket.name!r}: a reduced chunk does not match {self.second!r}: "
                             f"{error}") from error
        # each row carries what one position of a node learnt from its peers: all rows, every rank
        flight.present = received[:, size:size + len(bucket.sizes)].amax(dim=0).float()
        return Done(values.view(-1)[:bucket.numel])

    def advance_all(self, flights: list[Flight], until: int = STAGES) -> None:
        """Advance several buckets to stage `until`, one stage of all before the next: every rank
        issues the collectives in the same order, each as early as it can."""
        while any(flight.stage < until for flight in flights):
            for flight in flights:
                if flight.stage < until:
                    self.advance(flight)

    def finish_all(self, flights: list[Flight]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`finish` for several buckets, advanced together (advance_all)."""
        self.advance_all(flights)
        return [self.finish(flight) for flight in flights]

    def finish(self, flight: Flight) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the remaining stages: (the bucket's float32 sum over ranks, 1.0 or 0.0 per tensor:
        whether any rank sent a non-zero for it). The sum lies in memory that the bucket's next
        exchange overwrites: take what is needed from it before then."""
        while flight.stage < STAGES:
            self.advance(flight)
        return flight.handle.wait(), flight.present
