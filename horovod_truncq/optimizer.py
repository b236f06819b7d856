"""The Horovod front end: `htq.DistributedOptimizer`, and a quantizer given straight to Horovod's own.

`DistributedOptimizer` builds its class as Horovod builds its own (the user's optimizer class with
Horovod's methods), with the per-parameter step replaced: it knows each gradient's name and the
reduction, and hands quantized gradients to the exchange instead of an allreduce. Small tensors
(fewer than `min_elements`) take Horovod's ordinary fp32 allreduce.

`hvd.DistributedOptimizer(..., compression=htq.TNQSGD(bits=3))` works too: Horovod then calls the
quantizer's compress from its own per-parameter step, which this module recognises (the calling
method's code and its `self` and `p`); compress starts the exchange and gives Horovod a one-element
placeholder to allreduce, and decompress waits for the exchange.
"""
from __future__ import annotations

import sys
import weakref
from typing import Iterable, Optional, Union

import horovod.torch as hvd
import torch
from horovod.torch.optimizer import _DistributedAdasumOptimizer, _DistributedOptimizer

from .exchange import TwoPhaseExchange, make_exchange
from .horovod_group import HorovodGroup
from .quantizers import Quantizer
from .reducer import Reducer, plan_buckets
from .staging import TensorBuckets, Waiter
from .state import State, agree, front_end_options
from .traffic import TrafficCounter, ring_allreduce_bytes

STATE_KEY = "horovod_truncq"
DEFAULT_MIN_ELEMENTS = 1024
PLACEHOLDER_BYTES = 4


def _check_op(op) -> None:
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("horovod_truncq quantizers support op=hvd.Average and hvd.Sum; Adasum, Min, Max "
                         "and Product need the exact gradients")


class Session:
    """The quantized exchange of one optimizer: which parameters it carries, the reducer, the state.

    Args:
        quantizer: the codec.
        named_parameters: (name, parameter) pairs, in the order of the optimizer's param groups.
        process_set: results are summed (or averaged) over its ranks.
        min_elements: tensors with fewer elements go through Horovod's fp32 allreduce.
        exchange: "two-phase" (default), "node-aware", or an instance of either.
        error_feedback: True, False or the share of the residual kept (feedback.py).
        average: divide the sum by the number of ranks (op=hvd.Average).
    Construction is collective: the ranks exchange their nodes and compare their settings.
    """

    def __init__(self, quantizer: Quantizer, named_parameters: Iterable[tuple[str, torch.Tensor]],
                 process_set: hvd.ProcessSet = hvd.global_process_set, min_elements: int = DEFAULT_MIN_ELEMENTS,
                 exchange: Union[str, TwoPhaseExchange, None] = None, error_feedback: Union[bool, float] = False,
                 average: bool = True) -> None:
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"compression must be a horovod_truncq quantizer, got {type(quantizer).__name__}")
        decay = front_end_options(min_elements, error_feedback)
        named = list(named_parameters)
        names = [name for name, _ in named]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"named_parameters repeats the names {repeated}: every parameter needs a name of its own")
        exchange = make_exchange(exchange)
        self.min_elements = min_elements
        self.group = HorovodGroup(process_set)
        # Gradients usually become ready in the reverse order of registration: buckets follow it.
        self.quantized = [(name, p.numel()) for name, p in reversed(named)
                          if p.requires_grad and p.is_floating_point() and p.numel() >= min_elements]
        settings = (f"{quantizer!r} exchange={exchange!r} min_elements={min_elements} error_feedback={decay} "
                    f"average={average} quantized={self.quantized}")
        self.state = State(settings, quantizer.seed, self.group.rank, decay)
        agree(self.group, settings)
        self.reducer = Reducer(quantizer, exchange, self.group, self.state)
        self.buckets = TensorBuckets(self.reducer, plan_buckets(self.quantized, exchange.bucket_bytes), self.state,
                                     joinable=True, average=average)
        self.carries = {name for name, _ in self.quantized}

    @property
    def traffic(self) -> TrafficCounter:
        return self.state.traffic

    def count_unquantized(self, tensor: torch.Tensor) -> None:
        self.traffic.add_gradient(tensor.numel(), self.group.size)
        self.traffic.add_transfer(ring_allreduce_bytes(tensor.numel() * 4, self.group.size))

    def submit(self, name: str, gradient: torch.Tensor, computed: bool = True) -> Waiter:
        """Start the exchange of a quantized gradient (`computed` False: zeros standing in for a
        gradient this rank did not compute); the waiter returns the result in its shape and dtype."""
        self.traffic.add_gradient(gradient.numel(), self.group.size)
        wait = self.buckets.submit(name, gradient, computed)
        shape, dtype = gradient.shape, gradient.dtype
        return lambda: wait().view(shape).to(dtype)

    def restart_step(self) -> None:
        """Forget a step that did not finish (an exception, a checkpoint reload)."""
        self.buckets.restart()


def _sparse_error(name: str) -> ValueError:
    return ValueError(f"parameter {name!r} has a sparse gradient, which horovod_truncq does not quantize; pass "
                      f"sparse_as_dense=True to the optimizer, give it dense gradients (nn.Embedding(sparse=False)), "
                      f"or use Horovod's own compression for it")


class _QuantizedOptimizer(_DistributedOptimizer):
    """Horovod's _DistributedOptimizer with quantized gradients; its methods go into the class that
    DistributedOptimizer makes, as Horovod's own go into Horovod's."""

    def __init__(self, params, named_parameters, session_options: dict, backward_passes_per_step: int,
                 op, gradient_predivide_factor: float, sparse_as_dense: bool, process_set: hvd.ProcessSet) -> None:
        _DistributedOptimizer.__init__(self, params, named_parameters, hvd.Compression.none,
                                       backward_passes_per_step=backward_passes_per_step, op=op,
                                       gradient_predivide_factor=gradient_predivide_factor, groups=None,
                                       sparse_as_dense=sparse_as_dense, process_set=process_set)
        self._truncq: Optional[Session] = None
        self._truncq_missing: set = set()
        if process_set.included():
            named = [(self._parameter_names[p], p) for group in self.param_groups for p in group["params"]]
            self._truncq = Session(named_parameters=named, process_set=process_set, average=op == hvd.Average,
                                   **session_options)

    @property
    def traffic(self) -> Optional[TrafficCounter]:
        """Bytes this rank sent and received (`traffic.take()`), next to fp32's."""
        return self._truncq.traffic if self._truncq is not None else None

    def _allreduce_grad_async(self, p):
        self._truncq.buckets.count_ranks()
        name = self._parameter_names.get(p)
        if name not in self._truncq.carries:
            if p.grad is not None and p.grad.is_floating_point():
                self._truncq.count_unquantized(p.grad)
            return _DistributedOptimizer._allreduce_grad_async(self, p)
        computed = p not in self._truncq_missing
        if p.grad is None:  # as Horovod: another rank may have computed it
            p.grad = p.data.new(p.size()).zero_()
        gradient = p.grad
        if gradient.is_sparse:
            if not self.sparse_as_dense:
                raise _sparse_error(name)
            gradient = gradient.to_dense()
        return self._truncq.submit(name, gradient, computed), None

    def synchronize(self) -> None:
        # the parameters whose hook did not fire this step: Horovod submits zeros for them
        self._truncq_missing = self._requires_update - set(self._handles)
        try:
            _DistributedOptimizer.synchronize(self)
        finally:
            self._truncq_missing = set()

    def state_dict(self) -> dict:
        """The optimizer's state and, under "horovod_truncq", this rank's exchange state (seed, step,
        error-feedback residuals): save every rank's to resume exactly."""
        state = super(self.__class__, self).state_dict()
        if self._truncq is not None:
            state[STATE_KEY] = self._truncq.state.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        exchange_state = state_dict.pop(STATE_KEY, None)
        _DistributedOptimizer.load_state_dict(self, state_dict)  # also forgets a step in flight
        if self._truncq is not None:
            self._truncq.restart_step()
            if exchange_state is not None:
                self._truncq.state.load_state_dict(exchange_state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Horovod's zero_grad with torch's `set_to_none` argument (Horovod 0.28.1 takes none)."""
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(): that would race with the exchange")
        super(self.__class__, self).zero_grad(set_to_none=set_to_none)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=hvd.Compression.none, backward_passes_per_step: int = 1,
                         op=hvd.Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups=None, sparse_as_dense: bool = False,
                         process_set: hvd.ProcessSet = hvd.global_process_set, *,
                         min_elements: int = DEFAULT_MIN_ELEMENTS,
                         exchange: Union[str, TwoPhaseExchange, None] = None,
                         error_feedback: Union[bool, float] = False) -> torch.optim.Optimizer:
    """hvd.DistributedOptimizer with Horovod's signature; with a quantizer as `compression`, gradients
    of at least `min_elements` elements go through the quantized `exchange` ("two-phase" by default,
    or "node-aware", or an instance of TwoPhaseExchange or NodeAwareExchange), with `error_feedback`
    (True, or the share of the residual kept, in (0, 1]). Buckets replace Horovod's `groups` and
    `num_groups`, which are then ignored. `state_dict()` holds this rank's exchange state under
    "horovod_truncq"; the optimizer has `.traffic`, the byte counter. Supports op=hvd.Average and
    hvd.Sum (anything else raises a ValueError here); a sparse gradient raises one at the first
    backward pass, naming the parameter, unless sparse_as_dense=True.

    Any other `compression` (hvd.Compression.none, fp16) goes to Horovod untouched."""
    if not isinstance(compression, Quantizer):
        if min_elements != DEFAULT_MIN_ELEMENTS or exchange is not None or error_feedback:
            raise ValueError("min_elements, exchange and error_feedback apply to horovod_truncq quantizers only")
        return hvd.DistributedOptimizer(
            optimizer, named_parameters=named_parameters, compression=compression,
            backward_passes_per_step=backward_passes_per_step, op=op,
            gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups, groups=groups,
            sparse_as_dense=sparse_as_dense, process_set=process_set)
    _check_op(op)
    methods = {**_DistributedOptimizer.__dict__, **_QuantizedOptimizer.__dict__}
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), methods)
    options = dict(quantizer=compression, min_elements=min_elements, exchange=exchange, error_feedback=error_feedback)
    return cls(optimizer.param_groups, named_parameters, options, backward_passes_per_step, op,
               gradient_predivide_factor, sparse_as_dense, process_set)


# ---------------------------------------------------------------- the quantizer given to Horovod's own optimizer
_CALLERS = {getattr(_DistributedOptimizer, method).__code__
            for method in ("_allreduce_grad_async", "_grouped_allreduce_grad_async")}
_SYNCHRONIZE = _DistributedOptimizer.synchronize.__code__


def _calling_step() -> tuple[object, torch.Tensor, bool]:
    """(optimizer, parameter, whether this rank computed its gradient) of the Horovod per-parameter
    step that called compress. The grouped step calls it from a list comprehension, a frame of its
    own before Python 3.12. Horovod's synchronize submits zeros for parameters whose hook did not
    fire this step (and only those are not among its handles yet)."""
    frame, parameter = sys._getframe(3), None
    for _ in range(3):
        if frame is None:
            break
        parameter = frame.f_locals.get("p", parameter)
        if frame.f_code is _DistributedAdasumOptimizer._allreduce_grad_async.__code__:
            _check_op(hvd.Adasum)
        if frame.f_code in _CALLERS:
            optimizer = frame.f_locals["self"]
            missing = frame.f_back.f_code is _SYNCHRONIZE and parameter not in optimizer._handles
            return optimizer, parameter, not missing
        frame = frame.f_back
    raise TypeError("a horovod_truncq quantizer's compress is called by hvd.DistributedOptimizer "
                    "(compression=q); to quantize a tensor yourself, use q.encode and q.decode")


class HorovodCompression:
    """Horovod's Compressor protocol for one quantizer (Quantizer.compress and decompress)."""

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer

    def _session(self, optimizer) -> Session:
        session = getattr(optimizer, "_truncq_session", None)
        if session is None:
            _check_op(optimizer.op)
            names = optimizer._parameter_names
            named = [(names[p], p) for group in optimizer.param_groups for p in group["params"] if p in names]
            session = Session(self.quantizer, named, process_set=optimizer.process_set,
                              average=optimizer.op == hvd.Average)
            optimizer._truncq_session = session
        return session

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        optimizer, parameter, computed = _calling_step()
        session = self._session(optimizer)
        session.buckets.count_ranks()
        name = optimizer._parameter_names[parameter]
        if not tensor.is_floating_point() or name not in session.carries:
            if tensor.is_floating_point():
                session.count_unquantized(tensor)
            return tensor, ("unquantized", tensor.dtype)
        session.traffic.add_transfer(ring_allreduce_bytes(PLACEHOLDER_BYTES, session.group.size))
        return torch.zeros(1, device=tensor.device), ("quantized", session.submit(name, tensor, computed))

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        if ctx is None:  # Horovod's sparse path, which never calls compress
            raise ValueError("a sparse gradient reached a horovod_truncq quantizer, which does not quantize "
                             "sparse gradients; pass sparse_as_dense=True to the optimizer, or give it dense "
                             "gradients (nn.Embedding(sparse=False))")
        kind, value = ctx
        return value() if kind == "quantized" else tensor.to(value)


_adapters: "weakref.WeakKeyDictionary[Quantizer, HorovodCompression]" = weakref.WeakKeyDictionary()


def compression_for(quantizer: Quantizer) -> HorovodCompression:
    """The Horovod Compressor of `quantizer` (one per quantizer)."""
    adapter = _adapters.get(quantizer)
    if adapter is None:
        adapter = _adapters.setdefault(quantizer, HorovodCompression(quantizer))
    return adapter
