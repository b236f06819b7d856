"""Gradients that arrive one tensor at a time (Horovod's hooks), gathered into fixed buckets.

A bucket goes out when its last gradient arrives. The first wait of a step sends every bucket still
incomplete, with zeros for gradients that did not arrive, so no rank waits for a bucket that never
fills, then runs the remaining stages bucket by bucket, in the same order on every rank. The step
ends when every gradient submitted has been taken; the state's step counter then moves on.

With `joinable` (Horovod, whose `hvd.join()` lets ranks run different numbers of steps), each step
first counts the ranks still training with a one-element allreduce, in which a joined rank takes part
with a zero. The quantized exchange needs every rank (Horovod runs no alltoall while a rank has
joined), so a step with a joined rank sends its buckets through an fp32 allreduce instead, as
Horovod's own optimizer does: the joined ranks count as zeros.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .groups import Handle
from .reducer import Bucket, Flight, Reducer
from .state import State
from .traffic import ring_allreduce_bytes

Waiter = Callable[[], torch.Tensor]
log = logging.getLogger("horovod_truncq")


class TensorBuckets:
    """Per-tensor submission into the buckets of a Reducer."""

    def __init__(self, reducer: Reducer, buckets: list[Bucket], state: State, joinable: bool = False,
                 average: bool = False) -> None:
        self.reducer, self.buckets, self.state, self.joinable = reducer, buckets, state, joinable
        self.divisor = float(reducer.group.size) if average else 1.0
        self.bucket_of = {name: bucket for bucket in buckets for name in bucket.names}
        self._flags: dict[tuple, torch.Tensor] = {}
        self.slot_of = {name: (index, offset) for bucket in buckets
                        for index, (name, offset) in enumerate(zip(bucket.names, bucket.offsets()))}
        self._new_step()

    def restart(self) -> None:
        """Forget a step that did not finish (an exception, a checkpoint reload)."""
        self._new_step()

    def _new_step(self) -> None:
        self._staged: dict[int, dict[str, torch.Tensor]] = {bucket.index: {} for bucket in self.buckets}
        self._flights: dict[int, Flight] = {}
        self._fallbacks: dict[int, Handle] = {}  # fp32 allreduces of a step with a joined rank
        self._active: Optional[bool] = None  # with `joinable`: whether every rank trains this step
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._missing: set[str] = set()
        self._outstanding = 0
        self._draining = False
        self._device = torch.device("cpu")

    def submit(self, name: str, gradient: torch.Tensor, computed: bool = True) -> Waiter:
        """Start sending `gradient` (`computed` False: zeros standing in for a gradient this rank did
        not compute); the waiter returns the float32 sum over ranks (1-D)."""
        bucket = self.bucket_of.get(name)
        if bucket is None:
            raise ValueError(f"parameter {name!r} is not among the quantized gradients this exchange was made for")
        if self._draining:
            raise RuntimeError(f"parameter {name!r} was submitted while the step's results were being taken")
        staged = self._staged[bucket.index]
        if name in staged or bucket.index in self._flights or bucket.index in self._fallbacks:
            raise ValueError(f"parameter {name!r} was submitted twice in one step")
        staged[name] = gradient
        if not computed:
            self._missing.add(name)
        self._device = gradient.device
        self._outstanding += 1
        if len(staged) == len(bucket.names):
            self._launch(bucket)
        return lambda: self._wait(bucket, name)

    def _launch(self, bucket: Bucket) -> None:
        staged = self._staged[bucket.index]
        parts = [staged[name].reshape(-1).float() if name in staged else torch.zeros(size, device=self._device)
                 for name, size in zip(bucket.names, bucket.sizes)]
        self._staged[bucket.index] = {}  # the gradients need not outlive the backward pass
        if self._everyone_trains():
            flat = self.reducer.padded_input(bucket, self._device)
            torch.cat(parts, out=flat[:bucket.numel])
            self._flights[bucket.index] = self.reducer.start(bucket, flat, self._presence(bucket, staged))
        else:
            flat = torch.cat(parts)
            self.state.traffic.add_transfer(ring_allreduce_bytes(4 * flat.numel(), self.reducer.group.size))
            self._fallbacks[bucket.index] = self.reducer.group.allreduce(flat, f"truncq.joined.{bucket.name}")

    def _presence(self, bucket: Bucket, staged: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 flags of the bucket's tensors this rank computed; all ones, the usual case, made once."""
        flags = [name in staged and name not in self._missing for name in bucket.names]
        key = (bucket.index, self._device, tuple(flags))
        present = self._flags.get(key)
        if present is None:  # pinned: a copy to the GPU that the host need not wait for
            host = torch.tensor(flags, dtype=torch.uint8)
            present = host.pin_memory().to(self._device, non_blocking=True) if self._device.type == "cuda" else host
            if all(flags):
                self._flags[key] = present
        return present

    def count_ranks(self) -> None:
        """With `joinable`, once per step, before this rank starts any allreduce of the step (the
        front end calls it first thing in each per-gradient step): count the ranks still training.
        It waits for the count at once: Horovod corrupted the gradients of allreduces that ran
        beside it in the same cycle (seen with its MPI controller)."""
        if self.joinable and self._active is None:
            count = self.reducer.group.allreduce(torch.ones(1, dtype=torch.int32), "truncq.active").wait()
            self._active = int(count[0]) == self.reducer.group.size
            if not self._active:
                log.warning("horovod_truncq: a rank has joined (hvd.join); this step's quantized gradients go "
                            "through an fp32 allreduce")

    def _everyone_trains(self) -> bool:
        return self._active is None or self._active

    def _drain(self) -> None:
        self._draining = True
        for bucket in self.buckets:
            if bucket.index not in self._flights and bucket.index not in self._fallbacks:
                self._launch(bucket)
        self._results.update(zip(self._flights, self.reducer.finish_all(list(self._flights.values()))))

    def _wait(self, bucket: Bucket, name: str) -> torch.Tensor:
        if not self._draining:
            self._drain()
        if bucket.index not in self._results:  # a step with a joined rank
            total = self._fallbacks[bucket.index].wait()
            self._results[bucket.index] = (total, torch.ones(len(bucket.sizes), device=total.device))
        values, present = self._results[bucket.index]
        slot, offset = self.slot_of[name]
        size = bucket.sizes[slot]
        # one pass: a tensor of its own, the sum / divisor (bit for bit), exact zeros where no rank computed
        # it (divisor / 0 = inf; a NaN bucket stays NaN)
        mine = values[offset:offset + size] / (self.divisor / present[slot])
        self._outstanding -= 1
        if self._outstanding == 0:
            self.state.step += 1
            self._new_step()
        return mine
