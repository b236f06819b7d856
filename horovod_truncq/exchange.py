"""How quantized gradients move between ranks: three strategies behind one interface.

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
- NodeAwareExchange: the two-phase exchange arranged by node: float32 sums inside a node, the
  quantized two-phase exchange between nodes on 1/N of the bucket per rank, payloads shared inside
  the node. A node's link carries N times less than under TwoPhaseExchange, N ranks per node.

With error feedback (feedback.py), each quantized input first gets last step's residual added:
per tensor under allgather; per bucket (all W chunks this rank sends; node-aware: this rank's part
of the node sum) and per owned chunk (the re-quantization) under two-phase and node-aware.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import horovod.torch as hvd
import torch

from .feedback import ErrorFeedback
from .packing import BLOCK
from .quantizers import Quantizer
from .traffic import TrafficCounter, gather_bytes

Waiter = Callable[[], torch.Tensor]
DEFAULT_BUCKET_BYTES = 25 * 2 ** 20  # of float32 gradient, as DDP's default bucket
log = logging.getLogger("horovod_truncq")


def _encode_with_feedback(quantizer: Quantizer, rows: torch.Tensor, name: str,
                          feedback: Optional[ErrorFeedback]) -> torch.Tensor:
    """Payloads of `rows` under the noise stream `name`; with error feedback, of rows plus the residual
    kept under `name`, keeping the new residual."""
    if feedback is None:
        return quantizer.encode_rows(rows, name=name)
    x = feedback.corrected(name, rows.float())
    payloads = quantizer.encode_rows(x, name=name)
    feedback.update(name, x, quantizer.dequantize_own(payloads, x.shape[1]))
    return payloads


class Exchange(Protocol):
    name: str

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter,
                feedback: Optional[ErrorFeedback] = None) -> None:
        """Called once before the first submit, with the quantized gradients' (name, numel), and the
        residuals to keep when error feedback is on."""

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str) -> Waiter:
        """Start sending `tensor`; the returned callable blocks and returns the float32 sum over ranks
        as a 1-D tensor of tensor.numel() elements."""


class AllgatherExchange:
    """Every rank allgathers every rank's payload of a tensor, then decodes and sums them in one pass.
    Payloads of one tensor have the same size on every rank, which keeps NCCL on its single-call path."""

    name = "allgather"

    def __repr__(self) -> str:
        return "AllgatherExchange()"

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter,
                feedback: Optional[ErrorFeedback] = None) -> None:
        self._process_set, self._traffic, self._feedback = process_set, traffic, feedback

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str) -> Waiter:
        payload = _encode_with_feedback(quantizer, tensor.reshape(1, -1), name, self._feedback)[0]
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
    started: bool = False           # its first collective went out this step
    handle: Optional[int] = None    # the collective in flight
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
        return f"{type(self).__name__}(bucket_bytes={self.bucket_bytes}, second_bits={self.second_bits})"

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter,
                feedback: Optional[ErrorFeedback] = None) -> None:
        self._process_set, self._traffic, self._feedback = process_set, traffic, feedback
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
            raise ValueError(f"parameter {name!r} was not among the gradients the {self.name} exchange was prepared for")
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
            self._launch(bucket)
        return functools.partial(self._wait, bucket, name)

    def _new_step(self) -> None:
        self._draining = False
        for bucket in self._buckets:
            bucket.staged, bucket.arrived, bucket.waiting = {}, set(), 0
            bucket.started, bucket.handle, bucket.result = False, None, None

    def _chunk(self, bucket: _Bucket) -> int:
        """Elements per owner: the bucket split in W equal chunks of whole 32-code blocks."""
        ranks = self._process_set.size()
        return -(-bucket.numel // (ranks * BLOCK)) * BLOCK

    def _flat(self, bucket: _Bucket) -> torch.Tensor:
        """This rank's bucket as one float32 vector padded to W chunks; gradients that did not arrive
        this step count as zeros. Frees the staged gradients (they need not outlive the backward pass)."""
        device = self._device
        parts = [bucket.staged[name].reshape(-1).float() if name in bucket.staged
                 else torch.zeros(numel, device=device) for name, (_, numel) in bucket.slots.items()]
        parts.append(torch.zeros(self._process_set.size() * self._chunk(bucket) - bucket.numel, device=device))
        bucket.staged = {}
        return torch.cat(parts)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.started = True
        self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        """Phase 1: quantize the W chunks of this rank's bucket (one threshold each) and alltoall them."""
        ranks = self._process_set.size()
        chunks = self._flat(bucket).view(ranks, -1)
        payloads = _encode_with_feedback(self._quantizer, chunks, f"{bucket.name}.scatter", self._feedback)
        bucket.handle = hvd.alltoall_async(payloads, name=f"truncq.{self.name}.{bucket.name}.scatter",
                                           process_set=self._process_set)
        self._traffic.add_transfer(gather_bytes(payloads.shape[1], ranks))

    def _stages(self) -> tuple[Callable[[_Bucket], None], ...]:
        """What the first wait of a step runs over every bucket, one stage after the other."""
        return (self._reduce,)

    def _decode_reduced(self, quantizer: Quantizer, received: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
        try:
            return quantizer.decode_sum(received, (self._chunk(bucket),))
        except ValueError as error:
            raise ValueError(f"bucket {bucket.name!r}: a rank's chunk does not match {quantizer!r} (payload i "
                             f"is rank i of the process set; ranks disagree on the settings?): {error}") from error

    def _requantize(self, reduced: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
        """The owner's payload of its reduced chunk."""
        return _encode_with_feedback(self._second, reduced.view(1, -1), f"{bucket.name}.gather", self._feedback)

    def _reduce(self, bucket: _Bucket) -> None:
        """End of phase 1 and start of phase 2: sum the W contributions to this rank's chunk,
        re-quantize the sum, allgather it."""
        received, _ = hvd.synchronize(bucket.handle)
        payload = self._requantize(self._decode_reduced(self._quantizer, received, bucket), bucket)
        bucket.handle = hvd.allgather_async(payload, name=f"truncq.{self.name}.{bucket.name}.gather",
                                            process_set=self._process_set)
        self._traffic.add_transfer(gather_bytes(payload.shape[1], self._process_set.size()))

    def _gathered(self, bucket: _Bucket) -> torch.Tensor:
        """The W reduced chunk payloads, in chunk order."""
        return hvd.synchronize(bucket.handle)

    def _wait(self, bucket: _Bucket, name: str) -> torch.Tensor:
        if not self._draining:
            # First wait of the step: every gradient of the step has been submitted on this rank.
            self._draining = True
            for pending in self._buckets:
                if not pending.started:
                    self._launch(pending)
            for stage in self._stages():
                for launched in self._buckets:
                    stage(launched)
        if bucket.result is None:
            try:
                bucket.result = self._second.decode_rows(self._gathered(bucket), self._chunk(bucket)).view(-1)
            except ValueError as error:
                raise ValueError(f"bucket {bucket.name!r}: a reduced chunk does not match {self._second!r}: "
                                 f"{error}") from error
        offset, numel = bucket.slots[name]
        mine = bucket.result[offset:offset + numel].clone()  # a gradient of its own, not a view of the bucket
        bucket.waiting -= 1
        if bucket.waiting == 0:
            bucket.result = None
        return mine


@dataclass(frozen=True)
class _NodePlan:
    """Where each collective of the node-aware exchange sends its rows, worked out once per process
    set so that a bucket's collectives do no per-rank work on the host."""

    node: int  # ranks on this rank's node
    peers: int  # ranks at this rank's position, one per node
    splits: dict[str, torch.Tensor]  # phase -> rows sent to each rank of the process set (int32)
    remote_rows: dict[str, int]  # phase -> rows sent to other ranks (for the byte count)
    peers_by_rank: list[int]  # node order -> the peers' rank order (alltoall rows go in rank order)
    peers_by_node: list[int]  # the inverse: rows received in rank order -> node order

    @classmethod
    def build(cls, nodes: list[list[int]], me: int, size: int) -> "_NodePlan":
        node = next(members for members in nodes if me in members)
        peers = [members[node.index(me)] for members in nodes]
        phases = {"node-sum": (node, 1), "scatter": (peers, 1), "gather": (peers, 1), "share": (node, len(peers))}
        splits = {}
        for phase, (ranks, rows) in phases.items():
            splits[phase] = torch.zeros(size, dtype=torch.int32)
            splits[phase][ranks] = rows
        by_rank = sorted(range(len(peers)), key=peers.__getitem__)
        return cls(node=len(node), peers=len(peers), splits=splits,
                   remote_rows={phase: (len(ranks) - 1) * rows for phase, (ranks, rows) in phases.items()},
                   peers_by_rank=by_rank, peers_by_node=sorted(range(len(peers)), key=by_rank.__getitem__))


class NodeAwareExchange(TwoPhaseExchange):
    """Two-phase exchange that quantizes only what crosses between nodes.

    With W = M N ranks on M nodes of N ranks, each bucket is cut into N parts of M chunks:
    1. inside each node, an alltoall in float32 leaves rank p of the node with the node's sum of part p;
    2. rank p quantizes the M chunks of that part and sends chunk m to rank p of node m (alltoall);
    3. that owner sums the M node sums of its chunk, re-quantizes it and returns it to rank p of
       every node (alltoall);
    4. inside each node, every rank passes the M payloads it holds to every other (alltoall).
    A node's link then carries about 2 (M - 1)/M b/8 bytes per element in each direction, N times
    less than the flat two-phase exchange; the intra-node steps move float32 (and the final
    payloads) over the node's own fast paths. Every rank decodes the same W payloads, so replicas stay
    bit-identical. Every collective is an alltoall with per-rank splits on the given process set, so
    no extra process sets are needed.

    Args:
        bucket_bytes, second_bits: as for TwoPhaseExchange.
        ranks_per_node: N, with the ranks of the process set numbered node by node (0..N-1 on the
            first node, ...). Default: the nodes Horovod found (`hvd.cross_rank()` tells them
            apart). When nodes hold unequal numbers of ranks of the process set, the exchange runs as
            the flat two-phase exchange and logs why.
    With error feedback, a rank keeps one residual for its part of the node sum (n/N elements) and
    one for its owned chunk (n/W).
    """

    name = "node-aware"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, second_bits: Optional[int] = None,
                 ranks_per_node: Optional[int] = None) -> None:
        super().__init__(bucket_bytes, second_bits)
        if ranks_per_node is not None and (isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int)
                                           or ranks_per_node < 1):
            raise ValueError(f"ranks_per_node must be an int >= 1 or None, got {ranks_per_node!r}")
        self.ranks_per_node = ranks_per_node
        self._plan: Optional[_NodePlan] = None  # found on first use
        self._flat_fallback = False

    def __repr__(self) -> str:
        return (f"NodeAwareExchange(bucket_bytes={self.bucket_bytes}, second_bits={self.second_bits}, "
                f"ranks_per_node={self.ranks_per_node})")

    def prepare(self, sizes: Sequence[tuple[str, int]], process_set: hvd.ProcessSet, traffic: TrafficCounter,
                feedback: Optional[ErrorFeedback] = None) -> None:
        if self.ranks_per_node is not None and process_set.size() % self.ranks_per_node:
            raise ValueError(f"ranks_per_node={self.ranks_per_node} does not divide the process set's "
                             f"{process_set.size()} ranks")
        super().prepare(sizes, process_set, traffic, feedback)

    def _find_nodes(self) -> _NodePlan:
        """The plan for this rank's node; collective, so run on first use (after the compressor's
        settings check, so that ranks that disagree raise instead of waiting here)."""
        ranks, me = self._process_set.size(), self._process_set.rank()
        if self.ranks_per_node is not None:
            step = self.ranks_per_node
            return _NodePlan.build([list(range(first, first + step)) for first in range(0, ranks, step)], me, ranks)
        mine = torch.tensor([[hvd.cross_rank(), hvd.local_rank()]], dtype=torch.int64)
        found = hvd.allgather(mine, name="truncq.node-aware.nodes", process_set=self._process_set).tolist()
        by_node: dict[int, list[int]] = {}
        for rank, (node, _) in enumerate(found):
            by_node.setdefault(node, []).append(rank)
        nodes = sorted(by_node.values())
        local_ranks_distinct = all(len({found[r][1] for r in members}) == len(members) for members in nodes)
        if len({len(members) for members in nodes}) > 1 or not local_ranks_distinct:
            log.warning("horovod_truncq: the node-aware exchange found nodes of unequal sizes %s (or Horovod's "
                        "cross ranks do not tell nodes apart); it runs as the flat two-phase exchange",
                        [len(m) for m in nodes])
            self._flat_fallback = True
        return _NodePlan.build(nodes, me, ranks)

    def _alltoall(self, rows: torch.Tensor, bucket: _Bucket, phase: str) -> None:
        """Send rows (ordered by destination rank) as the plan says for `phase`; count the bytes."""
        bucket.handle = hvd.alltoall_async(rows, splits=self._plan.splits[phase],
                                           name=f"truncq.node-aware.{bucket.name}.{phase}",
                                           process_set=self._process_set)
        self._traffic.add_transfer(self._plan.remote_rows[phase] * rows[0].numel() * rows.element_size())

    def _start(self, bucket: _Bucket) -> None:
        if self._plan is None:
            self._plan = self._find_nodes()
        if self._flat_fallback:
            return super()._start(bucket)
        parts = self._flat(bucket).view(self._plan.node, -1)  # part p goes to position p of this node
        self._alltoall(parts, bucket, "node-sum")

    def _stages(self) -> tuple[Callable[[_Bucket], None], ...]:
        if self._flat_fallback:
            return super()._stages()
        return (self._scatter_between_nodes, self._reduce_between_nodes, self._gather_in_node)

    def _scatter_between_nodes(self, bucket: _Bucket) -> None:
        received, _ = hvd.synchronize(bucket.handle)
        node_sum = received.sum(dim=0).view(self._plan.peers, -1)  # chunk m goes to this position on node m
        payloads = _encode_with_feedback(self._quantizer, node_sum, f"{bucket.name}.scatter", self._feedback)
        self._alltoall(payloads[self._plan.peers_by_rank], bucket, "scatter")

    def _reduce_between_nodes(self, bucket: _Bucket) -> None:
        received, _ = hvd.synchronize(bucket.handle)
        payload = self._requantize(self._decode_reduced(self._quantizer, received, bucket), bucket)
        self._alltoall(payload.expand(self._plan.peers, -1).contiguous(), bucket, "gather")

    def _gather_in_node(self, bucket: _Bucket) -> None:
        received, _ = hvd.synchronize(bucket.handle)  # from the peers, in rank order
        self._alltoall(received[self._plan.peers_by_node].repeat(self._plan.node, 1), bucket, "share")

    def _gathered(self, bucket: _Bucket) -> torch.Tensor:
        if self._flat_fallback:
            return super()._gathered(bucket)
        received, _ = hvd.synchronize(bucket.handle)  # position p's M chunks, p = 0..N-1: chunk order
        return received
