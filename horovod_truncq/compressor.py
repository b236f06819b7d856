"""Horovod Compressor that carries a quantizer's payloads through an exchange.

Horovod's DistributedOptimizer sums whatever `compress` returns with an allreduce, which cannot carry
packed codes. So `compress` starts the exchange (exchange.py) of the gradient's payload itself and
hands Horovod a one-element placeholder; Horovod fuses the placeholders of all tensors into one tiny
allreduce. `decompress` waits for the exchange and returns the sum or the mean over ranks.

The placeholder also tells which reduction Horovod applied: it holds (rank in the process set + 1),
so it comes back as (k + 1) / 2 under Average (whatever gradient_predivide_factor) and k (k + 1) / 2
under Sum, for k ranks. Any other reduction is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import horovod.torch as hvd
import torch

from .exchange import AllgatherExchange, Exchange, Waiter
from .quantizers import Quantizer

DEFAULT_MIN_ELEMENTS = 1024
PLACEHOLDER_BYTES = 4


@dataclass
class Traffic:
    """Bytes this rank contributed to collectives, and what an fp32 allreduce would have taken.

    payload: quantized payloads (header, side information and codes).
    overhead: placeholder allreduces (4 bytes per quantized tensor) and the tensors sent unquantized.
    fp32_reference: 4 bytes per element of every gradient, what plain Horovod contributes.
    """

    payload: int = 0
    overhead: int = 0
    fp32_reference: int = 0
    tensors: int = 0

    @property
    def total(self) -> int:
        return self.payload + self.overhead


@dataclass
class TrafficCounter:
    """Accumulates Traffic; `take()` returns what was counted since the last call (e.g. per step)."""

    current: Traffic = field(default_factory=Traffic)

    def add(self, payload: int, overhead: int, reference: int) -> None:
        self.current.payload += payload
        self.current.overhead += overhead
        self.current.fp32_reference += reference
        self.current.tensors += 1

    def take(self) -> Traffic:
        taken, self.current = self.current, Traffic()
        return taken


@dataclass
class _Context:
    wait: Optional[Waiter]  # None for tensors sent unquantized
    shape: torch.Size
    dtype: torch.dtype
    name: str


class ExchangeCompressor:
    """The `compression=` object for hvd.DistributedOptimizer: `quantizer.bind(named_parameters)`.

    Args:
        quantizer: the codec. The compressor uses a copy that draws this rank's noise streams, keyed by
            (seed, rank, parameter name, step): ranks draw independent rounding noise (identical
            noise on every rank would not average out), and a seeded run is reproducible.
        named_parameters: the same (name, parameter) pairs given to DistributedOptimizer; they name
            the collectives and let `compress` find which parameter a gradient belongs to.
        process_set: the optimizer's process set; results are averaged over its size.
        min_elements: tensors with fewer elements (biases, norms) go through Horovod's ordinary fp32
            allreduce: their payload header would cost more than it saves. Default 1024.
        exchange: how payloads move; default AllgatherExchange().
    """

    def __init__(self, quantizer: Quantizer, named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 process_set: hvd.ProcessSet = hvd.global_process_set,
                 min_elements: int = DEFAULT_MIN_ELEMENTS, exchange: Optional[Exchange] = None) -> None:
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a horovod_truncq Quantizer, got {type(quantizer).__name__}")
        self.parameters = dict(named_parameters)
        if not self.parameters:
            raise ValueError("named_parameters is empty: the compressor needs the (name, parameter) pairs")
        if min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {min_elements}")
        self.quantizer = quantizer.for_rank(hvd.rank())
        self.process_set = process_set
        self.min_elements = min_elements
        self.exchange = exchange or AllgatherExchange()
        self.traffic = TrafficCounter()
        self._last_name = ""
        self._next_name: dict[str, str] = {}  # learned hook order: the name found after each name

    def __repr__(self) -> str:
        return (f"ExchangeCompressor({self.quantizer!r}, exchange={self.exchange.name}, "
                f"min_elements={self.min_elements}, parameters={len(self.parameters)})")

    def _name_of(self, grad: torch.Tensor) -> str:
        """The parameter whose .grad is `grad`. Hooks fire in the same order every step, so the
        parameter that followed the previous one last time is tried first: O(1) once learned."""
        guess = self._next_name.get(self._last_name)
        if guess is not None and self.parameters[guess].grad is grad:
            name = guess
        else:
            name = next((n for n, p in self.parameters.items() if p.grad is grad), None)
            if name is None:
                raise ValueError(f"horovod_truncq: a gradient of shape {tuple(grad.shape)} belongs to none of the "
                                 f"{len(self.parameters)} named parameters given to the compressor; pass the same "
                                 f"named_parameters to the compressor and to DistributedOptimizer (sparse gradients "
                                 f"with sparse_as_dense=True are not supported)")
            self._next_name[self._last_name] = name
        self._last_name = name
        return name

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, _Context]:
        if tensor.is_sparse:
            raise ValueError("horovod_truncq does not quantize sparse gradients; use sparse_as_dense=False "
                             "with Horovod's own compression for sparse parameters")
        reference = 4 * tensor.numel()
        if not torch.is_floating_point(tensor) or tensor.numel() < self.min_elements:
            sent = tensor.float() if torch.is_floating_point(tensor) else tensor
            self.traffic.add(payload=0, overhead=sent.numel() * sent.element_size(), reference=reference)
            return sent, _Context(None, tensor.shape, tensor.dtype, "")
        name = self._name_of(tensor)
        wait = self.exchange.submit(tensor, self.quantizer, name, self.process_set)
        sent = self.exchange.sent_bytes(self.quantizer, tensor.numel(), self.process_set.size())
        self.traffic.add(payload=sent, overhead=PLACEHOLDER_BYTES, reference=reference)
        placeholder = torch.full((1,), float(self.process_set.rank() + 1), dtype=torch.float32, device=tensor.device)
        return placeholder, _Context(wait, tensor.shape, tensor.dtype, name)

    def decompress(self, tensor: torch.Tensor, ctx: _Context) -> torch.Tensor:
        if ctx.wait is None:
            return tensor.to(ctx.dtype)
        total = ctx.wait()
        ranks = self.process_set.size()
        reduced = float(tensor)
        if math.isclose(reduced, (ranks + 1) / 2, rel_tol=1e-4):
            total = total / ranks
        elif not math.isclose(reduced, ranks * (ranks + 1) / 2, rel_tol=1e-4):
            raise ValueError(f"parameter {ctx.name!r}: horovod_truncq supports op=hvd.Average and hvd.Sum only "
                             f"(the placeholder came back as {reduced})")
        return total.view(ctx.shape).to(ctx.dtype)
