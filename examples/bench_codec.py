"""Codec speed: encode and decode_sum of every scheme and bit width against a plain memory copy.

    .venv/bin/python examples/bench_codec.py                       # CPU, one thread, 1 M and 16 M elements
    .venv/bin/python examples/bench_codec.py --device cuda --elements 100000000
    .venv/bin/python examples/bench_codec.py --device cuda --elements 100000000 --bits 3 --profile

Every row times, interleaved in one run so that machine noise hits all alike:
- copy: a copy of the float32 tensor into a preallocated buffer (8 bytes per element moved);
- encode: q.encode(x), statistics, levels, rounding and packing included;
- decode_sum: q.decode_sum of `--senders` payloads (default 8) into one float32 sum.

Columns: each as a multiple of the copy, in nanoseconds per element, and as the fraction of the
memory roofline (encode moves 4 + b/8 bytes per element, decode_sum W b/8 + 4, at the copy's
bandwidth). "first call" is the first encode plus the first decode_sum (compilation included when
the compiled passes run). The rounding noise of the payloads is independent per sender.

encode and decode_sum return new tensors, as they do in training, while the copy writes into a
buffer allocated once: a large new tensor pays a page fault per 4 kB page on first touch. PyTorch's
allocator asks for 2 MB pages instead under THP_MEM_ALLOC_ENABLE=1 (read at the process's first
allocation, so it goes in the environment), and glibc's allocator keeps freed memory for reuse
under MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736; the header says which are set.
docs/quantizers.md, "Speed", has all three.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import horovod_truncq as htq
from horovod_truncq import compiling

ALLOCATOR_ENV = ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")  # read at process start
SCHEMES = [(htq.TUQSGD, {}), (htq.TNQSGD, {}), (htq.TBQSGD, {}), (htq.QSGD, {"bucket_size": 512}), (htq.NQSGD, {})]


def timed(fn, device: torch.device) -> float:
    """Seconds fn takes; on CUDA from the device's start to its end, host launches included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile(fn, device: torch.device) -> str:
    """The profiler's table of one call of fn: the busiest operations and kernels, and at the foot
    the total host time against the total device time (where launches outweigh the kernels)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        timed(fn, device)
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    calls = sum(1 for event in prof.events() if event.name.startswith("aten::") and event.cpu_parent is None)
    return (f"{calls} operator calls outside the compiled passes (host work; on CUDA each that computes launches a kernel)\n"
            + prof.key_averages().table(sort_by=sort, row_limit=10))


def row(q: htq.Quantizer, x: torch.Tensor, senders: int, repeats: int) -> dict[str, float]:
    numel, buffer = x.numel(), torch.empty_like(x)
    first = timed(lambda: q.decode_sum(torch.stack([q.encode(x, key=(0, 1))] * senders), (numel,)), x.device)
    payloads = torch.stack([q.encode(x, key=(rank, 1)) for rank in range(senders)])
    copy, encode, decode = [], [], []
    for _ in range(repeats):
        copy.append(timed(lambda: buffer.copy_(x), x.device))
        encode.append(timed(lambda: q.encode(x, key=(0, 1)), x.device))
        decode.append(timed(lambda: q.decode_sum(payloads, (numel,)), x.device))
    base, enc, dec = (statistics.median(t) for t in (copy, encode, decode))
    return {"first": first, "copy": base, "enc": enc, "dec": dec,
            "enc_roof": (4 + q.bits / 8) / 8 * base / enc, "dec_roof": (senders * q.bits / 8 + 4) / 8 * base / dec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--elements", default=f"{1 << 20},{1 << 24}", help="comma-separated tensor sizes")
    parser.add_argument("--bits", default="1,2,3,4,8")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--profile", action="store_true", help="after each row, the profiler's table of one "
                        "encode and one decode_sum")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} thread(s)'}), "
          f"torch {torch.__version__}, {args.senders} senders, median of {args.repeats}, Laplace(0, 1) data, "
          + ", ".join(f"{variable}={os.environ.get(variable, 'unset')}" for variable in ALLOCATOR_ENV))
    print("| elements | scheme | bits | encode / copy | decode_sum / copy | encode ns/elem | decode_sum ns/elem "
          "| encode roofline | decode_sum roofline | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for numel in (int(n) for n in args.elements.split(",")):
        torch.manual_seed(0)
        x = torch.distributions.Laplace(0.0, 1.0).sample((numel,)).to(device)
        for bits in (int(b) for b in args.bits.split(",")):
            for cls, extra in SCHEMES:
                if bits < cls.min_bits:
                    continue
                q = cls(bits=bits, seed=0, **extra)
                r = row(q, x, args.senders, args.repeats)
                name = cls.__name__ + (f" (bucket {extra['bucket_size']})" if extra else "")
                name += " (eager)" if not compiling.compiling_enabled() else (
                    " (partly eager)" if compiling.failed_passes() else "")
                print(f"| {numel:,} | {name} | {bits} | {r['enc'] / r['copy']:.2f} | {r['dec'] / r['copy']:.2f} | "
                      f"{r['enc'] / numel * 1e9:.3g} | {r['dec'] / numel * 1e9:.3g} | {r['enc_roof']:.0%} | "
                      f"{r['dec_roof']:.0%} | {r['first']:.1f} |", flush=True)
                if args.profile:
                    payloads = torch.stack([q.encode(x, key=(0, 1))] * args.senders)
                    print(profile(lambda: q.encode(x, key=(0, 1)), device), flush=True)
                    print(profile(lambda: q.decode_sum(payloads, (numel,)), device), flush=True)
    if compiling.failed_passes():
        print("passes that failed to compile and ran eagerly:", "; ".join(compiling.failed_passes()))


if __name__ == "__main__":
    main()
