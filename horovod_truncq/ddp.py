"""The torch DDP front end: a communication hook over the same codec and exchange.

    import horovod_truncq as htq
    state = htq.ddp.State(htq.TNQSGD(bits=3), exchange="node-aware")
    model.register_comm_hook(state, htq.ddp.hook)

DDP hands the hook each gradient bucket as it becomes ready during the backward pass, in the same
order on every rank. The hook starts the bucket's first collective at once (the node sum, or the
scatter of quantized chunks), so it overlaps the rest of the backward pass. torch.distributed pairs
collectives by the order they are issued, not by name, so the later stages of all buckets run in
one fixed order: when DDP hands over its last bucket, that hook runs them bucket by bucket and
completes every bucket's future. Buckets smaller than `min_elements` take DDP's plain fp32 allreduce.

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
from typing import Optional, Union

import torch
import torch.distributed as dist

from .exchange import TwoPhaseExchange, make_exchange
from .quantizers import Quantizer
from .reducer import Bucket, Flight, Reducer
from .state import State as RunState
from .state import agree, front_end_options
from .torch_group import TorchGroup
from .traffic import TrafficCounter, ring_allreduce_bytes

DEFAULT_MIN_ELEMENTS = 1024


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
        self.pending: list[tuple[Flight, torch.futures.Future, torch.Tensor]] = []

    @property
    def traffic(self) -> TrafficCounter:
        """Bytes this rank sent and received (`traffic.take()`), next to an fp32 ring allreduce's."""
        return self.run.traffic

    def state_dict(self) -> dict:
        return self.run.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.run.load_state_dict(state)

    def layout(self, bucket: dist.GradBucket) -> Bucket:
        """Our layout of DDP's bucket; a new one, with its residuals dropped, where DDP rebuilt it."""
        index = bucket.index()
        sizes = tuple(p.numel() for p in bucket.parameters())
        layout = self.layouts.get(index)
        if layout is None or layout.sizes != sizes:
            rebuilt = layout is not None
            layout = Bucket(index, tuple(f"ddp.{index}.{j}" for j in range(len(sizes))), sizes)
            if rebuilt and self.run.feedback is not None:
                for stream in ("scatter", "gather"):
                    self.run.feedback.residuals.pop(f"{layout.name}.{stream}", None)
            self.layouts[index] = layout
        return layout

    def finish_step(self) -> None:
        """Run the remaining stages of every bucket, one stage of all before the next, and complete
        their futures with the average over ranks."""
        pending, self.pending = self.pending, []
        results = self.reducer.finish_all([flight for flight, _, _ in pending])
        for (flight, future, buffer), (values, present) in zip(pending, results):
            divisors = self.group.size / present  # inf where no rank had a gradient: exact zeros there
            for slot, (offset, size) in enumerate(zip(flight.bucket.offsets(), flight.bucket.sizes)):
                values[offset:offset + size].div_(divisors[slot])
            future.set_result(values.to(buffer.dtype).view_as(buffer))
        self.run.step += 1


def hook(state: State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's average over ranks, through the quantized exchange."""
    buffer = bucket.buffer()
    ranks = state.group.size
    state.traffic.add_gradient(buffer.numel(), ranks)
    if buffer.numel() < state.min_elements or not buffer.is_floating_point():
        state.traffic.add_transfer(ring_allreduce_bytes(4 * buffer.numel(), ranks))
        work = dist.all_reduce(buffer.div_(ranks), group=state.group.process_group, async_op=True)
        future = work.get_future().then(lambda done: done.value()[0])
    else:
        layout, flat = state.layout(bucket), buffer.reshape(-1).float()
        flight = state.reducer.start(layout, flat, state.reducer.presence(layout, flat))
        future = torch.futures.Future()
        state.pending.append((flight, future, buffer))
    if bucket.is_last():
        state.finish_step()
    return future
