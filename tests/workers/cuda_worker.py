"""Runs inside `horovodrun` on a CUDA machine: the exchanges carry CUDA gradients through Horovod built
with NCCL. Each rank prints "OK <check> <rank>" per check (tests/test_cuda.py).

The exchanges are driven directly: on a single rank Horovod's DistributedOptimizer registers no
gradient hooks, so it would exchange nothing."""
from __future__ import annotations

import warnings

import horovod.torch as hvd
import torch

import horovod_truncq as htq

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
    exchange.prepare([(n, g.numel()) for n, g in grads.items()], hvd.global_process_set, htq.TrafficCounter())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            waiters = {n: exchange.submit(g, quantizer, n) for n, g in grads.items()}
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


def check_allgather() -> None:
    """The sum is that of every rank's decoded payload, predicted here from each rank's gradients and
    noise stream; the host waits once per tensor (decode_sum's payload check), never in encode."""
    q = htq.TNQSGD(bits=3, seed=SEED)
    grads, results, waits = exchanged(htq.AllgatherExchange(), q.for_rank(RANK))
    for n, g in grads.items():
        expected = sum(q.for_rank(r).decode(q.for_rank(r).encode(gradients(r)[n], name=n, step=0), (g.numel(),))
                       for r in range(SIZE))
        assert results[n].is_cuda and torch.allclose(results[n], expected, rtol=1e-6, atol=1e-6), n
    assert waits <= len(grads), f"{waits} host waits for {len(grads)} tensors"
    print(f"OK allgather {RANK} ({waits} host waits for {len(grads)} tensors)", flush=True)


def check_two_phase() -> None:
    """8-bit two-phase (each value quantized twice) lands within 5% of the exact sum."""
    q = htq.TNQSGD(bits=8, seed=SEED).for_rank(RANK)
    grads, results, waits = exchanged(htq.TwoPhaseExchange(1 << 20), q)
    for n, g in grads.items():
        exact = sum(gradients(r)[n] for r in range(SIZE))
        error = float((results[n] - exact).norm() / exact.norm())
        assert results[n].is_cuda and error < 0.05, (n, error)
    print(f"OK two-phase {RANK} ({waits} host waits)", flush=True)


check_nccl()
check_allgather()
check_two_phase()
hvd.shutdown()
