import logging
import math

import pytest
import torch

import horovod_truncq as htq
from horovod_truncq import levels as lv
from horovod_truncq import noise, wire
from horovod_truncq.tails import Laplace, PowerLaw

TRUNCATED = [htq.TUQSGD, htq.TNQSGD, htq.TBQSGD]
ALL_SCHEMES = TRUNCATED + [htq.QSGD, htq.NQSGD]


def configurations(bits_list=(2, 3)):
    """(id, factory) for every scheme and tail at the given bit widths."""
    out = []
    for bits in bits_list:
        for cls in TRUNCATED:
            for tail in ("laplace", "powerlaw"):
                out.append(pytest.param(cls, dict(bits=bits, tail=tail), id=f"{cls.__name__}-{tail}-{bits}"))
        for cls in (htq.QSGD, htq.NQSGD):
            out.append(pytest.param(cls, dict(bits=bits), id=f"{cls.__name__}-{bits}"))
    return out


def laplace(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.empty(n).exponential_(generator=generator)
    return magnitude * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)


def student_t(n, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n,))


def lambert_w(x: float) -> float:
    w = math.log(1 + x)
    for _ in range(50):
        w -= (w * math.exp(w) - x) / (math.exp(w) * (w + 1))
    return w


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_bits_outside_range_raise(cls):
    for bits in (cls.min_bits - 1, 9, 2.5, True, "3"):
        with pytest.raises(ValueError, match=f"bits from {cls.min_bits} to 8"):
            cls(bits=bits)


def test_minimum_bits():
    assert htq.TUQSGD(bits=1).bits == 1 and htq.TNQSGD(bits=1).bits == 1
    assert htq.QSGD.min_bits == htq.TBQSGD.min_bits == htq.NQSGD.min_bits == 2


def test_unknown_tail_raises():
    with pytest.raises(ValueError, match="tail must be one of"):
        htq.TNQSGD(bits=3, tail="gaussian")


def test_bad_bucket_size_raises():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="bucket_size"):
            htq.QSGD(bits=4, bucket_size=bad)


def test_bucket_larger_than_tensor_is_clamped():
    """A bucket never exceeds the tensor: one norm, and no padding to the requested bucket size."""
    q = htq.QSGD(bits=4, bucket_size=50_000_000, seed=0)
    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    payload = q.encode(x)
    assert payload.numel() == 16 + 4 + 4 * 4 == q.payload_size(10)
    assert torch.equal(q.decode(payload, x.shape), htq.QSGD(bits=4, seed=0).decode(htq.QSGD(bits=4, seed=0).encode(x), x.shape))


# ---------------------------------------------------------------- bytes
def expected_payload_bytes(cls, bits: int, numel: int, bucket_size=None) -> int:
    """wire.py's layout, from its description: 16-byte header, float32 side information (the 2^b
    levels, or one norm per bucket of min(bucket_size, numel) elements), codes in whole 32-code
    blocks of b int32 words."""
    if cls in TRUNCATED:
        side = 2 ** bits
    else:
        bucket = min(bucket_size or numel, numel) or 1
        side = max(1, math.ceil(numel / bucket))
    return 16 + 4 * side + 4 * bits * math.ceil(numel / 32)


@pytest.mark.parametrize("cls, kwargs", configurations((2, 4, 8)) + [
    pytest.param(htq.QSGD, dict(bits=3, bucket_size=512), id="QSGD-bucket512")])
@pytest.mark.parametrize("numel", [1, 9, 32, 1000, 1025])
def test_payload_size_formula(cls, kwargs, numel):
    q = cls(**kwargs)
    expected = expected_payload_bytes(cls, kwargs["bits"], numel, kwargs.get("bucket_size"))
    assert q.payload_size(numel) == expected
    for seed in (0, 1):  # different data, same shape: same size (so every rank sends the same bytes)
        assert q.encode(torch.randn(numel, generator=torch.Generator().manual_seed(seed))).numel() == expected


def test_side_information_counts():
    assert htq.TUQSGD(bits=3, tail="laplace").side_info_count(10) == 8      # the levels
    assert htq.TNQSGD(bits=1, tail="powerlaw").side_info_count(10) == 2
    assert htq.TBQSGD(bits=8).side_info_count(10) == 256
    assert htq.QSGD(bits=3).side_info_count(1000) == 1
    assert htq.QSGD(bits=3, bucket_size=512).side_info_count(1025) == 3


@pytest.mark.parametrize("cls", [htq.QSGD, htq.NQSGD])
@pytest.mark.parametrize("bucket_size", [512, 100, None])
def test_norm_scaled_decode_scales_each_code_by_its_buckets_norm(cls, bucket_size):
    """decode equals sign * magnitude[code] * norm[i // bucket] computed in plain torch from the
    payload's norms and unpacked codes, over several whole packing blocks and a partial last one
    (compiled path), with buckets aligned to the blocks' rows (512), not aligned (100) and one."""
    n, bits = 40_000, 3
    q = cls(bits=bits, bucket_size=bucket_size, seed=2)
    x = laplace(n, seed=5) * torch.linspace(0.1, 10, n)  # a different norm in every bucket
    payload = q.encode(x)
    count = q.side_info_count(n)
    norms = payload[16:16 + 4 * count].clone().view(torch.float32)
    codes = htq.unpack(payload[16 + 4 * count:], bits, n).long()
    magnitudes = [0, 1 / 3, 2 / 3, 1] if cls is htq.QSGD else [0, 0.25, 0.5, 1]
    magnitude = torch.tensor(magnitudes)[codes & 3]
    expected = torch.where(codes >= 4, -magnitude, magnitude) * norms[torch.arange(n) // (bucket_size or n)]
    torch.testing.assert_close(q.decode(payload, (n,)), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.decode_sum(torch.stack([payload, payload]), (n,)), 2 * expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", TRUNCATED)
def test_levels_travel_in_the_payload(cls):
    q = cls(bits=3, seed=0)
    x = student_t(5000)
    side = q.encode(x)[16:16 + 4 * 8].clone().view(torch.float32)
    assert torch.equal(side, q.levels(x))
    assert bool((side[1:] >= side[:-1]).all()) and side[-1] == -side[0]
    assert 0 < side[-1] <= x.abs().max()  # a threshold beyond the largest magnitude only adds variance


@pytest.mark.parametrize("cls", TRUNCATED)
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_levels_are_antisymmetric(cls, bits):
    """Encoding rounds |g| on the upper half of the levels and mirrors the code by the sign: exact
    only if level s - j is exactly -(level j)."""
    if bits < cls.min_bits:
        pytest.skip(f"{cls.__name__} needs {cls.min_bits} bits")
    for tail in ("laplace", "powerlaw"):
        levels = cls(bits=bits, tail=tail).levels(student_t(5000))
        assert torch.equal(levels, -levels.flip(0))
        assert bool((levels[1:] > levels[:-1]).all())


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("cls", TRUNCATED)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_element_goes_to_a_neighbouring_level(cls, bits):
    """Whatever the rounding path (interval search, or arithmetic for levels of one or two
    spacings), each decoded element is one of the two levels around its truncated value."""
    q = cls(bits=bits, seed=5)
    x = student_t(40_000, seed=11)
    grid = q.levels(x)
    target = x.clamp(grid[0], grid[-1])
    decoded = q.decode(q.encode(x), x.shape)
    index = (torch.searchsorted(grid, target, right=True) - 1).clamp(0, grid.numel() - 2)
    assert bool(((decoded == grid[index]) | (decoded == grid[index + 1])).all())


@pytest.mark.parametrize("cls, kwargs", configurations((2, 3)))
def test_unbiased_for_the_truncated_value(cls, kwargs):
    """Mean of 1024 independent roundings of a fixed vector -> its truncated value, per element.

    The vector is repeated 1024 times inside one tensor (same empirical distribution, so the same
    threshold and levels; one bucket per copy for the norm-scaled schemes); each element's tolerance
    is 5 standard errors of its own rounding.
    """
    if cls in (htq.QSGD, htq.NQSGD):
        kwargs = dict(kwargs, bucket_size=64)  # one bucket per copy: the norm is that of one copy
    q = cls(seed=7, **kwargs)
    base = student_t(64, seed=3)
    copies = 1024
    decoded = q.decode(q.encode(base.repeat(copies)), (copies * 64,)).view(copies, 64)
    if isinstance(q, htq.quantizers._Truncated):
        a = q.threshold(base.repeat(copies))
        assert a == pytest.approx(q.threshold(base), rel=1e-5)
        target, grid = base.clamp(-a, a), q.levels(base.repeat(copies))
    else:
        norm = base.norm()
        magnitudes = htq.quantizers._magnitudes(q.scheme, q.magnitude_count, base.device)
        target, grid = base, torch.cat([-magnitudes.flip(0), magnitudes]) * norm
    index = (torch.searchsorted(grid, target, right=True) - 1).clamp(0, grid.numel() - 2)
    lo, hi = grid[index], grid[index + 1]
    variance = ((target - lo) * (hi - target)).clamp_min(0)
    tolerance = 5 * torch.sqrt(variance / copies) + 1e-5 * (1 + target.abs())
    error = (decoded.mean(0) - target).abs()
    assert bool((error <= tolerance).all()), f"max excess {(error - tolerance).max():.3g}"
    # power check: rounding to the nearest level (biased) would fail this tolerance
    nearest = torch.where(target - lo < hi - target, lo, hi)
    assert bool(((nearest - target).abs() > tolerance).any())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_laplace_thresholds_match_closed_forms(bits):
    s = 2 ** bits - 1
    x = laplace(200_000)
    gamma = x.abs().mean().item()
    amax = x.abs().max().item()  # a threshold beyond the largest magnitude only adds variance
    tn = htq.TNQSGD(bits=bits, tail="laplace").threshold(x)
    tu = htq.TUQSGD(bits=bits, tail="laplace").threshold(x)
    assert tn == pytest.approx(min(amax, 3 * gamma * math.log(1 + math.sqrt(6) / 9 * s)), rel=1e-3)
    assert tu == pytest.approx(min(amax, gamma * lambert_w(s * s)), rel=1e-3)
    # the closed forms are the minima of the error objectives: the numerical search finds them too
    params, far = torch.tensor([[gamma]], dtype=torch.float64), torch.tensor([1e3 * gamma], dtype=torch.float64)
    assert float(lv.nonuniform_threshold(Laplace, params, far, s)) == pytest.approx(
        3 * gamma * math.log(1 + math.sqrt(6) / 9 * s), rel=1e-3)
    assert float(lv.uniform_threshold(Laplace, params, far, s)) == pytest.approx(gamma * lambert_w(s * s), rel=1e-3)


@pytest.mark.parametrize("bits, tn_bound, tu_bound", [(2, 0.60612, 0.68635), (3, 0.23697, 0.28145),
                                                       (4, 0.07742, 0.10773), (8, 0.00040, 0.00149)])
def test_laplace_error_below_published_bound(bits, tn_bound, tu_bound):
    x = laplace(400_000, seed=11)
    gamma2 = x.abs().mean().item() ** 2
    for cls, bound in ((htq.TNQSGD, tn_bound), (htq.TUQSGD, tu_bound)):
        q = cls(bits=bits, tail="laplace", seed=1)
        mse = ((q.decode(q.encode(x), x.shape) - x) ** 2).mean().item()
        assert mse < bound * gamma2, f"{cls.__name__} b={bits}: {mse} >= {bound * gamma2}"
        assert mse > 0.5 * bound * gamma2  # the bound is tight to within 2x: a broken threshold would show


@pytest.mark.parametrize("bits, tu, tn", [(2, 0.938, 0.919), (3, 1.523, 1.718), (4, 2.354, 4.189)])
def test_powerlaw_thresholds_match_reference(bits, tu, tn):
    params = torch.tensor([1.0, 4.5], dtype=torch.float64)
    amax = torch.tensor(1e6, dtype=torch.float64)
    s = 2 ** bits - 1
    assert lv.uniform_threshold(PowerLaw, params, amax, s).item() == pytest.approx(tu, abs=1e-3)
    assert lv.nonuniform_threshold(PowerLaw, params, amax, s).item() == pytest.approx(tn, abs=1e-3)


def test_truncation_is_the_point():
    """Design note §4: uniform levels up to a = 50 at b = 4 err ~11; truncated ~0.057."""
    params = torch.tensor([1.0, 4.5], dtype=torch.float64)
    a = torch.tensor(50.0, dtype=torch.float64)
    untruncated = (a / 15) ** 2 + PowerLaw.truncation_error(params, a)
    best = lv.uniform_threshold(PowerLaw, params, torch.tensor(1e6, dtype=torch.float64), 15)
    truncated = (best / 15) ** 2 + PowerLaw.truncation_error(params, best)
    assert untruncated.item() == pytest.approx(11.1, abs=0.1)
    assert truncated.item() == pytest.approx(0.057, abs=0.001)


def test_powerlaw_fit_recovers_pareto_tail():
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(5))
    g0, rho = 1.0, 4.5
    c = (rho - 1) / (2 * rho * g0)
    body = 2 * c * g0  # P(|g| <= g0)
    magnitude = torch.where(u < body, u / (2 * c), g0 * ((1 - u) * rho) ** (-1 / (rho - 1)))
    fitted = PowerLaw.fit(magnitude, magnitude.mean())
    assert fitted[1].item() == pytest.approx(rho, rel=0.05)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("data", ["student-t", "pareto"])
def test_truncation_beats_qsgd_on_heavy_tails(bits, data):
    if data == "student-t":
        x = student_t(200_000, seed=2)
    else:
        u = torch.rand(200_000, generator=torch.Generator().manual_seed(3))
        x = torch.sign(u - 0.5) * (1 - torch.rand(200_000, generator=torch.Generator().manual_seed(4))) ** (-1 / 2.5)
    def mse(q):
        return ((q.decode(q.encode(x), x.shape) - x) ** 2).mean().item()
    qsgd = mse(htq.QSGD(bits=bits, seed=0))
    for cls in TRUNCATED:
        for tail in ("laplace", "powerlaw"):
            assert mse(cls(bits=bits, tail=tail, seed=0)) < qsgd / 10, (cls.__name__, tail)


# ---------------------------------------------------------------- input handling
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_dtypes_round_trip(cls, dtype):
    """Any float dtype is quantized as its float32 value; the result comes back in that dtype."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    q, reference = cls(bits=8, seed=1), cls(bits=8, seed=1)
    y = q.decode(q.encode(x), x.shape, x.dtype)
    expected = reference.decode(reference.encode(x.float()), x.shape).to(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, expected)


@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_non_contiguous_input(cls):
    q1, q2 = cls(bits=4, seed=3), cls(bits=4, seed=3)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).t()
    assert not x.is_contiguous()
    assert torch.equal(q1.encode(x), q2.encode(x.contiguous()))
    assert q1.decode(q1.encode(x), x.shape).shape == (32, 64)


@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_degenerate_tensors(cls):
    q = cls(bits=3, seed=0)
    empty = torch.empty(0, 5)
    assert q.decode(q.encode(empty), empty.shape).shape == (0, 5)
    scalar = torch.tensor(-2.5)
    assert torch.equal(q.decode(q.encode(scalar), scalar.shape), scalar)
    zeros = torch.zeros(100)
    assert torch.equal(q.decode(q.encode(zeros), zeros.shape), zeros)
    few = torch.tensor([0.3, -1.2, 4.0])  # fewer elements than levels
    y = q.decode(q.encode(few), few.shape)
    assert torch.isfinite(y).all() and y.abs().max() <= few.norm() * (1 + 1e-6)


@pytest.mark.parametrize("cls", TRUNCATED)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("value", [0.1, 0.7, -3.0, 1e-20])
def test_constant_tensor_is_exact(cls, bits, value):
    q = cls(bits=bits, seed=0)
    x = torch.full((1000,), value)
    decoded = q.decode(q.encode(x), x.shape)
    assert torch.equal(decoded, x), decoded[:3].tolist()
    signs = torch.full((1000,), value) * torch.where(torch.arange(1000) % 3 == 0, -1.0, 1.0)
    assert torch.equal(q.decode(q.encode(signs), signs.shape), signs)


@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_non_floating_tensors_are_refused(cls):
    with pytest.raises(TypeError, match="floating-point"):
        cls(bits=4).encode(torch.arange(10))


@pytest.mark.parametrize("cls", ALL_SCHEMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_decodes_all_nan_and_warns_once(cls, bad, caplog):
    q = cls(bits=4)
    x = torch.randn(100)
    x[17] = bad
    with caplog.at_level(logging.WARNING, logger="horovod_truncq"):
        first = q.decode(q.encode(x), x.shape)
        second = q.decode(q.encode(x), x.shape)
    assert torch.isnan(first).all() and torch.isnan(second).all()
    assert sum("NaN or Inf" in r.getMessage() for r in caplog.records) == 1
    clean = torch.randn(100)
    assert torch.isfinite(q.decode(q.encode(clean), clean.shape)).all()


@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_overflowing_side_information_is_flagged_not_corrupt(cls):
    """Finite values of magnitude 3e38: a well-formed payload either way. Where the side information
    overflows float32 (a norm; the levels of TNQSGD and TBQSGD), it decodes to all NaN, like NaN
    input (an fp32 allreduce of such gradients overflows too). TUQSGD's levels, (2j - s) a/s clamped
    to ±a, stay finite, and all magnitudes being equal, the tensor comes back exactly."""
    q = cls(bits=4)
    x = torch.full((1000,), 3e38) * torch.where(torch.arange(1000) % 2 == 0, 1.0, -1.0)
    assert torch.isfinite(x).all()
    payload = q.encode(x)
    side = payload[wire.HEADER_BYTES:wire.HEADER_BYTES + 4 * q.side_info_count(1000)].clone().view(torch.float32)
    assert torch.isfinite(side).all()
    if cls is htq.TUQSGD:
        assert torch.equal(q.decode(payload, x.shape), x)
    else:
        assert torch.isnan(q.decode(payload, x.shape)).all()


def test_compress_outside_horovods_optimizer_says_what_to_use():
    """compress serves hvd.DistributedOptimizer(compression=q) only: called by anything else, it
    says so rather than making a payload nobody can reduce."""
    with pytest.raises(TypeError, match="use q.encode and q.decode"):
        htq.TNQSGD(bits=8).compress(torch.randn(10))


# ---------------------------------------------------------------- bad payloads
@pytest.fixture
def payload():
    q = htq.TNQSGD(bits=3, seed=0)
    return q, q.encode(torch.randn(100))


def test_truncated_payload(payload):
    q, p = payload
    with pytest.raises(ValueError, match="truncated or padded"):
        q.decode(p[:-1], (100,))
    with pytest.raises(ValueError, match="shorter than"):
        q.decode(p[:5], (100,))


def test_other_scheme_or_bits(payload):
    _, p = payload
    with pytest.raises(ValueError, match="does not match"):
        htq.TUQSGD(bits=3).decode(p, (100,))
    with pytest.raises(ValueError, match="does not match"):
        htq.TNQSGD(bits=4).decode(p, (100,))
    with pytest.raises(ValueError, match="does not match"):
        htq.TNQSGD(bits=3, tail="powerlaw").decode(p, (100,))
    with pytest.raises(ValueError, match="100 elements"):
        htq.TNQSGD(bits=3).decode(p, (101,))


def test_corrupted_header_and_side_information(payload):
    q, p = payload
    bad_magic = p.clone(); bad_magic[0] = 0
    with pytest.raises(ValueError, match="not a horovod-truncq payload"):
        q.decode(bad_magic, (100,))
    bad_version = p.clone(); bad_version[2] = 99
    with pytest.raises(ValueError, match="format version"):
        q.decode(bad_version, (100,))
    bad_side = p.clone(); bad_side[wire.HEADER_BYTES:wire.HEADER_BYTES + 4] = torch.tensor([0, 0, 0xC0, 0x7F], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not finite"):
        q.decode(bad_side, (100,))
    with pytest.raises(ValueError, match="1-D uint8"):
        q.decode(p.to(torch.int32), (100,))


# ---------------------------------------------------------------- reproducibility and devices
@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_seed_makes_rounding_reproducible(cls):
    x = torch.randn(1000)
    assert torch.equal(cls(bits=3, seed=5).encode(x), cls(bits=3, seed=5).encode(x))
    assert not torch.equal(cls(bits=3, seed=5).encode(x), cls(bits=3, seed=6).encode(x))
    assert not torch.equal(cls(bits=3).encode(x), cls(bits=3).encode(x))  # unseeded: independent


def test_noise_depends_on_the_key_not_on_call_order_or_threads():
    x = student_t(50_000)
    q = htq.TNQSGD(bits=3)
    a, b = noise.stream_key(1, 0, "a", 0), noise.stream_key(1, 0, "b", 0)
    first = [q.encode(x, key=a), q.encode(x, key=b)]
    assert torch.equal(q.encode(x, key=b), first[1]) and torch.equal(q.encode(x, key=a), first[0])
    assert not torch.equal(first[0], first[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = q.encode(x, key=a)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, first[0])


def test_seeds_and_ranks_never_share_a_stream():
    """Seed s on rank r and seed s + 1 on rank r - 1 (and every other pair) draw unrelated noise:
    the fraction of equal uniforms between two streams is what independence predicts (~2^-24)."""
    index = torch.arange(1 << 16, dtype=torch.int32)
    streams = {(seed, rank): noise.uniform(index, noise.stream_key(seed, rank, "w", 0))
               for seed in range(4) for rank in range(4)}
    keys = list(streams)
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            same = (streams[first] == streams[second]).float().mean().item()
            assert same < 1e-3, (first, second, same)
    q, x = htq.QSGD(bits=3), torch.randn(4096)
    assert not torch.equal(q.encode(x, key=noise.stream_key(5, 2, "w", 0)), q.encode(x, key=noise.stream_key(6, 1, "w", 0)))


def test_noise_is_uniform():
    u = noise.uniform(torch.arange(1 << 20, dtype=torch.int32), noise.stream_key(0, 0, "", 0))
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 120, chi2  # 63 degrees of freedom: P(chi2 > 120) < 1e-4
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01  # neighbours independent


# ---------------------------------------------------------------- decode_sum
@pytest.mark.parametrize("cls, kwargs", configurations((2, 3)))
def test_decode_sum_is_the_sum_of_decodes(cls, kwargs):
    q = cls(seed=0, **kwargs)
    grads = [student_t(3000, seed=s) for s in range(5)]
    payloads = torch.stack([q.encode(g, key=(s, 1)) for s, g in enumerate(grads)])
    singles = sum(q.decode(p, (3000,)) for p in payloads)
    torch.testing.assert_close(q.decode_sum(payloads, (3000,)), singles, rtol=1e-6, atol=1e-6)


def test_decode_sum_names_the_bad_row():
    q = htq.TNQSGD(bits=3, seed=0)
    payloads = torch.stack([q.encode(torch.randn(100)) for _ in range(3)])
    payloads[2, 16:20] = torch.tensor([0, 0, 0xC0, 0x7F], dtype=torch.uint8)  # a NaN level
    with pytest.raises(ValueError, match="payload 2 of 3.*not finite"):
        q.decode_sum(payloads, (100,))
    other = htq.TUQSGD(bits=3).encode(torch.randn(100))
    with pytest.raises(ValueError, match="payload 1 of 2 does not match"):
        q.decode_sum(torch.stack([payloads[0], other]), (100,))
    with pytest.raises(ValueError, match="2-D uint8"):
        q.decode_sum(payloads[0], (100,))
    with pytest.raises(ValueError, match="no payloads"):
        q.decode_sum(payloads[:0], (100,))


def test_decode_sum_is_nan_when_any_sender_was_not_finite():
    q = htq.TUQSGD(bits=2)
    bad = torch.randn(100)
    bad[3] = float("inf")
    payloads = torch.stack([q.encode(torch.randn(100)), q.encode(bad)])
    assert torch.isnan(q.decode_sum(payloads, (100,))).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls, kwargs", configurations((2, 4)))
def test_cuda_is_unbiased_and_makes_no_host_round_trip(cls, kwargs):
    """On CUDA: encode never synchronises with the host, decode_sum at most once, and the mean of
    1024 roundings is the truncated value within 5 standard errors (as on the CPU)."""
    if cls in (htq.QSGD, htq.NQSGD):
        kwargs = dict(kwargs, bucket_size=64)
    q = cls(seed=0, **kwargs)
    base = student_t(64, seed=3)
    copies = 1024
    x = base.repeat(copies).cuda()
    q.encode(x)  # compile outside the checked region
    torch.cuda.set_sync_debug_mode("error")
    try:
        payload = q.encode(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert payload.is_cuda and payload.numel() == q.payload_size(x.numel())
    decoded = q.decode_sum(payload.view(1, -1), x.shape).cpu().view(copies, 64)
    if isinstance(q, htq.quantizers._Truncated):
        grid = q.levels(base.repeat(copies))
        target = base.clamp(grid[0].item(), grid[-1].item())
    else:
        magnitudes = htq.quantizers._magnitudes(q.scheme, q.magnitude_count, torch.device("cpu"))
        target, grid = base, torch.cat([-magnitudes.flip(0), magnitudes]) * base.norm()
    index = (torch.searchsorted(grid, target, right=True) - 1).clamp(0, grid.numel() - 2)
    variance = ((target - grid[index]) * (grid[index + 1] - target)).clamp_min(0)
    tolerance = 5 * torch.sqrt(variance / copies) + 1e-5 * (1 + target.abs())
    assert bool(((decoded.mean(0) - target).abs() <= tolerance).all())


# ---------------------------------------------------------------- rows (chunks of one gradient)
@pytest.mark.parametrize("cls, kwargs", configurations((2, 3)) + [
    pytest.param(htq.QSGD, dict(bits=3, bucket_size=100), id="QSGD-bucket100"),
    pytest.param(htq.TNQSGD, dict(bits=8, tail="powerlaw"), id="TNQSGD-powerlaw-8")])
def test_rows_are_quantized_independently(cls, kwargs):
    """encode_rows gives each row its own threshold (or norms): every row decodes like the same
    data encoded alone, up to the rounding noise, and decode_rows keeps the rows apart."""
    q = cls(seed=4, **kwargs)
    rows = torch.stack([student_t(1000, seed=1), 100 * student_t(1000, seed=2), torch.zeros(1000)])
    payloads = q.encode_rows(rows, key=(0, 1))
    assert payloads.shape == (3, q.payload_size(1000))
    decoded = q.decode_rows(payloads, 1000)
    for row, values, payload in zip(rows, decoded, payloads):
        assert torch.equal(payload[16:16 + 4 * q.side_info_count(1000)],
                           q.encode(row)[16:16 + 4 * q.side_info_count(1000)])  # same levels or norms
        assert torch.equal(values, q.decode(payload, (1000,)))
    assert torch.equal(decoded[2], torch.zeros(1000))
    torch.testing.assert_close(q.decode_sum(payloads, (1000,)), decoded.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(htq.SCHEMES))
def test_decode_rows_writes_into_the_memory_given(name):
    """decode_rows(out=...) fills the caller's buffer with what decode gives for each row (NaN
    everywhere for a flagged row), and refuses a buffer it cannot fill exactly."""
    q = htq.SCHEMES[name](bits=3, seed=0)
    rows = torch.distributions.Laplace(0.0, 1.0).sample((3, 1024))
    payloads = q.encode_rows(rows, key=(0, 1))
    out = torch.full((3 * 1024,), 7.0)
    decoded = q.decode_rows(payloads, 1024, out=out)
    assert decoded.shape == (3, 1024) and decoded.data_ptr() == out.data_ptr()
    for r in range(3):
        assert torch.equal(out[r * 1024:(r + 1) * 1024], q.decode(payloads[r], (1024,)))
    rows[1, 5] = float("nan")
    assert torch.isnan(q.decode_rows(q.encode_rows(rows, key=(0, 1)), 1024, out=out)).all() and torch.isnan(out).all()
    for bad in (torch.empty(3 * 1024 - 1), torch.empty(3 * 1024, dtype=torch.float64), torch.empty(2 * 3 * 1024)[::2]):
        with pytest.raises(ValueError, match="out must be"):
            q.decode_rows(payloads, 1024, out=bad)
    with pytest.raises(ValueError, match="multiple of 32"):
        q.decode_rows(q.encode_rows(rows[:, :1000], key=(0, 1)), 1000, out=torch.empty(3000))


@pytest.mark.parametrize("name", sorted(htq.SCHEMES))
def test_no_rows_give_no_payloads(name):
    q = htq.SCHEMES[name](bits=3, seed=0)
    payloads = q.encode_rows(torch.zeros(0, 1000), key=(0, 1))
    assert payloads.shape == (0, q.payload_size(1000)) and payloads.dtype == torch.uint8
    with pytest.raises(ValueError, match="no payloads"):
        q.decode_sum(payloads, (1000,))


@pytest.mark.parametrize("name", sorted(htq.SCHEMES))
def test_dequantize_own_is_what_receivers_decode(name):
    q = htq.SCHEMES[name](bits=3, seed=0)
    rows = torch.distributions.Laplace(0.0, 1.0).sample((3, 1000))
    rows[1, 5] = float("nan")
    payloads = q.encode_rows(rows, key=(0, 1))
    own = q.dequantize_own(payloads, 1000)
    for r in (0, 2):
        assert torch.equal(own[r], q.decode(payloads[r], (1000,)))
    assert torch.isnan(own[1]).all()


@pytest.mark.parametrize("cls", [htq.TUQSGD, htq.TNQSGD])
def test_one_bit_under_error_feedback_is_the_scaled_sign(cls):
    """At 1 bit under error feedback every element becomes mean|x| * sign(x) (a tie at 0 goes to the
    lower level), whose error has the closed form ||x||^2 - n mean|x|^2 (smaller than ||x||^2)."""
    q = cls(bits=1, seed=0).for_error_feedback()
    x = student_t(10_000, seed=3)
    x[:3] = torch.tensor([0.0, 1e-30, -1e-30])
    a = x.double().abs().mean().float()
    decoded = q.decode(q.encode(x), x.shape)
    assert torch.equal(decoded, torch.where(x > 0, a, -a))
    error, energy = float((x.double() - decoded.double()).square().sum()), float(x.double().square().sum())
    assert error == pytest.approx(energy - x.numel() * float(a) ** 2, rel=1e-6) and error < energy
    assert torch.equal(q.decode(q.encode(torch.full((50,), -2.5)), (50,)), torch.full((50,), -2.5))
    assert torch.equal(q.decode(q.encode(torch.zeros(50)), (50,)), torch.zeros(50))
    assert "under error feedback" in repr(q) and q.with_bits(1).scaled_sign


@pytest.mark.parametrize("cls", [htq.TUQSGD, htq.TNQSGD, htq.TBQSGD, htq.QSGD])
def test_error_feedback_keeps_stochastic_rounding_from_two_bits(cls):
    q = cls(bits=2, seed=0)
    x = student_t(4096, seed=5)
    assert torch.equal(q.encode(x, key=(3, 1)), q.for_error_feedback().encode(x, key=(3, 1)))


def test_error_feedback_residuals():
    from horovod_truncq.feedback import ErrorFeedback
    decayed = ErrorFeedback(decay=0.5)
    decayed.update("a", torch.tensor([1.0, -3.0]), torch.tensor([0.0, 1.0]))
    assert torch.equal(decayed.residuals["a"], torch.tensor([0.5, -2.0]))
    feedback = ErrorFeedback()
    x = torch.tensor([1.0, 2.0, 3.0])
    assert feedback.corrected("a", x) is x
    feedback.update("a", x, torch.tensor([0.5, float("nan"), 3.0]))
    assert torch.equal(feedback.residuals["a"], torch.tensor([0.5, 0.0, 0.0]))  # non-finite restarts at zero
    assert torch.equal(feedback.corrected("a", x), torch.tensor([1.5, 2.0, 3.0]))
    restored = ErrorFeedback()
    restored.load_state_dict(feedback.state_dict())
    assert torch.equal(restored.corrected("a", x), feedback.corrected("a", x))
    with pytest.raises(ValueError, match="keep their sizes"):
        feedback.corrected("a", torch.zeros(4))
