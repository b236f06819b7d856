"""The codec and the exchange on a CUDA device: the compiled passes (Triton) compute what the eager
ones do, a payload decodes to the same floats on the GPU and the CPU, encode never waits for the
host and decode_sum waits once, Horovod with NCCL carries the payloads, and the DDP hook over NCCL
never makes the host wait. Skipped without CUDA."""
import shutil
import sys
import warnings

import pytest
import torch

import horovod_truncq as htq
from conftest import BIN, assert_ok, run_command, run_ranks
from horovod_truncq import compiling, wire

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUMEL = (1 << 20) + 17  # compiled, and not a whole number of 32-code blocks
SENDERS = 3


def every_scheme(bits_list=(1, 2, 3, 4, 8)):
    """Each scheme as examples/bench_codec.py runs it, at every bit width it takes."""
    return [pytest.param(cls, bits, id=f"{cls.__name__}-{bits}")
            for bits in bits_list for cls in htq.SCHEMES.values() if bits >= cls.min_bits]


def make(cls, bits: int, **extra) -> htq.Quantizer:
    if cls is htq.QSGD:
        extra.setdefault("bucket_size", 512)
    return cls(bits=bits, seed=5, **extra)


def laplace_rows(rows: int, numel: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.distributions.Laplace(0.0, 1.0).sample((rows, numel)).cuda()


def count_syncs(fn) -> tuple[torch.Tensor, int]:
    """fn's result and the number of times it made the host wait for the device."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return result, sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def test_the_ddp_hook_never_waits_for_the_host_on_one_gpu():
    """torchrun, one rank: the hook's backward pass with CUDA's sync debug mode at "error", and 8 bits
    within 2% of DDP's allreduce (tests/workers/ddp_cuda_worker.py)."""
    output = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                          "29571", "tests/workers/ddp_cuda_worker.py"], timeout=600, HOROVOD_TRUNCQ_COMPILE="1")
    for check in ("no-host-wait", "close"):
        assert_ok(output, check, 1)


@pytest.mark.parametrize("cls, bits", every_scheme())
def test_compiled_equals_eager_and_the_cpu_decodes_the_same(cls, bits, monkeypatch):
    monkeypatch.setattr(compiling, "_failed", set())  # this case's failures only
    q = make(cls, bits)
    grads = laplace_rows(SENDERS, NUMEL)
    monkeypatch.setenv(compiling.COMPILE_ENV, "0")
    eager = torch.stack([q.encode(g, key=(r, 1)) for r, g in enumerate(grads)])
    eager_sum = q.decode_sum(eager, (NUMEL,))
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    compiled = torch.stack([q.encode(g, key=(r, 1)) for r, g in enumerate(grads)])
    assert not compiling.failed_passes()
    side = wire.HEADER_BYTES + 4 * q.side_info_count(NUMEL)
    assert compiled.is_cuda and torch.equal(compiled[:, :side], eager[:, :side]), "headers or side information differ"
    assert torch.equal(compiled, eager), f"{(compiled != eager).float().mean():.2e} of the code bytes differ"
    assert torch.equal(q.decode_sum(compiled, (NUMEL,)), eager_sum)
    decoded = q.decode(compiled[1], (NUMEL,))
    assert torch.equal(decoded.cpu(), q.decode(compiled[1].cpu(), (NUMEL,)))


@pytest.mark.parametrize("cls, bits, extra", [pytest.param(*case.values, {}, id=case.id) for case in every_scheme((3, 8))]
                         + [pytest.param(htq.TNQSGD, 3, {"tail": "powerlaw"}, id="TNQSGD-powerlaw-3"),
                            pytest.param(htq.TUQSGD, 8, {"tail": "powerlaw"}, id="TUQSGD-powerlaw-8")])
def test_encode_never_waits_and_decode_sum_waits_once(cls, bits, extra, monkeypatch):
    """Power-law tails included: their threshold search runs on the device too."""
    monkeypatch.setenv(compiling.COMPILE_ENV, "1")
    q = make(cls, bits, **extra)
    grads = laplace_rows(SENDERS, NUMEL)
    payloads = torch.stack([q.encode(g, key=(0, 1)) for g in grads])  # compiles outside the counted calls
    q.decode_sum(payloads, (NUMEL,))
    _, encode_syncs = count_syncs(lambda: q.encode(grads[0], key=(0, 1)))
    total, decode_syncs = count_syncs(lambda: q.decode_sum(payloads, (NUMEL,)))
    assert (encode_syncs, decode_syncs) == (0, 1)
    assert total.is_cuda and bool(torch.isfinite(total).all())


def test_the_first_encode_of_a_size_does_not_wait(monkeypatch):
    """The header of a new tensor size reaches the device without the host waiting (eager passes,
    so that no compilation runs inside the count)."""
    monkeypatch.setenv(compiling.COMPILE_ENV, "0")
    x = laplace_rows(1, 12_345)[0]  # a size no other case encodes: its header is made here
    _, syncs = count_syncs(lambda: make(htq.TNQSGD, 3).encode(x, key=(0, 1)))
    assert syncs == 0


@pytest.mark.skipif(shutil.which("horovodrun", path=str(BIN)) is None, reason="Horovod not installed")
def test_nccl_carries_the_payloads_on_one_rank():
    output = run_ranks(1, ["tests/workers/cuda_worker.py"], timeout=600)
    for check in ("nccl", "two-phase"):
        assert_ok(output, check, 1)

