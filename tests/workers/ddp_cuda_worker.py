"""Runs under torchrun on a CUDA machine, one rank per GPU: the DDP comm hook over NCCL, with the
codec's passes compiled (Triton). Each rank prints "OK <check> <rank>" per check (tests/test_cuda.py).
Without a GPU it runs the same checks over Gloo on the CPU, where the host-wait check is void."""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import horovod_truncq as htq

CUDA = torch.cuda.is_available()
dist.init_process_group("nccl" if CUDA else "gloo")
RANK, LOCAL_RANK = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
DEVICE = torch.device("cuda", LOCAL_RANK) if CUDA else torch.device("cpu")
if CUDA:
    torch.cuda.set_device(DEVICE)
SEED = 91


def model() -> torch.nn.Module:
    """A 1 M-element layer (its bucket runs the compiled passes) and a small one (eager)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 10, bias=False)).to(DEVICE)


def backward(ddp: DDP, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + RANK)
    x, y = torch.randn(64, 1024, generator=g).to(DEVICE), torch.randint(0, 10, (64,), generator=g).to(DEVICE)
    ddp.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()


@contextlib.contextmanager
def host_waits(mode: str):
    """CUDA's sync debug mode ("warn" or "error") inside the block; the warnings it raised, from
    any thread (the hook's among them), are collected in the list it yields."""
    if not CUDA:
        yield []
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(0)


def check_no_host_wait() -> None:
    """After the first steps (DDP's bucket rebuild, compilation), the backward pass through the hook
    never makes the host wait for the device: two-phase and node-aware, 3 bits, error feedback on."""
    for exchange in ("two-phase", "node-aware"):
        state = htq.ddp.State(htq.TNQSGD(bits=3, seed=SEED), exchange=exchange, error_feedback=True, min_elements=500)
        ddp = DDP(model(), bucket_cap_mb=1)
        ddp.register_comm_hook(state, htq.ddp.hook)
        for step in range(3):
            backward(ddp, step)
        with host_waits("warn") as caught:  # where a wait comes from, if one does
            backward(ddp, 3)
        waits = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        assert not waits, (exchange, waits)
        with host_waits("error"):
            backward(ddp, 4)
        grads = torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()])
        assert grads.is_cuda == CUDA and bool(torch.isfinite(grads).all()) and bool(grads.any()), exchange
    print(f"OK no-host-wait {RANK}", flush=True)


def check_close() -> None:
    """At 8 bits, a bucket per layer: within 2% of DDP's own allreduce over the same backend."""
    base = model()
    plain, hooked = DDP(copy.deepcopy(base), bucket_cap_mb=0.001), DDP(copy.deepcopy(base), bucket_cap_mb=0.001)
    hooked.register_comm_hook(htq.ddp.State(htq.TNQSGD(bits=8, seed=SEED), min_elements=0), htq.ddp.hook)
    for ddp in (plain, hooked):
        for step in range(2):  # DDP rebuilds its buckets, one per layer here, after the first iteration
            backward(ddp, step)
    for (name, a), b in zip(plain.module.named_parameters(), hooked.module.parameters()):
        error = float((a.grad - b.grad).norm() / a.grad.norm())
        assert error < 0.02, (name, error)
    print(f"OK close {RANK}", flush=True)


check_no_host_wait()
check_close()
dist.destroy_process_group()
