"""Gradients that arrive one tensor at a time (Horovod's hooks), gathered into fixed buckets.

A bucket goes out when its last gradient arrives. The first wait of a step sends every bucket still
incomplete, with zeros for gradients that did not arrive, so no rank waits for a bucket that never
fills, then runs the remaining stages bucket by bucket, in the same order on every rank. The step
ends when every gradient submitted has been taken; the state's step counter then moves on.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reducer import STAGES, Bucket, Flight, Reducer
from .state import State

Waiter = Callable[[], torch.Tensor]


class TensorBuckets:
    """Per-tensor submission into the buckets of a Reducer."""

    def __init__(self, reducer: Reducer, buckets: list[Bucket], state: State) -> None:
        self.reducer, self.buckets, self.state = reducer, buckets, state
        self.bucket_of = {name: bucket for bucket in buckets for name in bucket.names}
        self.slot_of = {name: (index, offset) for bucket in buckets
                        for index, (name, offset) in enumerate(zip(bucket.names, bucket.offsets()))}
        self._new_step()

    def restart(self) -> None:
        """Forget a step that did not finish (an exception, a checkpoint reload)."""
        self._new_step()

    def _new_step(self) -> None:
        self._staged: dict[int, dict[str, torch.Tensor]] = {bucket.index: {} for bucket in self.buckets}
        self._flights: dict[int, Flight] = {}
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._outstanding = 0
        self._draining = False
        self._device = torch.device("cpu")

    def submit(self, name: str, gradient: torch.Tensor) -> Waiter:
        """Start sending `gradient`; the waiter returns the float32 sum over ranks (1-D)."""
        bucket = self.bucket_of.get(name)
        if bucket is None:
            raise ValueError(f"parameter {name!r} is not among the quantized gradients this exchange was made for")
        if self._draining:
            raise RuntimeError(f"parameter {name!r} was submitted while the step's results were being taken")
        staged = self._staged[bucket.index]
        if name in staged or bucket.index in self._flights:
            raise ValueError(f"parameter {name!r} was submitted twice in one step")
        staged[name] = gradient
        self._device = gradient.device
        self._outstanding += 1
        if len(staged) == len(bucket.names):
            self._launch(bucket)
        return lambda: self._wait(bucket, name)

    def _launch(self, bucket: Bucket) -> None:
        staged = self._staged[bucket.index]
        parts = [staged[name].reshape(-1).float() if name in staged else torch.zeros(size, device=self._device)
                 for name, size in zip(bucket.names, bucket.sizes)]
        parts.append(torch.zeros(self.reducer.padded_numel(bucket) - bucket.numel, device=self._device))
        self._staged[bucket.index] = {}  # the gradients need not outlive the backward pass
        self._flights[bucket.index] = self.reducer.start(bucket, torch.cat(parts))

    def _drain(self) -> None:
        self._draining = True
        for bucket in self.buckets:
            if bucket.index not in self._flights:
                self._launch(bucket)
        flights = [self._flights[bucket.index] for bucket in self.buckets]
        while any(flight.stage < STAGES for flight in flights):
            for flight in flights:  # one stage of every bucket before the next: collectives start early
                self.reducer.advance(flight)

    def _wait(self, bucket: Bucket, name: str) -> torch.Tensor:
        if not self._draining:
            self._drain()
        if bucket.index not in self._results:
            self._results[bucket.index] = self.reducer.finish(self._flights[bucket.index])
        values, present = self._results[bucket.index]
        slot, offset = self.slot_of[name]
        size = bucket.sizes[slot]
        mine = values[offset:offset + size] * present[slot]  # a tensor of its own; exact zeros if unused
        self._outstanding -= 1
        if self._outstanding == 0:
            self.state.step += 1
            self._new_step()
        return mine
