"""What the network carries for one rank, counted from the collectives' sizes.

Every collective here moves data in a ring or pairwise pattern in which a rank sends as much as it
receives: an alltoall sends and receives the rows addressed to other ranks (exchange.py counts
them); a ring allreduce of B bytes sends and receives 2 (W - 1) / W B. The fp32 reference is the
latter for every gradient at 4 bytes per element: what Horovod's plain allreduce carries.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def ring_allreduce_bytes(nbytes: int, ranks: int) -> int:
    """Bytes one rank sends (and receives) in a ring allreduce of `nbytes` over `ranks` ranks."""
    return 2 * (ranks - 1) * nbytes // ranks


@dataclass
class Traffic:
    """Bytes one rank sent and received, next to what an fp32 allreduce of the same gradients takes.

    sent, received: every collective of the exchange, placeholders and unquantized tensors included.
    fp32_reference: 2 (W - 1) / W * 4 bytes per gradient element (Horovod's ring allreduce).
    elements: gradient elements counted.
    """

    sent: int = 0
    received: int = 0
    fp32_reference: int = 0
    elements: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.sent + other.sent, self.received + other.received,
                       self.fp32_reference + other.fp32_reference, self.elements + other.elements)


@dataclass
class TrafficCounter:
    """Accumulates Traffic; `take()` returns what was counted since the last call (e.g. per step)."""

    current: Traffic = field(default_factory=Traffic)

    def add_transfer(self, nbytes: int) -> None:
        """A collective that sent and received `nbytes` on this rank."""
        self.current.sent += nbytes
        self.current.received += nbytes

    def add_gradient(self, numel: int, ranks: int) -> None:
        self.current.fp32_reference += ring_allreduce_bytes(4 * numel, ranks)
        self.current.elements += numel

    def take(self) -> Traffic:
        taken, self.current = self.current, Traffic()
        return taken
