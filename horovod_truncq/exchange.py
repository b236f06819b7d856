"""How quantized gradients move between ranks.

An exchange takes one rank's gradient and a quantizer, starts the collectives (asynchronously,
named deterministically) and later hands back the sum of every rank's dequantized gradient. The
compressor (compressor.py) only knows this interface, so a strategy with other traffic, such as an
alltoall of quantized chunks followed by an allgather of re-quantized reduced chunks, fits in
without touching the quantizers or the optimizer glue.
"""
from __future__ import annotations

from typing import Callable, Protocol

import horovod.torch as hvd
import torch

from .quantizers import Quantizer

Waiter = Callable[[], torch.Tensor]


class Exchange(Protocol):
    name: str

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str, process_set) -> Waiter:
        """Start sending `tensor`; the returned callable blocks and returns the float32 sum over ranks."""

    def sent_bytes(self, quantizer: Quantizer, numel: int, ranks: int) -> int:
        """Bytes this rank contributes to the exchange's collectives for one tensor."""


class AllgatherExchange:
    """Every rank allgathers every rank's payload, decodes each one and sums them.

    A rank contributes one payload (quantizer.payload_size(numel) bytes); it receives ranks - 1
    payloads, so the bytes each rank receives grow with the number of ranks. Payloads of one tensor
    have the same size on every rank, which keeps NCCL on its single-call path.
    """

    name = "allgather"

    def submit(self, tensor: torch.Tensor, quantizer: Quantizer, name: str, process_set) -> Waiter:
        payload = quantizer.encode(tensor, name=name)
        handle = hvd.allgather_async(payload, name=f"truncq.allgather.{name}", process_set=process_set)
        numel, size = tensor.numel(), payload.numel()

        def wait() -> torch.Tensor:
            gathered = hvd.synchronize(handle)
            ranks = process_set.size()
            if gathered.numel() != ranks * size:
                raise ValueError(f"parameter {name!r}: ranks sent payloads of different sizes "
                                 f"({gathered.numel()} bytes from {ranks} ranks, {size} from this one): "
                                 f"they disagree on scheme, bits or tensor size")
            try:
                return quantizer.decode_sum(gathered.view(ranks, size), (numel,))
            except ValueError as error:
                raise ValueError(f"parameter {name!r}: a rank's payload does not match {quantizer!r} "
                                 f"(rows are ranks of the process set): {error}") from error

        return wait

    def sent_bytes(self, quantizer: Quantizer, numel: int, ranks: int) -> int:
        return quantizer.payload_size(numel)
