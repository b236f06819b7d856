import logging
import math

import pytest
import torch

import horovod_truncq as htq
from horovod_truncq import levels as lv
from horovod_truncq import wire
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
    for bits in (cls.min_bits - 1, 9, 2.5):
        with pytest.raises(ValueError, match=f"bits from {cls.min_bits} to 8"):
            cls(bits=bits)


def test_minimum_bits():
    assert htq.TUQSGD(bits=1).bits == 1 and htq.TNQSGD(bits=1).bits == 1
    assert htq.QSGD.min_bits == htq.TBQSGD.min_bits == htq.NQSGD.min_bits == 2


def test_unknown_tail_raises():
    with pytest.raises(ValueError, match="tail must be one of"):
        htq.TNQSGD(bits=3, tail="gaussian")


def test_bad_bucket_size_raises():
    with pytest.raises(ValueError, match="bucket_size"):
        htq.QSGD(bits=4, bucket_size=0)


# ---------------------------------------------------------------- bytes
@pytest.mark.parametrize("cls, kwargs", configurations((2, 4, 8)))
@pytest.mark.parametrize("numel", [1, 9, 1000])
def test_payload_size_formula(cls, kwargs, numel):
    q = cls(**kwargs)
    side = q._side_info_count(numel)
    expected = wire.HEADER_BYTES + 4 * side + math.ceil(numel * q.bits / 8)
    assert q.payload_size(numel) == expected
    for seed in (0, 1):  # different data, same shape: same size (so every rank sends the same bytes)
        assert q.encode(torch.randn(numel, generator=torch.Generator().manual_seed(seed))).numel() == expected


def test_side_information_counts():
    assert htq.TUQSGD(bits=3, tail="laplace")._side_info_count(10) == 2      # a, gamma
    assert htq.TNQSGD(bits=3, tail="powerlaw")._side_info_count(10) == 3     # a, g0, rho
    assert htq.TBQSGD(bits=3, tail="laplace")._side_info_count(10) == 4      # a, c, s1, gamma
    assert htq.QSGD(bits=3)._side_info_count(1000) == 1
    assert htq.QSGD(bits=3, bucket_size=512)._side_info_count(1025) == 3


# ---------------------------------------------------------------- statistics
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
        target, grid = base, torch.cat([-q._magnitudes(base.device).flip(0), q._magnitudes(base.device)]) * norm
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
    fitted = PowerLaw.fit(magnitude)
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
@pytest.mark.parametrize("value", [0.7, -3.0])
def test_constant_tensor_is_exact(cls, value):
    q = cls(bits=2, seed=0)
    x = torch.full((1000,), value)
    assert torch.equal(q.decode(q.encode(x), x.shape), x)
    signs = torch.full((1000,), value) * torch.where(torch.arange(1000) % 3 == 0, -1.0, 1.0)
    assert torch.equal(q.decode(q.encode(signs), signs.shape), signs)


@pytest.mark.parametrize("cls", ALL_SCHEMES)
def test_non_floating_tensors_pass_through(cls):
    q = cls(bits=4)
    x = torch.arange(10)
    compressed, ctx = q.compress(x)
    assert compressed is x and q.decompress(compressed, ctx) is x
    with pytest.raises(TypeError, match="floating-point"):
        q.encode(x)


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
    """Finite values whose float32 norm or mean overflows: a well-formed payload that decodes to all
    NaN, like NaN input (an fp32 allreduce of such gradients overflows too)."""
    q = cls(bits=4)
    x = torch.full((1000,), 3e38) * torch.where(torch.arange(1000) % 2 == 0, 1.0, -1.0)
    assert torch.isfinite(x).all()
    payload = q.encode(x)
    side = wire.side_info_from_bytes(payload[wire.HEADER_BYTES:wire.HEADER_BYTES + 4 * q._side_info_count(1000)])
    assert torch.isfinite(side).all()
    assert torch.isnan(q.decode(payload, x.shape)).all()


def test_compress_decompress_round_trip():
    q = htq.TNQSGD(bits=8)
    x = torch.randn(10, 10, dtype=torch.float16)
    compressed, ctx = q.compress(x)
    assert compressed.dtype == torch.uint8
    y = q.decompress(compressed, ctx)
    assert y.dtype == torch.float16 and y.shape == x.shape


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls, kwargs", configurations((2, 4)))
def test_cuda_matches_device_and_is_unbiased(cls, kwargs):
    q = cls(seed=0, **kwargs)
    x = student_t(100_000).cuda()
    payload = q.encode(x)
    assert payload.is_cuda and payload.numel() == q.payload_size(x.numel())
    y = q.decode(payload, x.shape)
    assert y.is_cuda and torch.isfinite(y).all()
    cpu = cls(seed=0, **kwargs)
    mse_gpu = ((y - x) ** 2).mean().item()
    mse_cpu = ((cpu.decode(cpu.encode(x.cpu()), x.shape) - x.cpu()) ** 2).mean().item()
    assert mse_gpu == pytest.approx(mse_cpu, rel=0.1)
