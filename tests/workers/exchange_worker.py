"""Runs inside `horovodrun` (or `mpirun`): checks the quantized exchange through real Horovod.

Usage: exchange_worker.py SCENARIO [SCENARIO ...]; each rank prints "OK <scenario>" per check.
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


def batch(step: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 48, generator=g), torch.randint(0, 8, (16,), generator=g)


def local_grads(net: torch.nn.Module, step: int, rank: int = RANK) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(net)
    net.zero_grad()
    x, y = batch(step, rank)
    torch.nn.functional.cross_entropy(net(x.to(next(net.parameters()).dtype)), y).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def expected_average(quantizer, grads_of, min_elements: int, ranks=None, op="mean"):
    """What every rank must end with: the mean (or sum) of every rank's decoded gradient.

    Every rank's payload is predicted here without Horovod: rank r's noise is the stream
    (seed, r, parameter name, step 0), which quantizer.for_rank(r) draws, and `grads_of(r)` gives
    rank r's gradients (the batches are deterministic)."""
    ranks = ranks or list(range(SIZE))
    grads = {r: grads_of(r) for r in ranks}
    out = {}
    for name, g in grads[ranks[0]].items():
        total = torch.zeros(g.numel())
        for r in ranks:
            mine = grads[r][name]
            if g.numel() < min_elements:
                total += mine.float().reshape(-1)
            else:
                total += quantizer.decode(quantizer.for_rank(r).encode(mine, name=name, step=0), (g.numel(),))
        if op == "mean":
            total = total / len(ranks)
        out[name] = total.view(g.shape).to(g.dtype)
    return out


def assert_identical_across_ranks(net: torch.nn.Module, tag: str) -> None:
    flat = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()])
    gathered = hvd.allgather(flat.reshape(1, -1), name=f"test.identical.{tag}")
    assert torch.equal(gathered, flat.expand_as(gathered)), f"{tag}: parameters differ across ranks"


def sgd_step(opt, net, step, dtype=torch.float32):
    opt.zero_grad()
    x, y = batch(step)
    loss = torch.nn.functional.cross_entropy(net(x.to(dtype)), y)
    loss.backward()
    opt.step()
    return loss.item()


RANDOM = {
    "tnqsgd": lambda: htq.TNQSGD(bits=3, tail="laplace", seed=SEED),
    "tuqsgd": lambda: htq.TUQSGD(bits=2, tail="powerlaw", seed=SEED),
    "tbqsgd": lambda: htq.TBQSGD(bits=4, seed=SEED),
    "qsgd": lambda: htq.QSGD(bits=4, seed=SEED),
    "nqsgd": lambda: htq.NQSGD(bits=3, bucket_size=256, seed=SEED),
}
QUANTIZERS = RANDOM


def check_exact(names=tuple(QUANTIZERS), ops=("mean", "sum")) -> None:
    """One SGD step (lr 1) leaves p - mean(decoded gradients), identically on every rank."""
    for name in names:
        for op in ops:
            net = model()
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
            q = QUANTIZERS[name]()
            expected = expected_average(q, lambda r: local_grads(net, 0, r), 300, op=op)
            opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0),
                                           named_parameters=net.named_parameters(), compression=q,
                                           op=hvd.Average if op == "mean" else hvd.Sum, min_elements=300,
                                           exchange="allgather")
            sgd_step(opt, net, 0)
            for n, p in net.named_parameters():
                assert torch.allclose(p.detach(), before[n] - expected[n], rtol=0, atol=1e-6), \
                    f"{name} {op} {n}: off by {(p.detach() - before[n] + expected[n]).abs().max():.3g}"
            assert_identical_across_ranks(net, f"exact.{name}.{op}")
    print(f"OK exact {RANK}", flush=True)


def check_none_matches_horovod() -> None:
    """Through htq.DistributedOptimizer, Horovod's own compressors give plain Horovod's result."""
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
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b)
    print(f"OK none {RANK}", flush=True)


def check_stock_optimizer_same_as_ours() -> None:
    """hvd.DistributedOptimizer(compression=q.bind(...)) and htq.DistributedOptimizer agree exactly
    (same parameter names, so the same noise streams; the two step one after the other)."""
    nets = [model(), model()]
    ours = htq.DistributedOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1),
                                    named_parameters=nets[0].named_parameters(), compression=QUANTIZERS["tnqsgd"]())
    named = list(nets[1].named_parameters())
    stock = hvd.DistributedOptimizer(torch.optim.SGD(nets[1].parameters(), lr=0.1), named_parameters=named,
                                     compression=QUANTIZERS["tnqsgd"]().bind(named))
    for step in range(2):
        sgd_step(ours, nets[0], step)
        sgd_step(stock, nets[1], step)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    print(f"OK stock {RANK}", flush=True)


def ring(nbytes: int) -> int:
    """What one rank sends and receives in a ring allreduce of nbytes (the fp32 reference)."""
    return 2 * (SIZE - 1) * nbytes // SIZE


def check_bytes() -> None:
    """Per step, bytes sent and received per rank from the collectives' sizes, written out here:
    allgather: (W-1) payloads per quantized tensor; two-phase: (W-1) chunk payloads twice per bucket;
    both: ring allreduces of the 4-byte placeholders and of the small tensors in fp32."""
    sizes = [p.numel() for p in model().parameters()]
    quantized = [n for n in sizes if n >= 300]
    small = sum(ring(4) if n >= 300 else ring(4 * n) for n in sizes)
    header, levels = 16, 4 * 2 ** 3  # TNQSGD at 3 bits: 8 float32 levels

    def payload(n: int) -> int:
        return header + levels + 4 * 3 * -(-n // 32)

    chunk = -(-sum(quantized) // (SIZE * 32)) * 32  # one bucket (default size) in W chunks of whole blocks
    per_node, nodes = 2, SIZE // 2  # node-aware: float32 parts inside a node, payloads between and inside
    expected = {"allgather": sum((SIZE - 1) * payload(n) for n in quantized) + small,
                "two-phase": 2 * (SIZE - 1) * payload(chunk) + small,
                "node-aware": (per_node - 1) * nodes * chunk * 4 + 2 * (nodes - 1) * payload(chunk)
                + (per_node - 1) * nodes * payload(chunk) + small}
    for exchange, moved in expected.items():
        net = model()
        q = QUANTIZERS["tnqsgd"]()
        chosen = htq.NodeAwareExchange(ranks_per_node=per_node) if exchange == "node-aware" else exchange
        opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), named_parameters=net.named_parameters(),
                                       compression=q, min_elements=300, exchange=chosen)
        for step in range(2):
            sgd_step(opt, net, step)
            traffic = opt.traffic.take()
            assert traffic.sent == traffic.received == moved, (exchange, traffic, moved)
            assert traffic.fp32_reference == sum(ring(4 * n) for n in sizes) and traffic.elements == sum(sizes)
    weight = net[0].weight.detach()
    gathered = hvd.allgather(q.encode(weight), name="test.bytes.gathered")
    assert gathered.numel() == SIZE * q.payload_size(weight.numel()) == SIZE * payload(weight.numel())
    print(f"OK bytes {RANK}", flush=True)


def check_features() -> None:
    """backward_passes_per_step, groups, None gradients, set_to_none, mixed dtypes, errors."""
    # backward_passes_per_step=2: two local passes accumulate, then one exchange of the sum
    net = model()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    q = QUANTIZERS["tbqsgd"]()
    def two_passes(rank):
        g0, g1 = local_grads(net, 0, rank), local_grads(net, 1, rank)
        return {n: g0[n] + g1[n] for n in g0}
    expected = expected_average(q, two_passes, 300)
    opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), named_parameters=net.named_parameters(),
                                   compression=q, backward_passes_per_step=2, min_elements=300, exchange="allgather")
    opt.zero_grad()
    for step in range(2):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - expected[n], rtol=0, atol=1e-6)

    # groups, and gradient_predivide_factor: same result as without
    results = []
    for options in ({}, {"groups": 2}, {"gradient_predivide_factor": 4.0}):
        net = model()
        opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.5), named_parameters=net.named_parameters(),
                                       compression=QUANTIZERS["tuqsgd"](), min_elements=300, **options)
        sgd_step(opt, net, 0)
        results.append([p.detach().clone() for p in net.parameters()])
    for variant in results[1:]:
        for a, b in zip(results[0], variant):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)

    # a parameter without gradient on some step, on some ranks; zero_grad(set_to_none=True)
    net = model()
    extra = torch.nn.Parameter(torch.ones(40, 40))
    opt = htq.DistributedOptimizer(torch.optim.SGD(list(net.parameters()) + [extra], lr=0.1),
                                   named_parameters=list(net.named_parameters()) + [("extra", extra)],
                                   compression=QUANTIZERS["qsgd"](), min_elements=300)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if RANK == 0 and step == 1:
            loss = loss + (extra ** 2).sum() * 1e-3
        loss.backward()
        opt.step()
    assert_identical_across_ranks(net, "none-grad")
    gathered = hvd.allgather(extra.detach().reshape(1, -1), name="test.extra")
    assert torch.equal(gathered, extra.detach().reshape(1, -1).expand_as(gathered))
    assert bool((extra.detach() < 1.0).any())  # rank 0's gradient reached every rank

    # mixed float16 / float32 parameters
    torch.manual_seed(0)
    half, full = torch.nn.Linear(48, 40).half(), torch.nn.Linear(40, 8)
    params = list(half.named_parameters(prefix="half")) + list(full.named_parameters(prefix="full"))
    opt = htq.DistributedOptimizer(torch.optim.SGD([p for _, p in params], lr=0.1), named_parameters=params,
                                   compression=QUANTIZERS["tnqsgd"](), min_elements=300)
    opt.zero_grad()
    x, y = batch(0)
    torch.nn.functional.cross_entropy(full(half(x.half()).float()), y).backward()
    opt.step()
    assert half.weight.dtype == torch.float16 and half.weight.grad.dtype == torch.float16
    assert full.weight.grad.dtype == torch.float32 and torch.isfinite(half.weight).all()

    # unsupported configurations fail at construction, clearly
    for kwargs, match in ((dict(op=hvd.Adasum), "Average and hvd.Sum"), (dict(sparse_as_dense=True), "sparse"),
                          (dict(error_feedback=0), "error_feedback must be"),
                          (dict(error_feedback=1.5), "error_feedback must be"),
                          (dict(error_feedback="on"), "error_feedback must be")):
        try:
            htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                     named_parameters=net.named_parameters(), compression=htq.TNQSGD(bits=3), **kwargs)
        except ValueError as error:
            assert match in str(error), error
        else:
            raise AssertionError(f"{kwargs} accepted")
    # every parameter needs a name of its own
    try:
        htq.TNQSGD(bits=3).bind([("w", net[0].weight), ("w", net[2].weight)])
    except ValueError as error:
        assert "repeats the names ['w']" in str(error), error
    else:
        raise AssertionError("duplicate names accepted")
    # a gradient that belongs to no named parameter: clear error at the first step
    stray = model()
    compressor = htq.TNQSGD(bits=3).bind(stray.named_parameters(), min_elements=0)
    try:
        compressor.compress(torch.randn(40, 48))
    except ValueError as error:
        assert "belongs to none of the" in str(error)
    else:
        raise AssertionError("unknown gradient accepted")
    print(f"OK features {RANK}", flush=True)


def check_order() -> None:
    """Ranks submit their gradients in different orders, then wait in one order: no deadlock, and
    every rank gets the same average."""
    net = model()
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(RANK * 100 + p.numel()))
    compressor = htq.TNQSGD(bits=3, seed=SEED).bind(net.named_parameters(), min_elements=0)
    params = list(net.named_parameters())
    order = params if RANK % 2 == 0 else params[::-1]
    started = {name: compressor.compress(p.grad) for name, p in order}
    results = {}
    for name, _ in params:
        placeholder, ctx = started[name]
        reduced = hvd.allreduce(placeholder, name=f"test.order.{name}", op=hvd.Average)
        results[name] = compressor.decompress(reduced, ctx)
    flat = torch.cat([results[name].reshape(-1) for name, _ in params])
    gathered = hvd.allgather(flat.reshape(1, -1), name="test.order.result")
    assert torch.equal(gathered, flat.expand_as(gathered))
    print(f"OK order {RANK}", flush=True)


def check_process_set() -> None:
    """Averaging over a process set of ranks 0..2 (allgather: exactly the predicted mean; two-phase at
    8 bits: within 5% of Horovod's); ranks outside keep their parameters."""
    members = [0, 1, 2]
    subset = hvd.add_process_set(members)
    for exchange in ("allgather", "two-phase"):
        net = model()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        q = QUANTIZERS["tnqsgd"]() if exchange == "allgather" else htq.TNQSGD(bits=8, seed=SEED)
        expected = expected_average(q, lambda r: local_grads(net, 0, r), 300, ranks=members)
        if exchange == "two-phase":
            grads = {r: local_grads(net, 0, r) for r in members}
            expected = {n: sum(grads[r][n] for r in members) / len(members) for n in grads[0]}
        opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), named_parameters=net.named_parameters(),
                                       compression=q, process_set=subset, min_elements=300, exchange=exchange)
        if RANK in members:
            sgd_step(opt, net, 0)
            for n, p in net.named_parameters():
                step = before[n] - p.detach()
                if exchange == "allgather":
                    torch.testing.assert_close(step, expected[n], rtol=0, atol=1e-6)
                else:
                    assert (step - expected[n]).norm() / expected[n].norm() < 0.05, n
        else:
            for n, p in net.named_parameters():
                assert torch.equal(p.detach(), before[n])
    hvd.remove_process_set(subset)
    print(f"OK process_set {RANK}", flush=True)


def check_mismatch() -> None:
    """Ranks disagreeing on bits, exchange, min_elements, error feedback or bucket size: every rank raises the same
    ValueError before any gradient moves, and no rank hangs."""
    odd = RANK % 2
    cases = {
        "bits": dict(compression=htq.TNQSGD(bits=3 + odd, seed=SEED)),
        "exchange": dict(compression=htq.TNQSGD(bits=3, seed=SEED), exchange=["two-phase", "allgather"][odd]),
        "min_elements": dict(compression=htq.TNQSGD(bits=3, seed=SEED), min_elements=[300, 100][odd]),
        "error_feedback": dict(compression=htq.TNQSGD(bits=3, seed=SEED), error_feedback=[True, 0.5][odd]),
        "bucket": dict(compression=htq.TNQSGD(bits=3, seed=SEED),
                       exchange=htq.TwoPhaseExchange(bucket_bytes=[1 << 20, 4096][odd])),
    }
    for case, options in cases.items():
        net = model()
        options.setdefault("min_elements", 300)
        opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                       named_parameters=net.named_parameters(), **options)
        try:
            sgd_step(opt, net, 0)
        except ValueError as error:
            assert "disagree on the compressor settings" in str(error) and "rank 1:" in str(error), (case, error)
        else:
            raise AssertionError(f"mismatched {case} went unnoticed")
    print(f"OK mismatch {RANK}", flush=True)


def horovod_average(net: torch.nn.Module, step: int, op=hvd.Average) -> dict[str, torch.Tensor]:
    """Plain Horovod's fp32 average (or sum) of the ranks' gradients: the reference."""
    return {n: hvd.allreduce(g, name=f"test.reference.{step}.{n}", op=op) for n, g in local_grads(net, step).items()}


def synchronized_grads(opt, net, step) -> dict[str, torch.Tensor]:
    """Backward and exchange, then the optimizer step on the exchanged gradients."""
    opt.zero_grad()
    x, y = batch(step)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.synchronize()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    with opt.skip_synchronize():
        opt.step()
    return grads


EXCHANGE_KINDS = {"two-phase": htq.TwoPhaseExchange,
                  "node-aware": lambda bucket_bytes: htq.NodeAwareExchange(bucket_bytes, ranks_per_node=2),
                  "node-aware-found": htq.NodeAwareExchange}  # nodes as Horovod sees them (one, here)


def check_two_phase(kind: str = "two-phase") -> None:
    """8-bit two-phase (flat or node-aware) lands within 5% of plain Horovod's average (and sum), in
    one bucket and in several, and every rank holds bit-identical gradients and parameters."""
    for bucket_bytes in (25 * 2 ** 20, 4096):
        for op in (hvd.Average, hvd.Sum):
            net = model()
            opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                           named_parameters=net.named_parameters(),
                                           compression=htq.TNQSGD(bits=8, seed=SEED), op=op, min_elements=300,
                                           exchange=EXCHANGE_KINDS[kind](bucket_bytes))
            for step in range(3):
                reference = horovod_average(net, step, op)
                grads = synchronized_grads(opt, net, step)
                for n, g in grads.items():
                    error = (g - reference[n]).norm() / reference[n].norm()
                    assert error < 0.05, (bucket_bytes, op, step, n, float(error))
                flat = torch.cat([g.reshape(-1) for g in grads.values()])
                gathered = hvd.allgather(flat.reshape(1, -1), name=f"test.{kind}.{bucket_bytes}.{op}.{step}")
                assert torch.equal(gathered, flat.expand_as(gathered)), "replicas differ"
            assert_identical_across_ranks(net, f"{kind}.{bucket_bytes}.{op}")
    print(f"OK {kind} {RANK}", flush=True)


def check_flush() -> None:
    """A bucket whose gradients do not all arrive goes out at the first wait, the missing ones as
    zeros; ranks submitting in different orders get the same result."""
    net = model()
    params = list(net.named_parameters())
    compressor = htq.TNQSGD(bits=8, seed=SEED).bind(params, min_elements=0, exchange="two-phase")
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(RANK * 100 + i))
             for i, (n, p) in enumerate(params)}
    submitted = params[:2] if RANK % 2 == 0 else params[:2][::-1]  # the bucket holds all four
    started = {}
    for name, p in submitted:
        p.grad = grads[name]
        started[name] = compressor.compress(p.grad)
    for name, _ in params[:2]:
        placeholder, ctx = started[name]
        reduced = hvd.allreduce(placeholder, name=f"test.flush.{name}", op=hvd.Average)
        result = compressor.decompress(reduced, ctx)
        reference = hvd.allreduce(grads[name], name=f"test.flush.reference.{name}", op=hvd.Average)
        assert (result - reference).norm() / reference.norm() < 0.05, name
        gathered = hvd.allgather(result.reshape(1, -1), name=f"test.flush.same.{name}")
        assert torch.equal(gathered, result.reshape(1, -1).expand_as(gathered))
    print(f"OK flush {RANK}", flush=True)


def check_oneliner() -> None:
    """hvd.DistributedOptimizer(..., compression=htq.TNQSGD(bits=3)), with no bind, trains exactly as
    htq.DistributedOptimizer does (same parameter names, so the same noise streams)."""
    nets = [model(), model()]
    stock = hvd.DistributedOptimizer(torch.optim.SGD(nets[0].parameters(), lr=0.1),
                                     named_parameters=nets[0].named_parameters(),
                                     compression=htq.TNQSGD(bits=3, seed=SEED))
    ours = htq.DistributedOptimizer(torch.optim.SGD(nets[1].parameters(), lr=0.1),
                                    named_parameters=nets[1].named_parameters(),
                                    compression=htq.TNQSGD(bits=3, seed=SEED))
    for step in range(3):
        sgd_step(stock, nets[0], step)
        sgd_step(ours, nets[1], step)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert_identical_across_ranks(nets[0], "oneliner")
    grouped = model()  # Horovod's grouped path (groups=) calls compress from elsewhere
    opt = hvd.DistributedOptimizer(torch.optim.SGD(grouped.parameters(), lr=0.1),
                                   named_parameters=grouped.named_parameters(),
                                   compression=htq.TNQSGD(bits=3, seed=SEED), groups=2)
    losses = [sgd_step(opt, grouped, 0) for _ in range(3)]
    assert losses[-1] < losses[0], losses
    assert_identical_across_ranks(grouped, "oneliner.groups")
    print(f"OK oneliner {RANK}", flush=True)


def check_sparse() -> None:
    """A sparse gradient (nn.Embedding(sparse=True)) raises a ValueError naming it on every rank."""
    torch.manual_seed(0)
    embedding, head = torch.nn.Embedding(50, 40, sparse=True), torch.nn.Linear(40, 8)
    params = list(embedding.named_parameters(prefix="embedding")) + list(head.named_parameters(prefix="head"))
    opt = htq.DistributedOptimizer(torch.optim.SGD([p for _, p in params], lr=0.1), named_parameters=params,
                                   compression=htq.TNQSGD(bits=3, seed=SEED), min_elements=0)
    try:
        torch.nn.functional.cross_entropy(head(embedding(torch.arange(16) % 50)), torch.arange(16) % 8).backward()
        opt.step()
    except ValueError as error:
        assert "parameter 'embedding.weight' has a sparse gradient" in str(error), error
    else:
        raise AssertionError("a sparse gradient went through")
    # The head's gradients went out before the embedding's raised: a rank that got there first must
    # not shut Horovod down under a rank still sending them.
    hvd.barrier()
    print(f"OK sparse {RANK}", flush=True)


def check_stray() -> None:
    """Horovod's optimizer over parameters the compressor was not bound to: every rank raises a
    ValueError at the first step (the same model on every rank fails at the same gradient)."""
    net = model()
    named = list(net.named_parameters())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), named_parameters=named,
                                   compression=htq.TNQSGD(bits=3, seed=SEED).bind(named[:2], min_elements=0,
                                                                                   exchange="allgather"))
    try:
        sgd_step(opt, net, 0)
    except ValueError as error:
        assert "belongs to none of the 2 named parameters" in str(error), error
    else:
        raise AssertionError("a gradient of an unbound parameter went through")
    print(f"OK stray {RANK}", flush=True)


def check_train() -> None:
    """A few steps of each scheme on a fixed batch: loss goes down, parameters stay identical."""
    for name, make in RANDOM.items():
        net = model()
        opt = htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.2),
                                       named_parameters=net.named_parameters(), compression=make(), min_elements=300)
        losses = [sgd_step(opt, net, 0) for _ in range(12)]
        mean_losses = hvd.allreduce(torch.tensor([losses[0], losses[-1]]), name=f"test.loss.{name}")
        assert mean_losses[1] < 0.8 * mean_losses[0], (name, losses)
        assert_identical_across_ranks(net, f"train.{name}")
    print(f"OK train {RANK}", flush=True)


def noisy_gradient(rank: int, step: int, numel: int) -> torch.Tensor:
    """A fixed Laplace mean per rank plus heavy-tailed noise (Student-t, 3 degrees of freedom) per step:
    the regime where truncation clips part of every step's gradient."""
    g = torch.Generator().manual_seed(rank)
    mean = (torch.rand(numel, generator=g) - 0.5).sign() * -0.2 * torch.log1p(-torch.rand(numel, generator=g))
    g = torch.Generator().manual_seed(10_000 + 1000 * step + rank)
    return mean + torch.randn(numel, generator=g) / (torch.randn(numel, 3, generator=g).pow(2).sum(1) / 3).sqrt()


def check_feedback() -> None:
    """Over many steps on fixed-mean gradients, the average of the exchanged gradients converges to the
    average of the true ones with error feedback (residuals stay bounded), and keeps the truncation's
    bias without it. The true average is computed here from every rank's gradients."""
    numel, steps = 4096, 250
    for exchange, scheme, bits in (("allgather", htq.TNQSGD, 2), ("allgather", htq.TUQSGD, 1),
                                   ("two-phase", htq.TNQSGD, 2), ("two-phase", htq.TNQSGD, 1),
                                   ("node-aware", htq.TNQSGD, 2)):
        errors = {}
        for feedback in (False, True):
            w = torch.nn.Parameter(torch.zeros(numel))
            chosen = htq.NodeAwareExchange(ranks_per_node=2) if exchange == "node-aware" else exchange
            opt = htq.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                           compression=scheme(bits=bits, seed=SEED), exchange=chosen,
                                           error_feedback=feedback)
            exchanged, true, norms = torch.zeros(numel), torch.zeros(numel), []
            for step in range(steps):
                opt.zero_grad()
                (w * noisy_gradient(RANK, step, numel)).sum().backward()
                opt.step()
                exchanged += w.grad
                true += sum(noisy_gradient(r, step, numel) for r in range(SIZE)) / SIZE
                if feedback:
                    norms.append(max(float(r.norm()) for r in opt._compression.feedback.residuals.values()))
            errors[feedback] = float((exchanged - true).norm() / true.norm())
            if feedback:
                quarter = steps // 4
                assert max(norms[-quarter:]) < 3 * max(norms[:quarter]), (exchange, scheme, "residual grows")
        assert errors[False] > 0.15 and errors[True] < min(0.15, errors[False] / 3), \
            (exchange, scheme.__name__, bits, errors)
        if RANK == 0:
            print(f"feedback {exchange} {scheme.__name__} {bits} bits: relative error of the average "
                  f"{errors[False]:.3f} without, {errors[True]:.3f} with", flush=True)
    print(f"OK feedback {RANK}", flush=True)


def check_resume() -> None:
    """A run resumed from every rank's optimizer.state_dict() (momentum, noise steps, residuals of
    both quantizations) continues bit for bit like the run that was not interrupted. Every tensor is
    quantized: Horovod's fused fp32 allreduce of the small ones need not sum in the same order twice."""
    for exchange in ("allgather", "two-phase", "node-aware"):
        def make(net):
            chosen = exchange if exchange == "allgather" else EXCHANGE_KINDS[exchange](4096)
            return htq.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                            named_parameters=net.named_parameters(), min_elements=0,
                                            compression=htq.TNQSGD(bits=2, seed=SEED), exchange=chosen,
                                            error_feedback=True)
        net = model()
        opt = make(net)
        for step in range(3):
            sgd_step(opt, net, step)
        saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
        assert saved_opt["horovod_truncq"]["residuals"], "no residuals saved"
        for step in range(3, 6):
            sgd_step(opt, net, step)
        resumed = model()
        resumed.load_state_dict(saved_net)
        resumed_opt = make(resumed)
        resumed_opt.load_state_dict(saved_opt)
        for step in range(3, 6):
            sgd_step(resumed_opt, resumed, step)
        for (name, a), b in zip(net.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (exchange, name, "resumed run differs")
    foreign = copy.deepcopy(saved_opt)
    foreign["horovod_truncq"]["rank"] = (RANK + 1) % SIZE  # another rank's checkpoint: its residuals are dropped
    resumed_opt.load_state_dict(foreign)
    assert resumed_opt._compression.feedback.residuals == {}
    print(f"OK resume {RANK}", flush=True)


CHECKS = {"exact": check_exact, "none": check_none_matches_horovod, "stock": check_stock_optimizer_same_as_ours,
          "bytes": check_bytes, "features": check_features, "process_set": check_process_set,
          "mismatch": check_mismatch, "train": check_train, "order": check_order,
          "two-phase": check_two_phase, "flush": check_flush, "oneliner": check_oneliner, "sparse": check_sparse,
          "stray": check_stray, "feedback": check_feedback, "resume": check_resume,
          "node-aware": lambda: check_two_phase("node-aware"),
          "node-aware-found": lambda: check_two_phase("node-aware-found"),
          "exact-short": lambda: check_exact(("tnqsgd", "qsgd"), ("mean",))}

for scenario in scenarios:
    CHECKS[scenario]()
hvd.shutdown()
