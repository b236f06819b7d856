"""Runs under torchrun (Gloo): the DDP comm hook through real torch.distributed. Each rank prints
"OK <check> <rank>" per check. Usage: ddp_worker.py CHECK [CHECK ...]."""
from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import horovod_truncq as htq
from horovod_truncq.groups import ThreadWorld, run_ranks
from horovod_truncq.state import State as RunState
from horovod_truncq.reducer import Reducer

dist.init_process_group("gloo")
RANK, SIZE = dist.get_rank(), dist.get_world_size()
SEED = 77


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96), torch.nn.ReLU(),
                               torch.nn.Linear(96, 10))


def batch(step: int, rank: int = RANK):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


def wrapped(net, hook_state=None, **options) -> DDP:
    ddp = DDP(net, bucket_cap_mb=0.02, **options)  # several buckets of about 5,000 elements
    if hook_state is not None:
        ddp.register_comm_hook(hook_state, htq.ddp.hook)
    return ddp


def step(ddp, opt, index: int) -> None:
    opt.zero_grad()
    x, y = batch(index)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()


def same_everywhere(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(SIZE)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, tensor) for g in gathered)


def flat_parameters(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def check_replicas() -> None:
    """Several steps of TNQSGD at 3 bits, two-phase and node-aware: bit-identical replicas, and
    bytes counted."""
    for exchange in ("two-phase", htq.NodeAwareExchange(ranks_per_node=2)):
        state = htq.ddp.State(htq.TNQSGD(bits=3, seed=SEED), exchange=exchange, min_elements=500)
        ddp = wrapped(model(), state)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        for index in range(4):
            step(ddp, opt, index)
        assert same_everywhere(flat_parameters(ddp.module)), exchange
        traffic = state.traffic.take()
        if exchange == "two-phase":  # (node-aware also counts the float32 sums inside a node)
            assert 0 < traffic.received < traffic.fp32_reference / 4, traffic
    print(f"OK replicas {RANK}", flush=True)


def check_close() -> None:
    """At 8 bits, with a bucket per layer, the averaged gradients are within 2% of DDP's own
    allreduce. (A bucket that mixes layers whose gradients differ in scale gets one threshold per
    chunk, which clips the larger layer: 12% off for this model's output layer in one 8-bit bucket.)"""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 256, bias=False), torch.nn.ReLU(), torch.nn.Linear(256, 10, bias=False))
    plain, hooked = DDP(copy.deepcopy(base), bucket_cap_mb=0.001), DDP(copy.deepcopy(base), bucket_cap_mb=0.001)
    hooked.register_comm_hook(htq.ddp.State(htq.TNQSGD(bits=8, seed=SEED), min_elements=0), htq.ddp.hook)
    x, y = batch(0)
    for ddp in (plain, hooked):
        for _ in range(2):  # DDP rebuilds its buckets, one per layer here, after the first iteration
            ddp.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
    for (name, a), b in zip(plain.module.named_parameters(), hooked.module.parameters()):
        error = float((a.grad - b.grad).norm() / a.grad.norm())
        assert error < 0.02, (name, error)
    print(f"OK close {RANK}", flush=True)


class FakeBucket:
    """What the hook reads of DDP's GradBucket."""

    def __init__(self, index: int, tensors: list[torch.Tensor], last: bool) -> None:
        self._index, self._tensors, self._last = index, tensors, last
        self._buffer = torch.cat([t.reshape(-1) for t in tensors])

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._tensors

    def is_last(self) -> bool:
        return self._last


def buckets_of(rank: int, index: int) -> list[FakeBucket]:
    g = torch.Generator().manual_seed(10 * rank + index)
    sizes = [[3000, 1200], [4000], [700, 2100, 900]]
    tensors = [[torch.randn(n, generator=g) for n in group] for group in sizes]
    tensors[2][1] = torch.zeros(2100)  # on every rank: must come back exactly zero
    return [FakeBucket(i, t, last=i == len(sizes) - 1) for i, t in enumerate(tensors)]


def check_inprocess() -> None:
    """The hook over Gloo gives, bit for bit, what the same reducer gives over the in-process
    transport for the same buckets (two steps, error feedback on, node-aware 2 x 2)."""
    exchange, quantizer = htq.NodeAwareExchange(ranks_per_node=2), htq.TNQSGD(bits=2)
    state = htq.ddp.State(quantizer, exchange=exchange, error_feedback=True, ranks_per_node=2)
    seed = state.run.seed
    seeds = [torch.zeros(1, dtype=torch.int64) for _ in range(SIZE)]
    dist.all_gather(seeds, torch.tensor([seed]))
    hooked = []
    for index in range(2):
        futures = [htq.ddp.hook(state, bucket) for bucket in buckets_of(RANK, index)]
        hooked.append([future.wait() for future in futures])

    def job(group):
        run = RunState("x", int(seeds[group.rank]), group.rank, 1.0)
        reducer = Reducer(quantizer, exchange, group, run)
        results = []
        for index in range(2):
            flights = [reducer.start(state.layouts[b.index()], b.buffer(),
                                     reducer.presence(state.layouts[b.index()], b.buffer()))
                       for b in buckets_of(group.rank, index)]
            step_results = []
            for flight in flights:
                values, present = reducer.finish(flight)
                for slot, (offset, size) in enumerate(zip(flight.bucket.offsets(), flight.bucket.sizes)):
                    values[offset:offset + size].mul_(present[slot])
                step_results.append(values / group.size)
            run.step += 1
            results.append(step_results)
        return results

    expected = run_ranks(ThreadWorld(SIZE, 2), job)[RANK]
    for got_step, want_step in zip(hooked, expected):
        for got, want in zip(got_step, want_step):
            assert torch.equal(got, want)
    assert torch.equal(hooked[0][2][700:2800], torch.zeros(2100))
    print(f"OK inprocess {RANK}", flush=True)


def check_rebuild() -> None:
    """A bucket index whose tensors change (DDP's rebuild after the first iteration) starts afresh,
    its error-feedback residuals dropped, instead of failing on their shapes."""
    state = htq.ddp.State(htq.TNQSGD(bits=2, seed=SEED), error_feedback=True)
    first = FakeBucket(0, [torch.randn(3000), torch.randn(2000)], last=True)
    htq.ddp.hook(state, first).wait()
    assert state.run.feedback.residuals
    rebuilt = FakeBucket(0, [torch.randn(4096)], last=True)
    result = htq.ddp.hook(state, rebuilt).wait()
    assert result.shape == (4096,) and state.layouts[0].sizes == (4096,)
    print(f"OK rebuild {RANK}", flush=True)


def check_unused() -> None:
    """find_unused_parameters=True: DDP allreduces its map of used parameters after handing over the
    last bucket, on the same process group; the hook's collectives all come before it, so several
    steps run without a mismatch, the replicas stay identical and the unused head's gradient is
    exactly zero."""
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.used, self.unused = model(), torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)

        def forward(self, x):
            return self.used(self.body(x))

    torch.manual_seed(0)
    state = htq.ddp.State(htq.TNQSGD(bits=3, seed=SEED), min_elements=500)
    ddp = wrapped(TwoHeads(), state, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for index in range(4):
        step(ddp, opt, index)
        assert all(p.grad is None or not p.grad.any() for p in ddp.module.unused.parameters())
    assert same_everywhere(flat_parameters(ddp.module))
    print(f"OK unused {RANK}", flush=True)


def check_failure() -> None:
    """An error in a bucket's exchange fails its future and those of the step's later buckets, with
    the same error; the next step runs afresh."""
    state = htq.ddp.State(htq.TNQSGD(bits=3, seed=SEED), min_elements=500)
    broken = FakeBucket(0, [torch.ones(100, dtype=torch.int64)], last=False)  # an integer buffer cannot be averaged
    futures = [htq.ddp.hook(state, broken), htq.ddp.hook(state, FakeBucket(1, [torch.randn(4096)], last=True))]
    for future in futures:
        try:
            future.wait()
        except RuntimeError as error:
            assert "Long" in str(error), error
        else:
            raise AssertionError("a failed bucket completed")
    assert htq.ddp.hook(state, FakeBucket(1, [torch.randn(4096)], last=True)).wait().shape == (4096,)
    print(f"OK failure {RANK}", flush=True)


def check_mismatch() -> None:
    """Ranks that disagree on a setting raise the same ValueError, each of them, at construction."""
    for options in (dict(quantizer=htq.TNQSGD(bits=3 + RANK % 2)), dict(quantizer=htq.TNQSGD(bits=3),
                                                                          min_elements=[100, 200][RANK % 2])):
        try:
            htq.ddp.State(**options)
        except ValueError as error:
            assert "disagree on the compressor settings" in str(error) and "rank 1:" in str(error), error
        else:
            raise AssertionError(f"{options} went unnoticed")
    for options, match in ((dict(error_feedback=2), "error_feedback"), (dict(exchange="allgather"), "exchange"),
                           (dict(min_elements=-1), "min_elements")):
        try:
            htq.ddp.State(htq.TNQSGD(bits=3), **options)
        except ValueError as error:
            assert match in str(error), error
        else:
            raise AssertionError(f"{options} accepted")
    print(f"OK mismatch {RANK}", flush=True)


def check_resume() -> None:
    """The hook state saved after three steps; two more steps, and the same two from the checkpoint
    with a new hook state: equal bit for bit (seed, noise step and both residuals restored). Given
    DDP's buckets directly: DDP itself, with its own allreduce, resumed 7e-9 off on this CPU."""
    def make(saved=None):
        state = htq.ddp.State(htq.TNQSGD(bits=2), exchange="node-aware", error_feedback=True, ranks_per_node=2)
        if saved is not None:
            state.load_state_dict(saved)
        return state

    def steps(state, indices):  # a step's futures complete when DDP hands over its last bucket
        futures = [[htq.ddp.hook(state, bucket) for bucket in buckets_of(RANK, index)] for index in indices]
        return [[future.wait() for future in step] for step in futures]

    state = make()
    steps(state, range(3))
    saved = copy.deepcopy(state.state_dict())
    assert saved["residuals"] and saved["step"] == 3
    going_on, resumed = steps(state, range(3, 5)), steps(make(saved), range(3, 5))
    assert all(torch.equal(a, b) for step_a, step_b in zip(going_on, resumed) for a, b in zip(step_a, step_b))
    print(f"OK resume {RANK}", flush=True)


CHECKS = {"replicas": check_replicas, "close": check_close, "inprocess": check_inprocess, "rebuild": check_rebuild,
          "mismatch": check_mismatch, "resume": check_resume, "unused": check_unused, "failure": check_failure}
for check in sys.argv[1:]:
    CHECKS[check]()
dist.destroy_process_group()
