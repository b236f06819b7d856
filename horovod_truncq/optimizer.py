"""`horovod_truncq.DistributedOptimizer`: Horovod's, with a quantizer wired in as compression."""
from __future__ import annotations

import functools
import types
from typing import Union

import horovod.torch as hvd
import torch

from .compressor import DEFAULT_MIN_ELEMENTS, ExchangeCompressor
from .exchange import Exchange
from .quantizers import Quantizer

STATE_KEY = "horovod_truncq"


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=hvd.Compression.none, backward_passes_per_step: int = 1,
                         op=hvd.Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups=None, sparse_as_dense: bool = False,
                         process_set: hvd.ProcessSet = hvd.global_process_set, *,
                         min_elements: int = DEFAULT_MIN_ELEMENTS,
                         exchange: Union[str, Exchange, None] = None,
                         error_feedback: Union[bool, float] = False) -> torch.optim.Optimizer:
    """hvd.DistributedOptimizer with Horovod's signature; a Quantizer as `compression` is bound to
    the parameters (see ExchangeCompressor for `min_elements`, `exchange` ("two-phase" by default,
    "node-aware" or "allgather") and `error_feedback`).

    With a quantizer, `state_dict()` also holds the compressor's state under "horovod_truncq" (noise
    steps, error-feedback residuals: this rank's own), and `load_state_dict` restores it, so a run
    resumed from every rank's checkpoint continues exactly.

    Any other `compression` (hvd.Compression.none, fp16) goes to Horovod untouched. The returned
    optimizer has `.traffic`, the byte counter (None without a quantizer), and its zero_grad takes
    torch's `set_to_none`. Supports op=hvd.Average and hvd.Sum; hvd.Adasum raises a ValueError at
    construction, and a sparse gradient (nn.Embedding(sparse=True)) raises one at the first backward
    pass, naming the parameter.
    """
    traffic = None
    if isinstance(compression, Quantizer):
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError("horovod_truncq quantizers support op=hvd.Average and hvd.Sum; Adasum, Min, Max "
                             "and Product need the exact gradients")
        if sparse_as_dense:
            raise ValueError("horovod_truncq quantizers do not handle sparse gradients (sparse_as_dense=True)")
        if named_parameters is None:
            # Horovod's own naming for unnamed parameters: their order in the param groups.
            named_parameters = [(f"noname.{i}", p) for i, p in
                                enumerate(p for group in optimizer.param_groups for p in group["params"])]
        else:
            named_parameters = list(named_parameters)
        compression = ExchangeCompressor(compression, named_parameters, process_set=process_set,
                                         min_elements=min_elements, exchange=exchange,
                                         error_feedback=error_feedback)
        traffic = compression.traffic
    distributed = hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters, compression=compression,
        backward_passes_per_step=backward_passes_per_step, op=op,
        gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups, groups=groups,
        sparse_as_dense=sparse_as_dense, process_set=process_set)
    distributed.traffic = traffic
    distributed.zero_grad = types.MethodType(_zero_grad, distributed)
    if traffic is not None:
        distributed._sparse_allreduce_grad_async = types.MethodType(_refuse_sparse, distributed)
        distributed.state_dict = functools.partial(_state_dict, compression, distributed)
        distributed.load_state_dict = functools.partial(_load_state_dict, compression, distributed)
    return distributed


def _state_dict(compressor: ExchangeCompressor, self: torch.optim.Optimizer) -> dict:
    return {**super(type(self), self).state_dict(), STATE_KEY: compressor.state_dict()}


def _load_state_dict(compressor: ExchangeCompressor, self: torch.optim.Optimizer, state_dict: dict) -> None:
    state_dict = dict(state_dict)
    compressor_state = state_dict.pop(STATE_KEY, None)
    super(type(self), self).load_state_dict(state_dict)
    if compressor_state is not None:
        compressor.load_state_dict(compressor_state)


def _refuse_sparse(self: torch.optim.Optimizer, p: torch.Tensor, name: str):
    """Horovod sends sparse gradients down a path of their own that never reaches the compressor."""
    raise ValueError(f"parameter {name!r} has a sparse gradient, which horovod_truncq does not quantize; give it "
                     f"dense gradients (e.g. nn.Embedding(sparse=False)) or use Horovod's own optimizer for it")


def _zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    """Horovod's zero_grad with torch's `set_to_none` argument (Horovod 0.28.1 takes none)."""
    if self._handles:
        raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                             "optimizer.step() or optimizer.synchronize(): that would race with the exchange")
    super(type(self), self).zero_grad(set_to_none=set_to_none)
