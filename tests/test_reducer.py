"""The exchange and the reducer over the in-process transport (W ranks as threads), with results
predicted exactly from the codec's own operations, written out here step by step."""
import pytest
import torch

import horovod_truncq as htq
from horovod_truncq import noise
from horovod_truncq.groups import ThreadWorld, run_ranks
from horovod_truncq.reducer import Reducer, plan_buckets
from horovod_truncq.staging import TensorBuckets
from horovod_truncq.state import State, agree

SEED = 11
SIZES = [("head", 3000), ("bias", 40), ("body", 5000), ("unused", 1500)]


def gradients(rank: int, step: int, sizes=SIZES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    grads = {name: torch.randn(numel, generator=g) / (1 + torch.rand(numel, generator=g) * 10) for name, numel in sizes}
    if "unused" in grads:
        grads["unused"] = torch.zeros(grads["unused"].numel())  # no rank computes it
    return grads


def chunk_of(numel: int, ranks: int) -> int:
    """Elements per owner: W equal chunks of whole 32-code blocks, or of 2048-code blocks of packed
    words where a chunk has at least 2^18 elements."""
    block = 2048 if numel >= ranks * (1 << 18) else 32
    return -(-numel // (ranks * block)) * block


def run(world: ThreadWorld, exchange, quantizer, steps: int = 2, bucket_bytes: int = 4 * 6000, state_in=None,
        sizes=SIZES):
    """Every rank submits its gradients in its own order for `steps` steps; per rank: the results of
    each step, the bytes counted and the final state."""
    def rank_job(group):
        state = State("test", SEED, group.rank)
        if state_in is not None:
            state.load_state_dict(state_in[group.rank])
        reducer = Reducer(quantizer, exchange, group, state)
        staging = TensorBuckets(reducer, plan_buckets(sizes, bucket_bytes), state)
        results, traffic = [], []
        for step in range(state.step, state.step + steps):
            grads = gradients(group.rank, step, sizes)
            order = sizes if group.rank % 2 == 0 else sizes[::-1]
            waiters = {name: staging.submit(name, grads[name], computed=name != "unused") for name, _ in order}
            results.append({name: waiters[name]() for name, _ in sizes})
            traffic.append(state.traffic.take())
        return results, traffic, state.state_dict()
    return run_ranks(world, rank_job)


def predicted(quantizer, second, world_size: int, nodes: list[list[int]], step: int, bucket_bytes: int = 4 * 6000,
              sizes=SIZES):
    """The bucketed exchange written out with encode_rows / decode_sum / decode_rows alone."""
    out = {}
    for bucket in plan_buckets(sizes, bucket_bytes):
        flat = {r: torch.cat([gradients(r, step, sizes)[name] for name in bucket.names]) for r in range(world_size)}
        chunk = chunk_of(bucket.numel, world_size)
        padded = {r: torch.cat([flat[r], torch.zeros(world_size * chunk - bucket.numel)]) for r in range(world_size)}
        per_node, peers = len(nodes[0]), len(nodes)
        # node sums: rank p of each node holds part p of its node's sum
        part = {}
        for members in nodes:
            total = torch.stack([padded[r] for r in members]).sum(dim=0) if per_node > 1 else padded[members[0]]
            for p, r in enumerate(members):
                part[r] = total.view(per_node, -1)[p].view(peers, chunk)
        scattered = {r: quantizer.encode_rows(part[r], noise.stream_key(SEED, r, f"{bucket.name}.scatter", step))
                     for r in range(world_size)}
        reduced = {}
        for members in nodes:
            for p, owner in enumerate(members):
                node_index = nodes.index(members)
                rows = torch.stack([scattered[other[p]][node_index] for other in nodes])
                total = quantizer.decode_sum(rows, (chunk,))
                reduced[(p, node_index)] = second.encode_rows(
                    total.view(1, -1), noise.stream_key(SEED, owner, f"{bucket.name}.gather", step))[0]
        chunks = torch.stack([reduced[(p, m)] for p in range(per_node) for m in range(peers)])
        values = second.decode_rows(chunks, chunk).reshape(-1)
        for name, offset, numel in zip(bucket.names, bucket.offsets(), bucket.sizes):
            out[name] = values[offset:offset + numel] if name != "unused" else torch.zeros(numel)
    return out


@pytest.mark.parametrize("size, per_node, exchange", [
    (2, 1, htq.TwoPhaseExchange()), (3, 1, htq.TwoPhaseExchange()), (5, 1, htq.TwoPhaseExchange(second_bits=4)),
    (8, 1, htq.TwoPhaseExchange()), (4, 2, htq.NodeAwareExchange()), (8, 4, htq.NodeAwareExchange(second_bits=2)),
    (6, 3, htq.NodeAwareExchange(ranks_per_node=2))])
def test_results_are_predicted_bit_for_bit(size, per_node, exchange):
    quantizer = htq.TNQSGD(bits=3)
    second = quantizer if exchange.second_bits is None else quantizer.with_bits(exchange.second_bits)
    outputs = run(ThreadWorld(size, per_node), exchange, quantizer)
    n = exchange.ranks_per_node or per_node if isinstance(exchange, htq.NodeAwareExchange) else 1
    nodes = [list(range(first, first + n)) for first in range(0, size, n)]
    for step in range(2):
        expected = predicted(quantizer, second, size, nodes, step)
        for results, _, _ in outputs:
            for name, _ in SIZES:
                assert torch.equal(results[step][name], expected[name]), (step, name)
    assert outputs[0][2]["step"] == 2


def test_large_chunks_are_whole_blocks_of_packed_words():
    """A bucket whose chunks reach 2^18 elements is padded to chunks of whole 2048-code blocks; the
    results are still predicted bit for bit, and the bytes follow the padded chunk."""
    sizes, exchange, quantizer = [("conv", 700_001), ("fc", 300_000)], htq.TwoPhaseExchange(), htq.TNQSGD(bits=3)
    outputs = run(ThreadWorld(2), exchange, quantizer, steps=1, bucket_bytes=8 << 20, sizes=sizes)
    expected = predicted(quantizer, quantizer, 2, [[0], [1]], 0, bucket_bytes=8 << 20, sizes=sizes)
    chunk = 501_760  # 245 blocks of 2048 codes: 1,000,001 elements in 2 chunks of at least 500,000.5
    row = payload_bytes(chunk, 3) + 4  # trailer: one byte per tensor, in a whole word
    for results, traffic, _ in outputs:
        assert all(torch.equal(results[0][name], expected[name]) for name, _ in sizes)
        assert traffic[0].sent == traffic[0].received == 2 * row


def payload_bytes(numel: int, bits: int) -> int:
    """TNQSGD: 16-byte header, 2^b float32 levels, b words per 32 codes."""
    return 16 + 4 * 2 ** bits + 4 * bits * -(-numel // 32)


@pytest.mark.parametrize("size, per_node", [(4, 1), (8, 1), (4, 2), (8, 4)])
def test_bytes_counted_match_the_formula(size, per_node):
    exchange = htq.NodeAwareExchange() if per_node > 1 else htq.TwoPhaseExchange()
    outputs = run(ThreadWorld(size, per_node), exchange, htq.TNQSGD(bits=3), steps=1)
    peers = size // per_node
    expected = 0
    for bucket in plan_buckets(SIZES, 4 * 6000):
        chunk = chunk_of(bucket.numel, size)
        trailer = -(-len(bucket.sizes) // 4) * 4  # one byte per tensor of the bucket, in whole words
        row = payload_bytes(chunk, 3) + trailer
        expected += 2 * (peers - 1) * row  # scatter and gather between nodes
        if per_node > 1:  # float32 parts inside a node, then the payloads shared
            expected += (per_node - 1) * 4 * peers * chunk + (per_node - 1) * peers * row
    for _, traffic, _ in outputs:
        assert traffic[0].sent == traffic[0].received == expected


def test_a_tensor_no_rank_computed_comes_back_zero():
    """Computed by no rank: exactly zero (not rounding noise)."""
    outputs = run(ThreadWorld(4), htq.TwoPhaseExchange(), htq.TNQSGD(bits=2), steps=1)
    for results, _, _ in outputs:
        assert torch.equal(results[0]["unused"], torch.zeros(1500))
        assert results[0]["head"].abs().sum() > 0


def test_presence_flags_each_tensor_holding_a_non_zero():
    """What the DDP hook sends for tensors it cannot tell computed: NaN, Inf and either sign count,
    zeros (of either sign) and empty tensors do not."""
    reducer = Reducer(htq.TNQSGD(bits=3), htq.TwoPhaseExchange(), ThreadWorld(1).group(0), State("test", SEED, 0))
    values = [[0.0, 0.0], [0.0, -2.0], [], [float("nan"), 0.0], [-0.0, 0.0], [float("-inf")], [0.0, 3.0, 0.0]]
    bucket = plan_buckets([(str(i), len(v)) for i, v in enumerate(values)], 1 << 20)[0]
    flat = torch.tensor([x for v in values for x in v] + [5.0] * 4)  # padding after the bucket is ignored
    assert reducer.presence(bucket, flat).tolist() == [0, 1, 0, 1, 0, 1, 1]


def test_nan_makes_its_whole_bucket_nan_on_every_rank():
    def job(group):
        state = State("test", SEED, group.rank)
        reducer = Reducer(htq.TUQSGD(bits=3), htq.TwoPhaseExchange(), group, state)
        staging = TensorBuckets(reducer, plan_buckets([("a", 1000), ("b", 1000), ("c", 9000)], 8000), state)
        grads = {"a": torch.randn(1000), "b": torch.randn(1000), "c": torch.randn(9000)}
        if group.rank == 1:
            grads["a"][3] = float("nan")
        waiters = {name: staging.submit(name, g) for name, g in grads.items()}
        return {name: wait() for name, wait in waiters.items()}
    for result in run_ranks(ThreadWorld(3), job):
        assert torch.isnan(result["a"]).all() and torch.isnan(result["b"]).all()
        assert torch.isfinite(result["c"]).all()


def test_state_resumes_bit_for_bit_with_error_feedback():
    """Three steps, the state saved; two more steps, and the same two steps from the saved state on
    new reducers: equal bit for bit (noise step, seed and both residuals restored)."""
    exchange, quantizer = htq.NodeAwareExchange(), htq.TNQSGD(bits=2)

    def job(group, saved, steps):
        state = State("test", None, group.rank, feedback_decay=1.0)
        if saved is not None:
            state.load_state_dict(saved[group.rank])
        staging = TensorBuckets(Reducer(quantizer, exchange, group, state), plan_buckets(SIZES, 4 * 6000), state)
        results = []
        for _ in range(steps):
            grads = gradients(group.rank, state.step)
            waiters = {name: staging.submit(name, grads[name], computed=name != "unused") for name, _ in SIZES}
            results.append({name: wait() for name, wait in waiters.items()})
        return results, state.state_dict()

    world = ThreadWorld(4, 2)
    first = run_ranks(world, job, None, 3)
    saved = [state for _, state in first]
    assert all(state["residuals"] for state in saved)
    going_on = run_ranks(world, job, saved, 2)
    resumed = run_ranks(world, job, saved, 2)
    for (a, _), (b, _) in zip(going_on, resumed):
        for step_a, step_b in zip(a, b):
            assert all(torch.equal(step_a[name], step_b[name]) for name, _ in SIZES)


def test_error_feedback_converges_to_the_true_average():
    """Over many steps on gradients with a fixed heavy-tailed mean, the sum of the exchanged
    gradients approaches the sum of the true ones with error feedback, and keeps the truncation's
    bias without it."""
    numel, steps, size = 4096, 250, 4

    def gradient(rank, step):
        """A fixed Laplace mean per rank plus Student-t noise (3 degrees of freedom) per step: the
        regime where truncation clips part of every step's gradient."""
        g = torch.Generator().manual_seed(rank)
        mean = (torch.rand(numel, generator=g) - 0.5).sign() * -0.2 * torch.log1p(-torch.rand(numel, generator=g))
        g = torch.Generator().manual_seed(10_000 + 1000 * step + rank)
        return mean + torch.randn(numel, generator=g) / (torch.randn(numel, 3, generator=g).pow(2).sum(1) / 3).sqrt()

    def job(group, decay):
        state = State("test", SEED, group.rank, feedback_decay=decay)
        staging = TensorBuckets(Reducer(htq.TNQSGD(bits=2), htq.TwoPhaseExchange(), group, state),
                                plan_buckets([("w", numel)], 1 << 20), state)
        total = torch.zeros(numel)
        for step in range(steps):
            total += staging.submit("w", gradient(group.rank, step))()
        return total

    true = sum(gradient(r, s) for r in range(size) for s in range(steps))
    errors = {decay: float((run_ranks(ThreadWorld(size), job, decay)[0] - true).norm() / true.norm())
              for decay in (0.0, 1.0)}
    assert errors[0.0] > 0.15 and errors[1.0] < min(0.15, errors[0.0] / 3), errors


def test_mismatched_settings_raise_on_every_rank():
    def job(group):
        try:
            agree(group, f"bits={3 + group.rank % 2}")
        except ValueError as error:
            return str(error)
        return None
    messages = run_ranks(ThreadWorld(3), job)
    assert all(m is not None and "rank 0: bits=3" in m and "rank 1: bits=4" in m for m in messages)
    assert run_ranks(ThreadWorld(3), lambda group: agree(group, "same")) == [None] * 3


def test_bad_exchange_settings_are_refused():
    for make, match in ((lambda: htq.TwoPhaseExchange(bucket_bytes=2), "bucket_bytes"),
                        (lambda: htq.TwoPhaseExchange(second_bits=9), "second_bits"),
                        (lambda: htq.NodeAwareExchange(ranks_per_node=0), "ranks_per_node")):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="does not divide"):
        htq.NodeAwareExchange(ranks_per_node=3).nodes_of(ThreadWorld(4).group(0))
