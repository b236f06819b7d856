"""The compiled passes (torch.compile, inductor's C++ on this machine) compute what the eager ones do,
and a machine where compilation fails falls back to the eager path with a warning."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import horovod_truncq as htq
from torch._dynamo.exc import BackendCompilerFailed
from horovod_truncq import compiling, kernels, packing

COMPILED_FROM = 1 << 14  # passes this large compile in these tests
NUMEL = 3 * COMPILED_FROM + 17  # compiled, and not a whole number of 32-code blocks


@pytest.fixture(autouse=True)
def compile_small_passes(monkeypatch):
    """Compile passes of a few ten thousand elements, so that these tests stay quick."""
    monkeypatch.setattr(compiling, "COMPILE_MIN_ELEMENTS", COMPILED_FROM)


def scaled_sign(seed: int) -> htq.Quantizer:
    """TNQSGD at 1 bit under error feedback: nearest rounding instead of stochastic."""
    return htq.TNQSGD(bits=1, seed=seed).for_error_feedback()


CASES = [
    (htq.TUQSGD, dict(bits=1)),
    (scaled_sign, {}),
    (htq.TNQSGD, dict(bits=3)),
    (htq.TUQSGD, dict(bits=8)),
    (htq.TNQSGD, dict(bits=8)),  # rounded near the Laplace model's companding guess
    (htq.TNQSGD, dict(bits=8, tail="powerlaw")),
    (htq.TBQSGD, dict(bits=2)),
    (htq.TBQSGD, dict(bits=8)),
    (htq.TBQSGD, dict(bits=3, tail="powerlaw")),
    (htq.QSGD, dict(bits=4, bucket_size=500)),
    (htq.QSGD, dict(bits=3, bucket_size=512)),
    (htq.NQSGD, dict(bits=3)),
    (htq.NQSGD, dict(bits=8, bucket_size=1024)),
]


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n,))


@pytest.mark.parametrize("cls, kwargs", CASES, ids=lambda c: getattr(c, "__name__", None) or str(c))
def test_compiled_equals_eager(cls, kwargs, monkeypatch):
    q = cls(seed=3, **kwargs)
    grads = [heavy_tailed(NUMEL, seed) for seed in range(3)]
    monkeypatch.setenv(compiling.COMPILE_ENV, "0")
    eager = torch.stack([q.encode(g, key=(s, 7)) for s, g in enumerate(grads)])
    eager_sum = q.decode_sum(eager, (NUMEL,))
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    compiled = torch.stack([q.encode(g, key=(s, 7)) for s, g in enumerate(grads)])
    assert not compiling.failed_passes()
    assert torch.equal(compiled, eager)
    assert torch.equal(q.decode_sum(compiled, (NUMEL,)), eager_sum)


def test_a_pass_compiled_for_one_row_is_not_reused_for_several(monkeypatch):
    """Encode and decode_rows of several rows give the eager results after the same passes were
    first compiled for one row (traced size-obliviously, the pack pass then wrote row 0's codes into
    every row)."""
    q, rows, numel = htq.TNQSGD(bits=3, seed=4), 4, COMPILED_FROM + 64
    grads = heavy_tailed(rows * numel, 1).view(rows, numel)
    monkeypatch.setenv(compiling.COMPILE_ENV, "0")
    payloads = q.encode_rows(grads, key=(0, 1))
    decoded = q.decode_rows(payloads, numel)
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    for kernel in (kernels.abs_stats_kernel, kernels.round_to_levels_kernel, kernels.pack_kernel,
                   kernels.dequantize_levels_kernel):
        monkeypatch.setattr(kernel, "_compiled", {})
    torch._dynamo.reset()
    q.decode_rows(q.encode_rows(heavy_tailed(rows * numel, 2).view(1, -1), key=(2, 3)), rows * numel)
    assert torch.equal(q.encode_rows(grads, key=(0, 1)), payloads)
    assert torch.equal(q.decode_rows(payloads, numel), decoded)
    assert not compiling.failed_passes()


@pytest.mark.parametrize("q", [htq.TNQSGD(bits=3, seed=2), htq.QSGD(bits=4, bucket_size=500, seed=2)], ids=repr)
def test_rows_of_whole_blocks_compile_to_what_eager_gives(q, monkeypatch):
    """Rows of a whole number of packing blocks (the reducer's large chunks) have no last block:
    compiled, encode_rows, decode_sum and decode_rows into the caller's buffer give the eager results,
    for one row (the owner's re-encode) and for several."""
    rows, numel = 4, 8 * packing.BLOCK * packing.TILE
    grads = heavy_tailed(rows * numel, 0).view(rows, numel)
    monkeypatch.setenv(compiling.COMPILE_ENV, "0")
    payloads, one = q.encode_rows(grads, key=(0, 1)), q.encode_rows(grads[:1], key=(0, 1))
    eager_sum, eager_rows = q.decode_sum(payloads, (numel,)), q.decode_rows(payloads, numel)
    eager_one = q.decode_rows(one, numel)
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    out = torch.empty(rows * numel)
    assert torch.equal(q.encode_rows(grads[:1], key=(0, 1)), one)
    assert torch.equal(q.decode_rows(one, numel), eager_one)
    assert torch.equal(q.encode_rows(grads, key=(0, 1)), payloads)
    assert torch.equal(q.decode_sum(payloads, (numel,)), eager_sum)
    decoded = q.decode_rows(payloads, numel, out=out)
    assert not compiling.failed_passes()
    assert torch.equal(decoded, eager_rows) and decoded.data_ptr() == out.data_ptr()


def test_failed_compilation_falls_back_to_eager(tmp_path):
    script = (
        "import torch, horovod_truncq as htq\n"
        "from horovod_truncq import compiling\n"
        f"compiling.COMPILE_MIN_ELEMENTS = {COMPILED_FROM}\n"
        f"x = torch.randn({NUMEL}, generator=torch.Generator().manual_seed(0))\n"
        "q = htq.TNQSGD(bits=3, seed=1)\n"
        "payload = q.encode(x, key=(0, 7))\n"
        "assert \"pack_into on cpu {'bits': 3}\" in compiling.failed_passes()\n"
        "import os; os.environ[compiling.COMPILE_ENV] = '0'\n"
        "assert torch.equal(payload, htq.TNQSGD(bits=3, seed=1).encode(x, key=(0, 7)))\n"
        "print('same payload')\n")
    env = dict(os.environ, **{compiling.COMPILE_ENV: "1", "CXX": "/bin/false", "CC": "/bin/false",
                              "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same payload" in done.stdout
    assert "torch.compile of" in done.stderr and "runs eagerly from now on" in done.stderr


def test_cuda_options_are_known_to_this_torch():
    """The CUDA passes compile with IEEE division and without fused multiply-adds, and every option
    they pass is one this torch knows: torch.compile checks them as it builds a pass, with no GPU
    needed, and an unknown one would send every pass on a GPU down the eager path."""
    numerics = compiling._eager_cuda_numerics()
    assert "emulate_precision_casts" in numerics  # which also turns off Triton's fused multiply-adds
    assert {"eager_numerics.division_rounding", "emulate_divison_rounding"} & set(numerics)
    for kernel in (kernels.round_to_levels_kernel, kernels.sum_scaled_kernel, kernels.pack_kernel):
        kernel._compile("cuda", {"bits": 3})


def test_a_pass_that_fails_to_compile_runs_eagerly_alone(monkeypatch, caplog):
    """A compilation failure (an inductor bug for one pass, say) sends that pass, and only that pass,
    down the eager path: the payload is the same, the other passes stay compiled."""
    q, x = htq.TUQSGD(bits=3, seed=1), heavy_tailed(NUMEL, 0)
    monkeypatch.setenv(compiling.COMPILE_ENV, "0")
    expected = q.encode(x, key=(0, 7))
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    monkeypatch.setattr(compiling, "_failed", set())

    def broken(*args):
        raise BackendCompilerFailed(broken, RuntimeError("cannot compile this pass"), None)

    monkeypatch.setattr(kernels.pack_kernel, "_compiled", {})
    monkeypatch.setattr(kernels.pack_kernel, "_compile", lambda device_type, static: broken)
    monkeypatch.setattr(kernels.round_to_levels_kernel, "_compiled", {})
    with caplog.at_level("WARNING", logger="horovod_truncq"):
        assert torch.equal(q.encode(x, key=(0, 7)), expected)
        assert torch.equal(q.encode(x, key=(0, 7)), expected)  # no second attempt, no second warning
    assert compiling.failed_passes() == ["pack_into on cpu {'bits': 3}"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "horovod_truncq"]
    assert len(warnings) == 1 and "pack_into" in warnings[0] and "this pass runs eagerly" in warnings[0]
    assert len(kernels.round_to_levels_kernel._compiled) == 1  # the rounding pass ran compiled, and did not fail


@pytest.mark.parametrize("bits", range(2, 9))
def test_powers_of_two_rounding_matches_the_search(bits):
    """NQSGD's codes read off the float's bits are those of the interval search, with the same noise,
    for ratios spread over every octave, on the levels and next to them. At 8 bits the search scales
    the noise by 2^-126 into subnormals, which round: ratios below the first level are left out."""
    count = 2 ** (bits - 1)
    magnitudes = torch.cat([torch.zeros(1), torch.exp2(-torch.arange(count - 2, -1, -1, dtype=torch.float32))])
    generator = torch.Generator().manual_seed(bits)
    spread = torch.rand(200_000, generator=generator) * torch.exp2(-torch.randint(0, count, (200_000,),
                                                                               generator=generator).float())
    ratio = torch.cat([spread, magnitudes, torch.nextafter(magnitudes, torch.tensor(2.0)),
                       torch.nextafter(magnitudes, torch.tensor(-1.0)).clamp(min=0)]).clamp(0, 1)
    if bits == 8:
        ratio = ratio[(ratio >= magnitudes[1]) | (ratio == 0)]
    key = (4242, 77)
    searched = kernels._round(ratio, magnitudes, key, 5)
    assert torch.equal(kernels._round_powers_of_two(ratio, count, key, 5), searched)
    assert set(searched.unique().tolist()) == set(range(count))  # every interval was exercised


@pytest.mark.parametrize("tensor", ["laplace", "student_t", "constant", "tiny", "huge", "sparse"])
def test_companding_guess_finds_the_searched_interval(tensor):
    """TNQSGD (Laplace model) at 8 bits rounds near a closed-form guess of each element's level
    index; the codes, noise included, are those of the binary search over all the levels."""
    generator = torch.Generator().manual_seed(11)
    x = {"laplace": lambda: torch.empty(200_000).exponential_(generator=generator) * (torch.rand(200_000) - 0.5),
         "student_t": lambda: heavy_tailed(200_000, 3),
         "constant": lambda: torch.full((5000,), -2.5),
         "tiny": lambda: torch.randn(50_000, generator=generator) * 1e-30,
         "huge": lambda: torch.randn(50_000, generator=generator) * 1e30,
         "sparse": lambda: torch.randn(50_000, generator=generator) * (torch.rand(50_000) < 0.01)}[tensor]()
    q = htq.TNQSGD(bits=8, seed=0)
    rows = x.view(1, -1)
    levels, _, params = q._levels_and_flag(rows)
    companding = q._companding(params, levels)
    assert companding is not None
    key = (99, 7)
    guessed = kernels.round_to_levels(rows, levels, key, 0, companding)
    assert torch.equal(guessed, kernels.round_to_levels(rows, levels, key, 0))
    if tensor in ("laplace", "student_t"):
        assert guessed.unique().numel() > 200  # most levels were used


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_uniform_levels_computed_are_the_levels(bits):
    """TUQSGD's decode computes its levels from the one above zero and the last, QSGD's magnitudes
    from their step and 1, NQSGD's from the exponent bits: the levels' floats exactly, ends included,
    for any a."""
    from horovod_truncq import levels as lv
    from horovod_truncq.quantizers import _magnitudes
    a = torch.tensor([1.0, 3.0, 1e-30, 3e38, 0.1, 7.123456, 1e-45, 0.0])
    table = lv.uniform_levels(a, 2 ** bits - 1)
    codes = torch.arange(2 ** bits, dtype=torch.int32).expand(len(a), -1)
    assert torch.equal(kernels.grid_values(codes, table), table.gather(1, codes.long()))
    assert torch.equal(table[:, -1], a) and torch.equal(table[:, 0], -a)
    assert bool((table[:-2, 1:] > table[:-2, :-1]).all())  # strictly ascending where a is normal
    if bits > 1:
        index = torch.arange(2 ** (bits - 1), dtype=torch.int32)
        for scheme, grid in (("qsgd", "uniform"), ("nqsgd", "powers_of_two")):
            magnitudes = _magnitudes(scheme, 2 ** (bits - 1), torch.device("cpu"))
            assert torch.equal(kernels._magnitude_values(index, magnitudes, grid), magnitudes)
            assert magnitudes[0] == 0 and magnitudes[-1] == 1 and bool((magnitudes[1:] > magnitudes[:-1]).all())


def test_an_error_that_is_not_the_compilers_propagates(monkeypatch):
    """Only compiler failures send a pass down the eager path: any other error is the caller's,
    raised as it is, and the pass stays compiled for the next call."""
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    monkeypatch.setattr(compiling, "_failed", set())

    def out_of_memory(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kernels.pack_kernel, "_compiled", {})
    monkeypatch.setattr(kernels.pack_kernel, "_compile", lambda device_type, static: out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        htq.TUQSGD(bits=3, seed=1).encode(heavy_tailed(NUMEL, 0))
    assert compiling.failed_passes() == []


def test_tensor_sizes_and_row_counts_do_not_recompile(monkeypatch):
    """Every scheme's passes compile once per bit width for all tensor sizes (QSGD and NQSGD with and
    without buckets: with them, the number of norms changes with the size) and all numbers of rows,
    apart from the dimensions of size 1 and 0 that dynamo specialises (one row, as the exchange's
    re-encode; a last packing block of one column of 32 codes, or of none, as in the reducer's large
    chunks): once these have been seen, new sizes and row counts compile nothing. Compilations
    counted by a backend that only counts. TBQSGD's threshold search, a few operations on one small
    vector per row, compiles once per number of rows; it runs eagerly here."""
    compiled = []
    monkeypatch.setattr(kernels.biscaled_search_kernel, "min_elements", 1 << 62)

    def counting(graph, inputs):
        compiled.append(graph)
        return graph.forward

    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    monkeypatch.setattr(compiling, "backend", counting)
    torch._dynamo.reset()
    quantizers = [scheme(bits=3, seed=1) for scheme in htq.SCHEMES.values()]
    quantizers += [htq.QSGD(bits=3, bucket_size=512, seed=1), htq.NQSGD(bits=3, bucket_size=512, seed=1)]
    for q in quantizers:
        for kernel in vars(kernels).values():
            if isinstance(kernel, compiling.Kernel):
                monkeypatch.setattr(kernel, "_compiled", {})
        counts = []
        # last block: 1, 2, 5, 18, 0, 0, 9 and 31 columns
        for rows, numel in ((2, NUMEL), (1, 2 * NUMEL + 1), (8, 3 * NUMEL + 100), (1, NUMEL + 545),
                            (4, 4 * NUMEL - 68), (1, 8 * NUMEL - 136), (3, 5 * NUMEL + 200), (1, 4 * NUMEL + 900)):
            payloads = q.encode_rows(heavy_tailed(numel, 0).view(1, -1).expand(rows, -1), key=(0, 1))
            q.decode_sum(payloads, (numel,))
            q.decode_rows(payloads, numel)
            counts.append(len(compiled))
        assert 0 < counts[0] <= counts[1] <= counts[2] <= counts[3] <= counts[4] <= counts[5] == counts[6] == counts[7], \
            (repr(q), counts)
        compiled.clear()


PROBE_LOCK = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'w'), fcntl.LOCK_EX | fcntl.LOCK_NB)"


def test_the_processes_of_a_machine_compile_one_at_a_time(monkeypatch):
    """A pass's first compiled call holds a lock in inductor's cache folder that another process
    cannot take meanwhile, and only the first call of each compilation (several rows, one row) takes it."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    probe = [sys.executable, "-c", PROBE_LOCK, os.path.join(cache_dir(), "horovod_truncq.lock")]
    taken, lock = [], compiling._one_compiler_per_machine

    @contextlib.contextmanager
    def probing():
        with lock():
            taken.append(subprocess.run(probe, capture_output=True, text=True))
            yield

    monkeypatch.setattr(compiling, "_one_compiler_per_machine", probing)
    monkeypatch.setattr(kernels.abs_stats_kernel, "_compiled", {})
    monkeypatch.setattr(kernels.abs_stats_kernel, "_called", set())
    for rows in (2, 1, 3, 1):
        kernels.abs_stats_kernel(NUMEL, heavy_tailed(rows * NUMEL, rows).view(rows, -1))
    assert len(taken) == 2 and all("BlockingIOError" in probed.stderr for probed in taken)
    assert subprocess.run(probe).returncode == 0  # released
