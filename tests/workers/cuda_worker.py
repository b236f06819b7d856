"""Runs inside `horovodrun` on a CUDA machine: the exchanges carry CUDA gradients through Horovod built
with NCCL. Each rank prints "OK <check> <rank>" per check (tests/test_cuda.py).

The exchanges are driven directly: on a single rank Horovod's DistributedOptimizer registers no
gradient hooks, so it would exchange nothing."""
from __future__ import annotations

import warnings

import horovod.torch as hvd
import torch

import horovod_truncq as htq
from horovod_truncq.horovod_group import HorovodGroup
from horovod_truncq.reducer import Reducer, plan_buckets
from horovod_truncq.staging import TensorBuckets
from horovod_truncq.state import State

hvd.init()
torch.cuda.set_device(hvd.local_rank())
RANK, SIZE, SEED = hvd.rank(), hvd.size(), 1234


def gradients(rank: int = RANK) -> dict[str, torch.Tensor]:
    """Laplace-distributed CUDA gradients of a few sizes, rank `rank`'s."""
    torch.manual_seed(rank)
    sizes = {"conv.weight": 3 * 3 * 64 * 64, "fc.weight": 512 * 10 + 7, "big": 1 << 20}
    return {n: torch.distributions.Laplace(0.0, 1.0).sample((numel,)).cuda() for n, numel in sizes.items()}


def exchanged(exchange, quantizer: htq.Quantizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(local gradients, their sum over ranks through `exchange`, host waits during submit and wait)."""
    grads = gradients()
    group = HorovodGroup()
    state = State("cuda", SEED, group.rank)
    staging = TensorBuckets(Reducer(quantizer, exchange, group, state),
                            plan_buckets([(n, g.numel()) for n, g in grads.items()], exchange.bucket_bytes), state)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            waiters = {n: staging.submit(n, g) for n, g in grads.items()}
            results = {n: wait() for n, wait in waiters.items()}
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return grads, results, sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def check_nccl() -> None:
    assert hvd.nccl_built(), "Horovod was built without NCCL"
    payload = torch.arange(1000, device="cuda", dtype=torch.int32).to(torch.uint8)
    gathered = hvd.allgather(payload, name="test.nccl")
    assert gathered.is_cuda and torch.equal(gathered, payload.repeat(SIZE))
    print(f"OK nccl {RANK}", flush=True)


def check_two_phase() -> None:
    """8-bit two-phase (each value quantized twice) lands within 5% of the exact sum."""
    grads, results, waits = exchanged(htq.TwoPhaseExchange(1 << 20), htq.TNQSGD(bits=8))
    for n, g in grads.items():
        exact = sum(gradients(r)[n] for r in range(SIZE))
        error = float((results[n] - exact).norm() / exact.norm())
        assert results[n].is_cuda and error < 0.05, (n, error)
    print(f"OK two-phase {RANK} ({waits} host waits)", flush=True)


check_nccl()
check_two_phase()
hvd.shutdown()
