"""Runs inside `horovodrun` (or `mpirun`): the Horovod front end's wiring through real Horovod. The
exchange's arithmetic is predicted bit for bit in-process (tests/test_reducer.py); here: the
transport, the optimizer class, the one-liner, errors on every rank, checkpoints.

Usage: exchange_worker.py SCENARIO [SCENARIO ...]; each rank prints "OK <scenario> <rank>" per check.
With "mpi4py" first, Horovod is initialised on mpi4py's COMM_WORLD.
"""
from __future__ import annotations

import copy
import sys

import torch

if sys.argv[1] == "mpi4py":
    from mpi4py import MPI
    import horovod.torch as hvd
    hvd.init(comm=MPI.COMM_WORLD)
    scenarios = sys.argv[2:]
else:
    import horovod.torch as hvd
    hvd.init()
    scenarios = sys.argv[1:]

import horovod_truncq as htq  # noqa: E402

RANK, SIZE = hvd.rank(), hvd.size()
SEED = 1234


def model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial parameters on every rank
    return torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8)).to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + RANK)
    return torch.randn(16, 48, generator=g), torch.randint(0, 8, (16,), generator=g)


def local_gradients(net: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    """This rank's own gradients of `batch(step)`, from an undistributed copy of `net`: the optimizer's
    backward hooks start in-place allreduces, so `p.grad` read after backward may already be averaged."""
    twin = copy.deepcopy(net)
    twin.zero_grad(set_to_none=True)
    x, y = batch(step)
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    return {n: p.grad for n, p in twin.named_parameters()}


def sgd_step(opt, net, step) -> float:
    opt.zero_grad()
    x, y = batch(step)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def same_everywhere(tensor: torch.Tensor, tag: str) -> bool:
    flat = tensor.detach().double().reshape(1, -1)
    gathered = hvd.allgather(flat, name=f"test.same.{tag}")
    return torch.equal(gathered, flat.expand_as(gathered))


def parameters_of(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def raises_everywhere(fn, match: str, tag: str) -> None:
    try:
        fn()
    except ValueError as error:
        assert match in str(error), (tag, error)
    else:
        raise AssertionError(f"{tag}: no ValueError")
    hvd.barrier()  # no rank shuts Horovod down under one still sending


def optimizer(net, prefix: str = "", **options):
    """htq.DistributedOptimizer over `net`. Optimizers whose settings differ (op) need parameter names
    of their own (`prefix`): Horovod caches what it learnt of an allreduce by the tensor's name, and
    the same names under another op came back with the first op's scaling."""
    options.setdefault("compression", htq.TNQSGD(bits=3, seed=SEED))
    options.setdefault("min_elements", 300)
    return htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                    named_parameters=[(prefix + n, p) for n, p in net.named_parameters()], **options)


def check_average() -> None:
    """8 bits, two-phase and node-aware, Average and Sum: within 5% of Horovod's fp32 allreduce, small
    tensors exactly Horovod's, and bit-identical gradients on every rank."""
    for exchange in (htq.TwoPhaseExchange(bucket_bytes=4096), htq.NodeAwareExchange(ranks_per_node=SIZE // 2)):
        for op in (hvd.Average, hvd.Sum):
            net = model()
            opt = optimizer(net, f"{exchange.name}.{op}.", compression=htq.TNQSGD(bits=8, seed=SEED),
                            exchange=exchange, op=op)
            local = local_gradients(net, 0)
            opt.zero_grad()
            x, y = batch(0)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.synchronize()
            for n, p in net.named_parameters():
                reference = hvd.allreduce(local[n], name=f"test.reference.{exchange.name}.{op}.{n}", op=op)
                if p.numel() < 300:
                    torch.testing.assert_close(p.grad, reference, rtol=1e-6, atol=1e-7)  # fused sums in another order
                else:
                    assert float((p.grad - reference).norm() / reference.norm()) < 0.05, n
                assert same_everywhere(p.grad, f"average.{n}"), n
            with opt.skip_synchronize():
                opt.step()
    print(f"OK average {RANK}", flush=True)


def check_oneliner() -> None:
    """hvd.DistributedOptimizer(compression=htq.TNQSGD(bits=3)) trains exactly as htq.DistributedOptimizer
    (same names, settings and seed); Horovod's grouped path trains too."""
    nets = [model(), model()]
    stock = hvd.DistributedOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1),
                                     named_parameters=nets[0].named_parameters(),
                                     compression=htq.TNQSGD(bits=3, seed=SEED))
    ours = optimizer(nets[1], min_elements=1024)
    for step in range(3):
        sgd_step(stock, nets[0], step)
        sgd_step(ours, nets[1], step)
    assert torch.equal(parameters_of(nets[0]), parameters_of(nets[1]))
    grouped = model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(grouped.parameters(), lr=0.1),
                                   named_parameters=grouped.named_parameters(),
                                   compression=htq.TNQSGD(bits=3, seed=SEED), groups=2)
    losses = [sgd_step(opt, grouped, 0) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    assert same_everywhere(parameters_of(grouped), "oneliner.groups")
    print(f"OK oneliner {RANK}", flush=True)


def check_none() -> None:
    """Horovod's own compressors pass through htq.DistributedOptimizer untouched."""
    for compression in (hvd.Compression.none, hvd.Compression.fp16):
        nets = [model(), model()]
        opts = [htq.DistributedOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1),
                                         named_parameters=nets[0].named_parameters(), compression=compression),
                hvd.DistributedOptimizer(torch.optim.SGD(nets[1].parameters(), lr=0.1),
                                         named_parameters=[(f"plain.{n}", p) for n, p in nets[1].named_parameters()],
                                         compression=compression)]
        for step in range(2):
            for net, opt in zip(nets, opts):
                sgd_step(opt, net, step)
        assert torch.equal(parameters_of(nets[0]), parameters_of(nets[1]))
    print(f"OK none {RANK}", flush=True)


def check_bytes() -> None:
    """Bytes per step from an independent formula: one bucket, W chunks of whole 32-code blocks, each
    payload (16-byte header, 8 levels, 3 words per 32 codes) with one byte per tensor of the bucket
    in whole words, sent W - 1 times in each phase; the small tensors in Horovod's fp32 ring."""
    sizes = [p.numel() for p in model().parameters()]
    quantized = [n for n in sizes if n >= 300]
    ring = lambda nbytes: 2 * (SIZE - 1) * nbytes // SIZE  # noqa: E731
    chunk = -(-sum(quantized) // (SIZE * 32)) * 32
    row = 16 + 4 * 8 + 4 * 3 * chunk // 32 + 4 * -(-len(quantized) // 4)
    expected = 2 * (SIZE - 1) * row + sum(ring(4 * n) for n in sizes if n < 300)
    net = model()
    opt = optimizer(net)
    for step in range(2):
        sgd_step(opt, net, step)
        traffic = opt.traffic.take()
        assert traffic.sent == traffic.received == expected, (traffic, expected)
        assert traffic.fp32_reference == sum(ring(4 * n) for n in sizes) and traffic.elements == sum(sizes)
    print(f"OK bytes {RANK}", flush=True)


def check_features() -> None:
    """backward_passes_per_step, an unused layer under Adam, sparse_as_dense, mixed dtypes, refusals."""
    net = model()
    opt = optimizer(net, backward_passes_per_step=2)
    opt.zero_grad()
    for step in range(2):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert same_everywhere(parameters_of(net), "passes")

    # a layer no rank uses keeps exactly its values under Adam, as with Horovod's own optimizer
    net, unused = model(), torch.nn.Linear(40, 40)
    named = list(net.named_parameters()) + list(unused.named_parameters(prefix="unused"))
    before = unused.weight.detach().clone()
    opt = htq.DistributedOptimizer(torch.optim.Adam([p for _, p in named], lr=0.01), named_parameters=named,
                                   compression=htq.TNQSGD(bits=2, seed=SEED), min_elements=300)
    for step in range(3):
        sgd_step(opt, net, step)
    assert torch.equal(unused.weight.detach(), before)

    # sparse_as_dense: embedding gradients made dense are quantized like any other
    torch.manual_seed(0)
    embedding, head = torch.nn.Embedding(64, 40, sparse=True), torch.nn.Linear(40, 8)
    named = list(embedding.named_parameters(prefix="embedding")) + list(head.named_parameters(prefix="head"))
    opt = htq.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), named_parameters=named,
                                   compression=htq.TNQSGD(bits=3, seed=SEED), min_elements=300, sparse_as_dense=True)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(head(embedding(torch.arange(16) + RANK)), torch.arange(16) % 8).backward()
    opt.step()
    assert same_everywhere(embedding.weight, "sparse_as_dense") and opt.traffic.take().received > 0

    torch.manual_seed(0)
    half, full = torch.nn.Linear(48, 40).half(), torch.nn.Linear(40, 8)
    named = list(half.named_parameters(prefix="half")) + list(full.named_parameters(prefix="full"))
    opt = htq.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), named_parameters=named,
                                   compression=htq.TNQSGD(bits=3, seed=SEED), min_elements=300)
    opt.zero_grad()
    x, y = batch(0)
    torch.nn.functional.cross_entropy(full(half(x.half()).float()), y).backward()
    opt.step()
    assert half.weight.grad.dtype == torch.float16 and torch.isfinite(half.weight).all()

    for options, match in ((dict(op=hvd.Adasum), "Average and hvd.Sum"), (dict(error_feedback=1.5), "error_feedback"),
                           (dict(exchange="allgather"), "exchange must be one of")):
        raises_everywhere(lambda: optimizer(model(), **options), match, f"refuse {options}")
    print(f"OK features {RANK}", flush=True)


def check_sparse() -> None:
    """A sparse gradient raises a clear ValueError on every rank, through both front ends; the
    one-liner refuses Adasum the same way."""
    def train(make):
        torch.manual_seed(0)
        embedding, head = torch.nn.Embedding(50, 40, sparse=True), torch.nn.Linear(40, 8)
        named = list(embedding.named_parameters(prefix="embedding")) + list(head.named_parameters(prefix="head"))
        opt = make(torch.optim.SGD([p for _, p in named], lr=0.1), named)
        torch.nn.functional.cross_entropy(head(embedding(torch.arange(16) % 50)), torch.arange(16) % 8).backward()
        opt.step()
    raises_everywhere(lambda: train(lambda base, named: htq.DistributedOptimizer(
        base, named_parameters=named, compression=htq.TNQSGD(bits=3), min_elements=0)),
        "parameter 'embedding.weight' has a sparse gradient", "sparse")
    raises_everywhere(lambda: train(lambda base, named: hvd.DistributedOptimizer(
        base, named_parameters=named, compression=htq.TNQSGD(bits=3))), "sparse_as_dense=True", "sparse.oneliner")
    net = model()
    raises_everywhere(lambda: sgd_step(hvd.DistributedOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1), named_parameters=net.named_parameters(),
        compression=htq.TNQSGD(bits=3), op=hvd.Adasum), net, 0), "Average and hvd.Sum", "adasum.oneliner")
    print(f"OK sparse {RANK}", flush=True)


def check_mismatch() -> None:
    """Ranks that disagree on a setting all raise the same ValueError at construction."""
    odd = RANK % 2
    cases = {"bits": dict(compression=htq.TNQSGD(bits=3 + odd, seed=SEED)),
             "exchange": dict(exchange=["two-phase", "node-aware"][odd]),
             "min_elements": dict(min_elements=[300, 100][odd]),
             "error_feedback": dict(error_feedback=[True, 0.5][odd]),
             "bucket": dict(exchange=htq.TwoPhaseExchange(bucket_bytes=[1 << 20, 4096][odd]))}
    for case, options in cases.items():
        raises_everywhere(lambda: optimizer(model(), **options), "disagree on the compressor settings", case)
    print(f"OK mismatch {RANK}", flush=True)


def check_resume() -> None:
    """A run resumed from every rank's optimizer.state_dict() (momentum, seed, noise step, residuals)
    continues bit for bit; a reload after a step that failed leaves the optimizer usable."""
    def make(net):
        return htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                        named_parameters=net.named_parameters(), min_elements=0,
                                        compression=htq.TNQSGD(bits=2), exchange="node-aware", error_feedback=True)
    net = model()
    opt = make(net)
    for step in range(3):
        sgd_step(opt, net, step)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["horovod_truncq"]["residuals"]
    for step in range(3, 5):
        sgd_step(opt, net, step)
    resumed = model()
    resumed.load_state_dict(saved_net)
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved_opt)
    for step in range(3, 5):
        sgd_step(resumed_opt, resumed, step)
    assert torch.equal(parameters_of(net), parameters_of(resumed))

    # a failed step (backward done, step never taken), then a reload: zero_grad and training work
    x, y = batch(9)
    torch.nn.functional.cross_entropy(resumed(x), y).backward()
    resumed_opt.synchronize()  # what a step that fails after the exchange leaves behind
    resumed_opt._handles[next(resumed.parameters())] = (None, None)
    resumed_opt.load_state_dict(saved_opt)
    sgd_step(resumed_opt, resumed, 10)
    assert same_everywhere(parameters_of(resumed), "reload")
    print(f"OK resume {RANK}", flush=True)


def check_join() -> None:
    """Ranks that run different numbers of steps (hvd.join, Horovod's way to train on uneven data):
    while a rank has joined, the others go on with it counted as zeros, as Horovod's own optimizer
    does: rank 0's last step moves its parameters by exactly its own gradient over the ranks, the
    quantized weights and the biases that take Horovod's allreduce alike."""
    net = model()
    opt = optimizer(net)
    for index in range(3 if RANK == 0 else 2):
        if index == 2:
            local = local_gradients(net, index)
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
            opt.zero_grad()
            x, y = batch(index)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            for n, p in net.named_parameters():
                assert torch.equal(p.detach(), before[n].add_(local[n] / SIZE, alpha=-0.1)), n
        else:
            sgd_step(opt, net, index)
    hvd.join()
    print(f"OK join {RANK}", flush=True)


CHECKS = {"join": check_join, "average": check_average, "oneliner": check_oneliner, "none": check_none, "bytes": check_bytes,
          "features": check_features, "sparse": check_sparse, "mismatch": check_mismatch, "resume": check_resume}

for scenario in scenarios:
    CHECKS[scenario]()
hvd.shutdown()
