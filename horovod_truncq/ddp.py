"""The torch DDP front end: a communication hook over the same codec and exchange.

    import horovod_truncq as htq
    state = htq.ddp.State(htq.TNQSGD(bits=3), exchange="node-aware")
    model.register_comm_hook(state, htq.ddp.hook)

DDP hands the hook each gradient bucket as it becomes ready during the backward pass, in the same
order on every rank. The hook passes it to a thread of this step, which starts each bucket as soon
as DDP hands it over and takes it as far as its gather (the last transfer between nodes) before
taking the next: a bucket's transfers overlap the backward pass of the layers before it and the
next bucket's encoding. The decoding of every bucket waits for the last one, when the backward pass
has nothing left to overlap. torch.distributed pairs collectives by the order they are issued, not
by name, so one thread issues them all, in an order that depends on the buckets alone, the same on
every rank; the hook of the last bucket waits for that thread, so that no collective of the step is
issued after it returns (DDP's own collectives come next). Buckets smaller than `min_elements` take
the plain fp32 allreduce.
An error in a bucket's exchange fails its future and those of the step's later buckets: DDP raises
it from backward().

DDP does not tell which gradients were computed: a tensor that is zero on every rank (an unused
parameter under find_unused_parameters=True) is the one that comes back exactly zero, at the price
of one pass over the bucket.

DDP rebuilds its buckets after the first iteration: the hook keys its layout by bucket index and
starts a bucket afresh (its error-feedback residuals dropped) when its tensors change. The layout is
DDP's, identical on every rank.

Checkpoints: save `state.state_dict()` on every rank next to the model and optimizer, and give it
to `load_state_dict` of a new State before training resumes: the noise seed and step, and the
error-feedback residuals, then continue exactly where DDP's first buckets (before its rebuild) are
the ones it trained with; a bucket laid out otherwise restarts its residuals. A state saved by
another rank keeps this rank's seed and drops the residuals (with a warning).

A bucket holds several layers; each of its W chunks gets one threshold (or norm). Where the layers'
gradients differ much in scale, the truncated schemes clip the larger layer's tail: in
tests/workers/ddp_worker.py's model, one 8-bit bucket left the output layer's gradient 12% off
DDP's allreduce, against 1.4% with a bucket per layer (`bucket_cap_mb`).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
import contextlib
import queue
import threading
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from .exchange import TwoPhaseExchange, make_exchange
from .quantizers import Quantizer
from .reducer import GATHERING, Bucket, Flight, Reducer
from .state import State as RunState
from .state import agree, front_end_options
from .torch_group import TorchGroup
from .traffic import TrafficCounter, ring_allreduce_bytes

DEFAULT_MIN_ELEMENTS = 1024


class _Job(NamedTuple):
    """One of DDP's buckets, as the hook hands it to the step's thread."""

    index: int
    sizes: tuple[int, ...]
    buffer: torch.Tensor
    last: bool
    future: torch.futures.Future
    stream: Optional["torch.cuda.Stream"]  # on CUDA, the backward pass's stream: the exchange runs on it


class State:
    """What the hook needs, made once on every rank after the process group (collective: the ranks
    compare their settings and raise the same ValueError on each if they differ).

    Args:
        quantizer: the codec, e.g. htq.TNQSGD(bits=3).
        exchange: "two-phase" (default), "node-aware", or an instance of htq.TwoPhaseExchange or
            htq.NodeAwareExchange (their bucket_bytes does not apply: DDP's bucket_cap_mb sets the buckets).
        min_elements: buckets with fewer elements take the plain fp32 allreduce (default 1024).
        error_feedback: False (default), True, or the share of the residual kept, in (0, 1].
        process_group: default the whole world.
        ranks_per_node: default torchrun's LOCAL_WORLD_SIZE (node-aware arranges ranks by node).
    """

    def __init__(self, quantizer: Quantizer, exchange: Union[str, TwoPhaseExchange, None] = None,
                 min_elements: int = DEFAULT_MIN_ELEMENTS, error_feedback: Union[bool, float] = False,
                 process_group: Optional[dist.ProcessGroup] = None, ranks_per_node: Optional[int] = None) -> None:
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a horovod_truncq quantizer, got {type(quantizer).__name__}")
        decay = front_end_options(min_elements, error_feedback)
        exchange = make_exchange(exchange)
        self.group = TorchGroup(process_group, ranks_per_node)
        self.min_elements = min_elements
        settings = (f"{quantizer!r} exchange={exchange!r} min_elements={min_elements} "
                    f"error_feedback={decay} nodes={self.group.nodes}")
        self.run = RunState(settings, quantizer.seed, self.group.rank, decay)
        agree(self.group, settings)
        self.reducer = Reducer(quantizer, exchange, self.group, self.run)
        self.layouts: dict[int, Bucket] = {}
        self._jobs: "queue.Queue[_Job]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    @property
    def traffic(self) -> TrafficCounter:
        """Bytes this rank sent and received (`traffic.take()`), next to an fp32 ring allreduce's."""
        return self.run.traffic

    def state_dict(self) -> dict:
        return self.run.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.run.load_state_dict(state)

    def submit(self, job: _Job) -> None:
        """Hand a bucket to the step's thread (started with the step's first bucket); after the last
        one, wait for that thread: every future of the step is then complete."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="horovod_truncq.ddp", daemon=True)
            self._thread.start()
        self._jobs.put(job)
        if job.last:
            self._thread.join()
            self._thread = None
            self.run.step += 1

    def _serve(self) -> None:
        """The step's thread. Each bucket starts when DDP hands it over and advances until its gather
        (the last transfer between nodes) is under way; the thread then takes the next bucket, so
        that one bucket's transfers run beside the next one's encoding and the backward pass. After
        the last bucket, every bucket's remaining stages run together (Reducer.advance_all)."""
        flights: list[tuple[_Job, Flight]] = []
        error: Optional[Exception] = None
        while True:
            job = self._jobs.get()
            if error is None:
                try:
                    with torch.cuda.stream(job.stream) if job.stream is not None else contextlib.nullcontext():
                        flight = self._start(job)
                        if flight is not None:
                            flights.append((job, flight))
                        if job.last:
                            results = self.reducer.finish_all([flight for _, flight in flights])
                            for (started, _), (values, present) in zip(flights, results):
                                started.future.set_result(self._average(started, values, present))
                        else:
                            self.reducer.advance_all([flight for _, flight in flights], GATHERING)
                except Exception as failure:  # raised to DDP through the futures, by backward()
                    error = failure
            if error is not None:
                for started in [started for started, _ in flights] + [job]:
                    if not started.future.done():
                        started.future.set_exception(error)
            if job.last:
                return

    def _layout(self, index: int, sizes: tuple[int, ...]) -> Bucket:
        """Our layout of DDP's bucket; a new one, with its residuals dropped, where DDP rebuilt it."""
        layout = self.layouts.get(index)
        if layout is None or layout.sizes != sizes:
            rebuilt = layout is not None
            layout = Bucket(index, tuple(f"ddp.{index}.{j}" for j in range(len(sizes))), sizes)
            if rebuilt and self.run.feedback is not None:
                for stream in ("scatter", "gather"):
                    self.run.feedback.residuals.pop(f"{layout.name}.{stream}", None)
            self.layouts[index] = layout
        return layout

    def _start(self, job: _Job) -> Optional[Flight]:
        """The bucket's exchange under way; None where it took the plain fp32 allreduce (done, its
        future completed)."""
        buffer, ranks = job.buffer, self.group.size
        self.traffic.add_gradient(buffer.numel(), ranks)
        if buffer.numel() < self.min_elements or not buffer.is_floating_point():
            self.traffic.add_transfer(ring_allreduce_bytes(4 * buffer.numel(), ranks))
            dist.all_reduce(buffer.div_(ranks), group=self.group.process_group)
            job.future.set_result(buffer)
            return None
        layout, flat = self._layout(job.index, job.sizes), buffer.reshape(-1).float()
        return self.reducer.start(layout, flat, self.reducer.presence(layout, flat))

    def _average(self, job: _Job, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The bucket's average over ranks from its sum, written into DDP's bucket buffer (the sum's
        memory is the reducer's, reused next step)."""
        layout = self.layouts[job.index]
        divisors = self.group.size / present  # inf where no rank had a gradient: exact zeros there
        average = job.buffer.view(-1)
        for slot, (offset, size) in enumerate(zip(layout.offsets(), layout.sizes)):
            torch.div(values[offset:offset + size], divisors[slot], out=average[offset:offset + size])
        return job.buffer


def hook(state: State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's average over ranks, through the quantized exchange."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    sizes = tuple(p.numel() for p in bucket.parameters())
    buffer = bucket.buffer()
    stream = torch.cuda.current_stream(buffer.device) if buffer.is_cuda else None
    state.submit(_Job(bucket.index(), sizes, buffer, bucket.is_last(), future, stream))
    return future
