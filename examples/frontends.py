"""The two front ends as the cluster benchmarks start them under mpirun: Horovod, or torch DDP over Gloo.

Each wraps a model and its optimizer with one gradient exchange, named by `Method`:
- Horovod: `none` and `fp16` are Horovod's DistributedOptimizer with its own compressors, the
  quantizers htq.DistributedOptimizer;
- DDP: `none` is DDP's allreduce, `fp16` and `bf16` its hooks, `powersgd` PowerSGD with error
  feedback and warm start (as its documentation recommends), the quantizers htq.ddp.hook.
PowerSGD runs with one DDP bucket: over Gloo, two buckets' PowerSGD callbacks issue their
collectives in whichever order the buckets finish on each rank, and Gloo aborts on the mismatch
("Received data size doesn't match expected size").
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import horovod_truncq as htq
from horovod_truncq.traffic import ring_allreduce_bytes

INTERFACE = Path("/sys/class/net/eth0/statistics")
BASELINES = ("none", "fp16", "bf16", "powersgd")
DDP_ONLY = ("bf16", "powersgd")
ONE_BUCKET_MB = 1024.0  # larger than any model here: DDP then makes a single bucket


@dataclass(frozen=True)
class Method:
    """How gradients move: a baseline of the front end, or a horovod_truncq scheme and its exchange."""
    frontend: str = "horovod"
    compressor: str = "tnqsgd"
    bits: int = 3
    powersgd_rank: int = 4
    exchange: str = "node-aware"
    bucket_bytes: Optional[int] = None  # Horovod front end: the exchange's bucket size
    bucket_size: Optional[int] = None  # QSGD/NQSGD: elements per scale
    seed: int = 0

    @property
    def quantized(self) -> bool:
        return self.compressor not in BASELINES

    def quantizer(self) -> htq.Quantizer:
        options = {"bucket_size": self.bucket_size} if self.compressor in ("qsgd", "nqsgd") else {}
        return htq.SCHEMES[self.compressor](bits=self.bits, seed=self.seed, **options)

    def describe(self) -> dict:
        return {"frontend": self.frontend, "compressor": self.compressor,
                "bits": self.bits if self.quantized else None,
                "exchange": self.exchange if self.quantized else None,
                "bucket_size": self.bucket_size if self.quantized else None,
                "powersgd_rank": self.powersgd_rank if self.compressor == "powersgd" else None,
                "bucket_bytes": self.bucket_bytes}


def add_method_arguments(p: argparse.ArgumentParser, exchange: str = "node-aware") -> None:
    p.add_argument("--frontend", default="horovod", choices=["horovod", "ddp"])
    p.add_argument("--compressor", default="tnqsgd", choices=[*BASELINES, *htq.SCHEMES])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--rank", type=int, default=4, help="PowerSGD's matrix approximation rank")
    p.add_argument("--exchange", default=exchange, choices=["two-phase", "node-aware"])
    p.add_argument("--bucket-bytes", type=int, default=None,
                   help="Horovod front end: two-phase and node-aware bucket size (default: the library's); "
                        "DDP: its bucket_cap_mb, in bytes (default: DDP's; refused for PowerSGD, which has one bucket)")
    p.add_argument("--bucket-size", type=int, default=None, help="QSGD/NQSGD: elements per scale")


def method_from(args: argparse.Namespace, p: argparse.ArgumentParser, seed: int = 0) -> Method:
    if args.compressor in DDP_ONLY and args.frontend != "ddp":
        p.error(f"--compressor {args.compressor} is a DDP hook: add --frontend ddp")
    return Method(args.frontend, args.compressor, args.bits, args.rank, args.exchange, args.bucket_bytes,
                  args.bucket_size, seed)


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

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method):
        """(model, distributed optimizer, byte counter or None); parameters broadcast from rank 0."""
        hvd = self.hvd
        if not method.quantized:
            optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                 compression=getattr(hvd.Compression, method.compressor))
        else:
            exchange = method.exchange
            if method.bucket_bytes:
                exchange = {"two-phase": htq.TwoPhaseExchange,
                            "node-aware": htq.NodeAwareExchange}[exchange](bucket_bytes=method.bucket_bytes)
            optimizer = htq.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                 compression=method.quantizer(), exchange=exchange)
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
    """torch.distributed over Gloo, started by mpirun (ranks from Open MPI's variables, BENCH_MASTER
    as the rendezvous address), and DDP with the chosen hook."""

    def __init__(self, port: int = 29512) -> None:
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.size = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        self.local_rank = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        self.local_size = int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
        if INTERFACE.exists():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
        address = os.environ.get("BENCH_MASTER", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.size)

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method):
        """(DDP model, optimizer, byte counter or None). DDP broadcasts rank 0's parameters."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel
        if method.compressor == "powersgd":
            if method.bucket_bytes:
                raise ValueError("PowerSGD runs with one DDP bucket here (see this module's docstring): "
                                 "drop --bucket-bytes")
            buckets = {"bucket_cap_mb": ONE_BUCKET_MB}
        else:
            buckets = {"bucket_cap_mb": method.bucket_bytes / 2 ** 20} if method.bucket_bytes else {}
        model = DistributedDataParallel(model, **buckets)
        traffic = None
        if method.compressor in ("fp16", "bf16"):
            model.register_comm_hook(None, getattr(default_hooks, f"{method.compressor}_compress_hook"))
        elif method.compressor == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=method.powersgd_rank,
                                                start_powerSGD_iter=2, use_error_feedback=True, warm_start=True,
                                                random_seed=method.seed)
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        elif method.quantized:
            state = htq.ddp.State(method.quantizer(), exchange=method.exchange, ranks_per_node=self.local_size)
            model.register_comm_hook(state, htq.ddp.hook)
            traffic = state.traffic
        return model, optimizer, traffic

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


def start(frontend: str) -> "HorovodRun | TorchRun":
    return HorovodRun() if frontend == "horovod" else TorchRun()


def received_per_rank(method: Method, traffic, numel: int, size: int, steps: int) -> Optional[float]:
    """Bytes each rank received per step: the library's counter, a ring allreduce's for fp32 and the
    16-bit casts, None for PowerSGD (its own collectives: see the node counters)."""
    if traffic is not None:
        return traffic.take().received / steps
    if method.compressor == "powersgd":
        return None
    return ring_allreduce_bytes((2 if method.compressor in ("fp16", "bf16") else 4) * numel, size)


def node_counters(run, before: tuple[int, int], steps: int) -> list[dict]:
    """Each node's eth0 bytes per step since `before`, from each node's first rank (a node's ranks
    share its interface); collective: every rank calls it."""
    sent, received = (after - b for after, b in zip(interface_bytes(), before))
    rows = run.gather(torch.tensor([run.local_rank == 0, sent, received], dtype=torch.float64))
    return [{"sent": row[1].item() / steps, "received": row[2].item() / steps} for row in rows if row[0] > 0]

