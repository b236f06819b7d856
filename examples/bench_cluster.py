"""Step time of data-parallel ResNet-18 training under one gradient exchange (launch/cluster.sh runs it).

    mpirun ... python examples/bench_cluster.py --compressor tnqsgd --bits 3 --exchange two-phase --out run.json

A torchvision ResNet-18 (11.2 M parameters, 10 classes) trains on synthetic 32x32 images, batch 16
per rank, with SGD. `none` and `fp16` use Horovod's own DistributedOptimizer and compressors; the
quantizers use htq.DistributedOptimizer. Before the distributed optimizer exists, every rank times
forward and backward alone (same CPU contention, no communication). Warm-up steps (compilation
included) are excluded. Rank 0 writes one JSON record: median step time, forward/backward time,
bytes received per rank per step (the library's counter, or Horovod's ring allreduce for none and
fp16), and each node's network interface counters per step (what crossed the emulated link).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
import torchvision

import horovod_truncq as htq
from horovod_truncq.traffic import ring_allreduce_bytes

INTERFACE = Path("/sys/class/net/eth0/statistics")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="tnqsgd", choices=["none", "fp16", *htq.SCHEMES])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--exchange", default="two-phase", choices=["two-phase", "node-aware"])
    p.add_argument("--bucket-bytes", type=int, default=None,
                   help="two-phase and node-aware bucket size (default: the library's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--label", default="", help="free text stored in the record (link rate, ...)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def interface_bytes() -> tuple[int, int]:
    """(sent, received) bytes of this network namespace's eth0, or (0, 0) outside the emulated cluster."""
    if not INTERFACE.exists():
        return 0, 0
    return int((INTERFACE / "tx_bytes").read_text()), int((INTERFACE / "rx_bytes").read_text())


def main() -> None:
    args = parse_args()
    faulthandler.enable(all_threads=True)  # a rank killed by a signal shows where each thread was
    hvd.init()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(hvd.rank()))
    labels = torch.randint(0, 10, (args.batch_size,), generator=torch.Generator().manual_seed(hvd.rank()))

    def forward_backward() -> None:
        F.cross_entropy(model(images), labels).backward()

    compute = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        forward_backward()
        compute.append(time.perf_counter() - start)
    model.zero_grad()

    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if args.compressor in ("none", "fp16"):
        optimizer = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                             compression=getattr(hvd.Compression, args.compressor))
    else:
        exchange = args.exchange
        if args.bucket_bytes:
            exchange = {"two-phase": htq.TwoPhaseExchange,
                        "node-aware": htq.NodeAwareExchange}[exchange](bucket_bytes=args.bucket_bytes)
        optimizer = htq.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                             compression=htq.SCHEMES[args.compressor](bits=args.bits, seed=0),
                                             exchange=exchange)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    steps = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            hvd.allreduce(torch.zeros(1), name="bench.barrier")
            counters = interface_bytes()
            if getattr(optimizer, "traffic", None) is not None:
                optimizer.traffic.take()
        start = time.perf_counter()
        optimizer.zero_grad()
        forward_backward()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    hvd.allreduce(torch.zeros(1), name="bench.barrier.end")
    sent_node, received_node = (after - before for after, before in zip(interface_bytes(), counters))
    numel = sum(p.numel() for p in model.parameters())
    fp32 = ring_allreduce_bytes(4 * numel, hvd.size())
    if getattr(optimizer, "traffic", None) is not None:
        received_rank = optimizer.traffic.take().received / args.steps
    else:
        received_rank = fp32 / (2 if args.compressor == "fp16" else 1)
    # per node: the counters of each node's first rank (every rank of a node sees the same ones)
    node = torch.tensor([hvd.local_rank() == 0, sent_node, received_node], dtype=torch.float64)
    nodes = hvd.allgather(node.view(1, -1), name="bench.nodes")
    timed = torch.tensor(steps[args.warmup:], dtype=torch.float64)
    slowest = hvd.allreduce(timed, name="bench.steps", op=hvd.Max)  # a step ends when the slowest rank ends it
    if hvd.rank() == 0:
        per_node = [{"sent": row[1].item() / args.steps, "received": row[2].item() / args.steps}
                    for row in nodes if row[0] > 0]
        record = {"compressor": args.compressor, "bits": None if args.compressor in ("none", "fp16") else args.bits,
                  "exchange": None if args.compressor in ("none", "fp16") else args.exchange,
                  "bucket_bytes": args.bucket_bytes, "ranks": hvd.size(), "ranks_per_node": hvd.local_size(),
                  "label": args.label, "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
                  "step_seconds": statistics.median(slowest.tolist()), "step_seconds_all": slowest.tolist(),
                  "compute_seconds": statistics.median(compute[args.warmup:]), "parameters": numel,
                  "received_per_rank": received_rank, "fp32_reference_per_rank": fp32, "nodes": per_node}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"[bench] {args.label} W={hvd.size()} {args.compressor} b={args.bits} {record['exchange']}: "
              f"step {record['step_seconds']:.3f}s, compute {record['compute_seconds']:.3f}s, "
              f"received {received_rank / 1e6:.2f} MB/rank/step", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
