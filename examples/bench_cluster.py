"""Step time of data-parallel ResNet-18 training under one gradient exchange (launch/cluster.sh runs it).

    mpirun ... python examples/bench_cluster.py --compressor tnqsgd --bits 3 --exchange two-phase --out run.json
    mpirun ... python examples/bench_cluster.py --frontend ddp --compressor powersgd --rank 4 --out run.json

A torchvision ResNet-18 (11.2 M parameters, 10 classes) trains on synthetic 32x32 images, batch 16
per rank, with SGD. With Horovod (the default front end), `none` and `fp16` use Horovod's own
DistributedOptimizer and compressors, the quantizers htq.DistributedOptimizer. With DDP (Gloo),
`none` is DDP's allreduce, `fp16` and `bf16` its hooks, `powersgd` PowerSGD with error feedback and
warm start (rank --rank, one DDP bucket: examples/frontends.py says why), the quantizers htq.ddp.hook. Before the distributed optimizer exists, every
rank times forward and backward alone (same CPU contention, no communication). Warm-up steps
(compilation included) are excluded. Rank 0 writes one JSON record: median step time,
forward/backward time, bytes received per rank per step (the library's counter, or the ring
allreduce's for the others), and each node's network interface counters per step (what crossed
the emulated link).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import frontends
from frontends import Method, add_method_arguments, method_from
from horovod_truncq.traffic import ring_allreduce_bytes


def parse_args() -> tuple[argparse.Namespace, Method]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_arguments(p, exchange="two-phase")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--label", default="", help="free text stored in the record (link rate, ...)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    return args, method_from(args, p)


def main() -> None:
    args, method = parse_args()
    faulthandler.enable(all_threads=True)  # a rank killed by a signal shows where each thread was
    run = frontends.start(method.frontend)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.local_size))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(run.rank))
    labels = torch.randint(0, 10, (args.batch_size,), generator=torch.Generator().manual_seed(run.rank))
    compute = []
    for i in range(args.warmup + args.steps):
        began = time.perf_counter()
        F.cross_entropy(model(images), labels).backward()
        compute.append(time.perf_counter() - began)
    model.zero_grad()
    numel = sum(p.numel() for p in model.parameters())
    model, optimizer, traffic = run.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), method)

    steps = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            run.barrier()
            counters = frontends.interface_bytes()
            if traffic is not None:
                traffic.take()
        began = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        steps.append(time.perf_counter() - began)
    run.barrier()
    nodes = frontends.node_counters(run, counters, args.steps)
    received_rank = frontends.received_per_rank(method, traffic, numel, run.size, args.steps)
    slowest = run.slowest(torch.tensor(steps[args.warmup:], dtype=torch.float64))  # a step ends with its slowest rank
    if run.rank == 0:
        record = {**method.describe(), "ranks": run.size, "ranks_per_node": run.local_size,
                  "label": args.label, "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
                  "step_seconds": statistics.median(slowest.tolist()), "step_seconds_all": slowest.tolist(),
                  "compute_seconds": statistics.median(compute[args.warmup:]), "parameters": numel,
                  "received_per_rank": received_rank,
                  "fp32_reference_per_rank": ring_allreduce_bytes(4 * numel, run.size), "nodes": nodes}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"[bench] {args.label} W={run.size} {method.frontend} {method.compressor} b={method.bits} "
              f"{record['exchange']}: step {record['step_seconds']:.3f}s, compute {record['compute_seconds']:.3f}s, "
              f"node received {nodes[0]['received'] / 1e6 if nodes else 0:.2f} MB/step", flush=True)
    run.close()


if __name__ == "__main__":
    main()
