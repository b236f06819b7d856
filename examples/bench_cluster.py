"""Step time of data-parallel ResNet-18 training under one gradient exchange (launch/cluster.sh runs it).

    mpirun ... python examples/bench_cluster.py --compressor tnqsgd --bits 3 --exchange two-phase --out run.json
    mpirun ... python examples/bench_cluster.py --frontend ddp --compressor powersgd --rank 4 --out run.json

A torchvision ResNet-18 (11.2 M parameters, 10 classes) trains on synthetic 32x32 images, batch 16
per rank, with SGD. With Horovod (the default front end), `none` and `fp16` use Horovod's own
DistributedOptimizer and compressors, the quantizers htq.DistributedOptimizer. With DDP (Gloo),
`none` is DDP's allreduce, `fp16` and `bf16` its hooks, `powersgd` PowerSGD with error feedback and
warm start (rank --rank), the quantizers htq.ddp.hook. Before the distributed optimizer exists, every
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

import horovod_truncq as htq
from horovod_truncq.traffic import ring_allreduce_bytes

INTERFACE = Path("/sys/class/net/eth0/statistics")
BASELINES = ("none", "fp16", "bf16", "powersgd")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frontend", default="horovod", choices=["horovod", "ddp"])
    p.add_argument("--compressor", default="tnqsgd", choices=[*BASELINES, *htq.SCHEMES])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--rank", type=int, default=4, help="PowerSGD's matrix approximation rank")
    p.add_argument("--exchange", default="two-phase", choices=["two-phase", "node-aware"])
    p.add_argument("--bucket-bytes", type=int, default=None,
                   help="Horovod front end: two-phase and node-aware bucket size (default: the library's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--label", default="", help="free text stored in the record (link rate, ...)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.compressor in ("bf16", "powersgd") and args.frontend != "ddp":
        p.error(f"--compressor {args.compressor} is a DDP hook: add --frontend ddp")
    return args


def interface_bytes() -> tuple[int, int]:
    """(sent, received) bytes of this network namespace's eth0, or (0, 0) outside the emulated cluster."""
    if not INTERFACE.exists():
        return 0, 0
    return int((INTERFACE / "tx_bytes").read_text()), int((INTERFACE / "rx_bytes").read_text())


class HorovodRun:
    """Horovod's ranks and collectives, and its distributed optimizer."""

    def __init__(self) -> None:
        import horovod.torch as hvd
        self.hvd = hvd
        hvd.init()
        self.rank, self.size, self.local_rank, self.local_size = hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()

    def train_step(self, model, args):
        hvd, base = self.hvd, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if args.compressor in BASELINES:
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
        return model, optimizer, getattr(optimizer, "traffic", None)

    def barrier(self) -> None:
        self.hvd.allreduce(torch.zeros(1), name="bench.barrier")

    def gather(self, row: torch.Tensor) -> torch.Tensor:
        return self.hvd.allgather(row.view(1, -1), name="bench.gather")

    def slowest(self, values: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(values, name="bench.slowest", op=self.hvd.Max)

    def close(self) -> None:
        self.hvd.shutdown()


class TorchRun:
    """torch.distributed over Gloo, started by mpirun (ranks from Open MPI's variables, the first
    node's address as the rendezvous), and DDP with the chosen hook."""

    def __init__(self) -> None:
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        self.local_rank = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        self.local_size = int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
        if INTERFACE.exists():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
        address = os.environ.get("BENCH_MASTER", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"tcp://{address}:29512", rank=self.rank, world_size=self.size)

    def train_step(self, model, args):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
        traffic = None
        if args.compressor in ("fp16", "bf16"):
            model.register_comm_hook(None, getattr(default_hooks, f"{args.compressor}_compress_hook"))
        elif args.compressor == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank,
                                                start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        elif args.compressor != "none":
            state = htq.ddp.State(htq.SCHEMES[args.compressor](bits=args.bits, seed=0), exchange=args.exchange,
                                  ranks_per_node=self.local_size)
            model.register_comm_hook(state, htq.ddp.hook)
            traffic = state.traffic
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), traffic

    def barrier(self) -> None:
        self.dist.barrier()

    def gather(self, row: torch.Tensor) -> torch.Tensor:
        rows = [torch.empty_like(row) for _ in range(self.size)]
        self.dist.all_gather(rows, row)
        return torch.stack(rows)

    def slowest(self, values: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(values, op=self.dist.ReduceOp.MAX)
        return values

    def close(self) -> None:
        self.dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    faulthandler.enable(all_threads=True)  # a rank killed by a signal shows where each thread was
    run = HorovodRun() if args.frontend == "horovod" else TorchRun()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.local_size))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(run.rank))
    labels = torch.randint(0, 10, (args.batch_size,), generator=torch.Generator().manual_seed(run.rank))
    compute = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        F.cross_entropy(model(images), labels).backward()
        compute.append(time.perf_counter() - start)
    model.zero_grad()
    numel = sum(p.numel() for p in model.parameters())
    model, optimizer, traffic = run.train_step(model, args)

    steps = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            run.barrier()
            counters = interface_bytes()
            if traffic is not None:
                traffic.take()
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    run.barrier()
    sent_node, received_node = (after - before for after, before in zip(interface_bytes(), counters))
    fp32 = ring_allreduce_bytes(4 * numel, run.size)
    if traffic is not None:
        received_rank = traffic.take().received / args.steps
    elif args.compressor == "powersgd":
        received_rank = None  # PowerSGD's own collectives: see the node counters
    else:
        received_rank = fp32 / (2 if args.compressor in ("fp16", "bf16") else 1)
    # per node: the counters of each node's first rank (every rank of a node sees the same ones)
    nodes = run.gather(torch.tensor([run.local_rank == 0, sent_node, received_node], dtype=torch.float64))
    slowest = run.slowest(torch.tensor(steps[args.warmup:], dtype=torch.float64))  # a step ends with its slowest rank
    if run.rank == 0:
        per_node = [{"sent": row[1].item() / args.steps, "received": row[2].item() / args.steps}
                    for row in nodes if row[0] > 0]
        quantized = args.compressor not in BASELINES
        record = {"frontend": args.frontend, "compressor": args.compressor,
                  "bits": args.bits if quantized else None, "exchange": args.exchange if quantized else None,
                  "powersgd_rank": args.rank if args.compressor == "powersgd" else None,
                  "bucket_bytes": args.bucket_bytes, "ranks": run.size, "ranks_per_node": run.local_size,
                  "label": args.label, "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
                  "step_seconds": statistics.median(slowest.tolist()), "step_seconds_all": slowest.tolist(),
                  "compute_seconds": statistics.median(compute[args.warmup:]), "parameters": numel,
                  "received_per_rank": received_rank, "fp32_reference_per_rank": fp32, "nodes": per_node}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"[bench] {args.label} W={run.size} {args.frontend} {args.compressor} b={args.bits} "
              f"{record['exchange']}: step {record['step_seconds']:.3f}s, compute {record['compute_seconds']:.3f}s, "
              f"node received {per_node[0]['received'] / 1e6 if per_node else 0:.2f} MB/step", flush=True)
    run.close()


if __name__ == "__main__":
    main()
