"""Horovod Compressor that carries a quantizer's payloads through an exchange.

Horovod's DistributedOptimizer sums whatever `compress` returns with an allreduce, which cannot carry
packed codes. So `compress` hands the gradient to an exchange (exchange.py), which starts its own
collectives, and gives Horovod a one-element placeholder; Horovod fuses the placeholders of all
tensors into one tiny allreduce. `decompress` waits for the exchange and returns the sum or the mean
over ranks.

The placeholder also tells which reduction Horovod applied: it holds (rank in the process set + 1),
so it comes back as (k + 1) / 2 under Average (whatever gradient_predivide_factor) and k (k + 1) / 2
under Sum, for k ranks. Any other reduction is refused.

Before the first gradient leaves, the ranks compare their settings (scheme, bits, exchange,
min_elements, the quantized parameters and their sizes) with one small allgather: a disagreement
raises the same ValueError on every rank instead of pairing collectives that do not match.

`state_dict()` holds what a resumed run needs to continue exactly: the rounding-noise step of every
stream and, with error feedback, the residuals. Both belong to this rank.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import horovod.torch as hvd
import torch

from .exchange import AllgatherExchange, Exchange, NodeAwareExchange, TwoPhaseExchange, Waiter
from .feedback import ErrorFeedback
from .quantizers import Quantizer
from .traffic import TrafficCounter, ring_allreduce_bytes

DEFAULT_MIN_ELEMENTS = 1024
PLACEHOLDER_BYTES = 4
EXCHANGES = {"allgather": AllgatherExchange, "two-phase": TwoPhaseExchange, "node-aware": NodeAwareExchange}
DEFAULT_EXCHANGE = "two-phase"
_DESCRIPTION_BYTES = 512
_compressor_ids = itertools.count()
log = logging.getLogger("horovod_truncq")


def make_exchange(exchange: Union[str, Exchange, None]) -> Exchange:
    """An exchange from its name (see EXCHANGES), an instance, or None for the default."""
    if exchange is None:
        exchange = DEFAULT_EXCHANGE
    if isinstance(exchange, str):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {sorted(EXCHANGES)} or an Exchange, got {exchange!r}")
        return EXCHANGES[exchange]()
    if not all(hasattr(exchange, attr) for attr in ("prepare", "submit", "name")):
        raise TypeError(f"exchange must be one of {sorted(EXCHANGES)} or an Exchange, got {type(exchange).__name__}")
    return exchange


@dataclass
class _Context:
    compressor: "ExchangeCompressor"
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
        exchange: how payloads move: "two-phase" (default), "node-aware" (several ranks per node),
            "allgather", or an Exchange instance such as TwoPhaseExchange(bucket_bytes=...,
            second_bits=...) or NodeAwareExchange(ranks_per_node=...).
        error_feedback: add to each quantized input what the quantizer dropped from it last step
            (feedback.py): True for all of it, a float in (0, 1) for that share of it (a decaying
            residual), False (default) for none. The truncated schemes at 1 bit then send the
            scaled sign. Residuals on the gradient's device: 4 bytes per quantized element
            (node-aware: 4 per element / ranks per node), plus 4 per owned element (1/W of them)
            under two-phase and node-aware.
    """

    def __init__(self, quantizer: Quantizer, named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 process_set: hvd.ProcessSet = hvd.global_process_set,
                 min_elements: int = DEFAULT_MIN_ELEMENTS, exchange: Union[str, Exchange, None] = None,
                 error_feedback: Union[bool, float] = False) -> None:
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a horovod_truncq Quantizer, got {type(quantizer).__name__}")
        named = list(named_parameters)
        self.parameters = dict(named)
        if not self.parameters:
            raise ValueError("named_parameters is empty: the compressor needs the (name, parameter) pairs")
        if len(self.parameters) != len(named):
            repeated = sorted({name for name, _ in named if sum(n == name for n, _ in named) > 1})
            raise ValueError(f"named_parameters repeats the names {repeated}: every parameter needs a name of its own")
        if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
            raise ValueError(f"min_elements must be an int >= 0, got {min_elements!r}")
        if not (isinstance(error_feedback, bool) or
                isinstance(error_feedback, (int, float)) and 0 < error_feedback <= 1):
            raise ValueError(f"error_feedback must be True, False or the share of the residual kept, in (0, 1]; "
                             f"got {error_feedback!r}")
        decay = float(error_feedback)  # 0: off
        self.quantizer = quantizer.for_rank(hvd.rank())
        if decay:
            self.quantizer = self.quantizer.for_error_feedback()
        self.process_set = process_set
        self.min_elements = min_elements
        self.exchange = make_exchange(exchange)
        self.traffic = TrafficCounter()
        # Gradients usually become ready in the reverse order of registration: buckets follow it.
        self._quantized = [(name, p.numel()) for name, p in reversed(named)
                           if p.is_floating_point() and p.numel() >= min_elements]
        self.feedback = ErrorFeedback(decay) if decay else None
        self.exchange.prepare(self._quantized, process_set, self.traffic, self.feedback)
        self._id = next(_compressor_ids)
        self._agreed = False
        self._last_name = ""
        self._next_name: dict[str, str] = {}  # learned hook order: the name found after each name

    def __repr__(self) -> str:
        return (f"ExchangeCompressor({self.quantizer!r}, exchange={self.exchange!r}, "
                f"min_elements={self.min_elements}, error_feedback={self.feedback.decay if self.feedback else False}, "
                f"parameters={len(self.parameters)})")

    def state_dict(self) -> dict:
        """This rank's state: noise steps and residuals (empty without error feedback)."""
        return {"rank": self.quantizer.rank, "steps": dict(self.quantizer._steps),
                "residuals": self.feedback.state_dict() if self.feedback is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`. Residuals saved by another rank (a checkpoint written by rank 0 and
        loaded everywhere) are not this rank's: they are dropped, with a warning, and restart at zero."""
        self.quantizer._steps.clear()  # the dict the second quantizer of an exchange shares
        self.quantizer._steps.update(state["steps"])
        if self.feedback is None:
            return
        if state["rank"] != self.quantizer.rank:
            log.warning("horovod_truncq: rank %d loaded the error-feedback residuals of rank %d; they are "
                        "dropped and restart at zero (save every rank's optimizer.state_dict() to resume "
                        "exactly)", self.quantizer.rank, state["rank"])
            self.feedback.load_state_dict({})
        else:
            self.feedback.load_state_dict(state["residuals"])

    def _agree(self) -> None:
        """Raise the same ValueError on every rank of the process set if their settings differ."""
        ranks = self.process_set.size()
        description = f"{self!r} quantized={self._quantized}"
        digest = torch.tensor(list(hashlib.blake2b(description.encode(), digest_size=16).digest()), dtype=torch.uint8)
        digests = hvd.allgather(digest.view(1, -1), name=f"truncq.agree.{self._id}", process_set=self.process_set)
        self._agreed = True
        if bool((digests == digests[0]).all()):
            return
        raw = description.encode()[:_DESCRIPTION_BYTES].ljust(_DESCRIPTION_BYTES)
        texts = hvd.allgather(torch.tensor(list(raw), dtype=torch.uint8).view(1, -1),
                              name=f"truncq.agree.{self._id}.describe", process_set=self.process_set)
        lines = "\n".join(f"  rank {r}: {bytes(row.tolist()).decode(errors='replace').strip()}"
                          for r, row in zip(range(ranks), texts))
        raise ValueError(f"horovod_truncq: the ranks of the process set disagree on the compressor settings "
                         f"(ranks are numbered within the process set):\n{lines}")

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
                                 f"named_parameters to the compressor and to DistributedOptimizer")
            self._next_name[self._last_name] = name
        self._last_name = name
        return name

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, _Context]:
        if tensor.is_sparse:
            raise ValueError("horovod_truncq does not quantize sparse gradients; use sparse_as_dense=False "
                             "with Horovod's own compression for sparse parameters")
        if not self._agreed:
            self._agree()
        ranks = self.process_set.size()
        if torch.is_floating_point(tensor):
            self.traffic.add_gradient(tensor.numel(), ranks)
        if not torch.is_floating_point(tensor) or tensor.numel() < self.min_elements:
            sent = tensor.float() if torch.is_floating_point(tensor) else tensor
            self.traffic.add_transfer(ring_allreduce_bytes(sent.numel() * sent.element_size(), ranks))
            return sent, _Context(self, None, tensor.shape, tensor.dtype, "")
        name = self._name_of(tensor)
        wait = self.exchange.submit(tensor, self.quantizer, name)
        self.traffic.add_transfer(ring_allreduce_bytes(PLACEHOLDER_BYTES, ranks))
        placeholder = torch.full((1,), float(self.process_set.rank() + 1), dtype=torch.float32, device=tensor.device)
        return placeholder, _Context(self, wait, tensor.shape, tensor.dtype, name)

    def decompress(self, tensor: torch.Tensor, ctx: _Context) -> torch.Tensor:
        if ctx.wait is None:
            return tensor.to(ctx.dtype)
        total = ctx.wait()
        ranks = self.process_set.size()
        reduced = float(tensor)
        if math.isclose(reduced, (ranks + 1) / 2, rel_tol=1e-4):
            total = total.div_(ranks)  # a tensor of its own: in place, no second allocation
        elif not math.isclose(reduced, ranks * (ranks + 1) / 2, rel_tol=1e-4):
            raise ValueError(f"parameter {ctx.name!r}: horovod_truncq supports op=hvd.Average and hvd.Sum only "
                             f"(the placeholder came back as {reduced})")
        return total.view(ctx.shape).to(ctx.dtype)
