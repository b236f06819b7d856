"""How a bucket's rows move between ranks: the exchange's settings, its node plan, and its four
collectives.

The bucketed two-phase exchange, arranged by node. With W = M N ranks on M nodes of N ranks, a
bucket is cut into N parts of M chunks (reducer.py says what is computed between the steps):
1. node-sum: inside each node, an alltoall in float32 leaves rank p of the node with the node's sum
   of part p;
2. scatter: rank p sends chunk m of that part, quantized, to rank p of node m (alltoall);
3. gather: that owner sums the M contributions, re-quantizes the sum and returns it to rank p of
   every node (alltoall);
4. share: inside each node, every rank passes the M payloads it holds to every other (alltoall).
The flat two-phase exchange is the same with one rank per node (N = 1): steps 1 and 4 move nothing,
step 2 is the alltoall of quantized chunks and step 3 the allgather of the re-quantized ones. A rank
receives about 2 (W - 1)/W b/8 bytes per element under the flat exchange; a node's link carries
about 2 (M - 1)/M b/8 bytes per element under the node-aware one, N times less.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .groups import Done, Group, Handle
from .traffic import TrafficCounter

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20  # of float32 gradient, as DDP's default bucket
PHASES = ("node-sum", "scatter", "gather", "share")
log = logging.getLogger("horovod_truncq")


def _check_int(name: str, value, low: int, high: Optional[int] = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {span}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class TwoPhaseExchange:
    """The flat two-phase exchange: alltoall of quantized chunks, float32 reduction by each chunk's
    owner, re-quantization, allgather. Every rank, the owner included, decodes the same re-quantized
    chunks, so all replicas hold bit-identical gradients.

    Args:
        bucket_bytes: float32 bytes of gradient per bucket (default 25 MiB, DDP's default).
        second_bits: bits of the owner's re-quantization (default: the quantizer's own).
    """

    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    second_bits: Optional[int] = None
    name = "two-phase"

    def __post_init__(self) -> None:
        _check_int("bucket_bytes", self.bucket_bytes, 4)
        _check_int("second_bits", self.second_bits, 1, 8, optional=True)

    def nodes_of(self, group: Group) -> list[list[int]]:
        """The ranks of each node, as this exchange arranges them: one rank per node."""
        return [[rank] for rank in range(group.size)]


@dataclass(frozen=True)
class NodeAwareExchange(TwoPhaseExchange):
    """The two-phase exchange arranged by node: float32 sums inside a node, the quantized exchange
    between nodes on 1/N of the bucket per rank, payloads shared inside the node.

    Args:
        bucket_bytes, second_bits: as for TwoPhaseExchange.
        ranks_per_node: N, with the ranks numbered node by node (0..N-1 on the first node, ...).
            Default: the nodes the transport reports. When nodes hold unequal numbers of ranks, the
            exchange runs as the flat two-phase exchange and logs why.
    """

    ranks_per_node: Optional[int] = None
    name = "node-aware"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("ranks_per_node", self.ranks_per_node, 1, optional=True)

    def nodes_of(self, group: Group) -> list[list[int]]:
        if self.ranks_per_node is not None:
            if group.size % self.ranks_per_node:
                raise ValueError(f"ranks_per_node={self.ranks_per_node} does not divide the {group.size} ranks")
            step = self.ranks_per_node
            return [list(range(first, first + step)) for first in range(0, group.size, step)]
        by_node: dict[int, list[int]] = {}
        for rank, node in enumerate(group.nodes):
            by_node.setdefault(node, []).append(rank)
        nodes = sorted(by_node.values())
        if len({len(members) for members in nodes}) > 1:
            log.warning("horovod_truncq: the node-aware exchange found nodes of unequal sizes %s; it runs as the "
                        "flat two-phase exchange", [len(m) for m in nodes])
            return [[rank] for rank in range(group.size)]
        return nodes


EXCHANGES = {"two-phase": TwoPhaseExchange, "node-aware": NodeAwareExchange}


def make_exchange(exchange) -> TwoPhaseExchange:
    """Exchange settings from a name in EXCHANGES, an instance, or None for the default (two-phase)."""
    if exchange is None:
        return TwoPhaseExchange()
    if isinstance(exchange, str):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {sorted(EXCHANGES)} or an instance of one, got {exchange!r}")
        return EXCHANGES[exchange]()
    if not isinstance(exchange, TwoPhaseExchange):
        raise TypeError(f"exchange must be one of {sorted(EXCHANGES)} or an instance of one, "
                        f"got {type(exchange).__name__}")
    return exchange


@dataclass(frozen=True)
class NodePlan:
    """Where each step of the exchange sends its rows, worked out once so that a bucket's
    collectives do no per-rank work on the host."""

    node: int  # N: ranks on this rank's node
    peers: int  # M: ranks at this rank's position, one per node
    splits: dict[str, list[int]]  # phase -> rows sent to each rank
    remote_rows: dict[str, int]  # phase -> rows sent to other ranks (for the byte count)
    peers_by_rank: list[int]  # node order -> the peers' rank order (alltoall rows go in rank order)
    peers_by_node: list[int]  # the inverse: rows received in rank order -> node order

    @classmethod
    def build(cls, nodes: list[list[int]], me: int, size: int) -> "NodePlan":
        node = next(members for members in nodes if me in members)
        peers = [members[node.index(me)] for members in nodes]
        phases = {"node-sum": (node, 1), "scatter": (peers, 1), "gather": (peers, 1), "share": (node, len(peers))}
        splits = {}
        for phase, (ranks, rows) in phases.items():
            splits[phase] = [0] * size
            for rank in ranks:
                splits[phase][rank] = rows
        by_rank = sorted(range(len(peers)), key=peers.__getitem__)
        return cls(node=len(node), peers=len(peers), splits=splits,
                   remote_rows={phase: (len(ranks) - 1) * rows for phase, (ranks, rows) in phases.items()},
                   peers_by_rank=by_rank, peers_by_node=sorted(range(len(peers)), key=by_rank.__getitem__))


class Transfers:
    """The four steps of the exchange over a group, each one alltoall, with the bytes counted."""

    def __init__(self, group: Group, plan: NodePlan, traffic: TrafficCounter) -> None:
        self.group, self.plan, self.traffic = group, plan, traffic

    def _send(self, rows: torch.Tensor, phase: str, name: str) -> Handle:
        self.traffic.add_transfer(self.plan.remote_rows[phase] * rows[0].numel() * rows.element_size())
        return self.group.alltoall(rows, self.plan.splits[phase], f"truncq.{name}.{phase}")

    def node_sum(self, parts: torch.Tensor, name: str) -> Handle:
        """parts (N, m) float32, part p for rank p of this node -> the N parts p received (N, m)."""
        if self.plan.node == 1:
            return Done(parts)
        return self._send(parts, "node-sum", name)

    def scatter(self, payloads: torch.Tensor, name: str) -> Handle:
        """payloads (M, k), chunk m for the peer on node m -> the M contributions to this rank's chunk."""
        order = self.plan.peers_by_rank
        return self._send(payloads if order == sorted(order) else payloads[order], "scatter", name)

    def gather(self, payload: torch.Tensor, name: str) -> Handle:
        """payload (1, k), this rank's reduced chunk -> the M peers' reduced chunks, in node order."""
        if self.plan.node == 1:  # every rank is a peer, in rank order: an allgather, with no copies to send
            self.traffic.add_transfer(self.plan.remote_rows["gather"] * payload.numel() * payload.element_size())
            return self.group.allgather(payload, f"truncq.{name}.gather")
        received = self._send(payload.expand(self.plan.peers, -1).contiguous(), "gather", name)
        order = self.plan.peers_by_node
        return received if order == sorted(order) else _Reordered(received, order)

    def share(self, payloads: torch.Tensor, name: str) -> Handle:
        """payloads (M, k) held by this rank -> the N M payloads of the node, in chunk order."""
        if self.plan.node == 1:
            return Done(payloads)
        return self._send(payloads.repeat(self.plan.node, 1), "share", name)


class _Reordered:
    """A handle whose rows come back in another order."""

    def __init__(self, handle: Handle, order: list[int]) -> None:
        self.handle, self.order = handle, order

    def wait(self) -> torch.Tensor:
        return self.handle.wait()[self.order]
