"""Data-parallel training on Fashion-MNIST with torch DDP and a gradient compression hook.

    torchrun --nproc_per_node 8 examples/train_ddp.py --hook tnqsgd --bits 3

The same task as examples/train_mnist.py (the Horovod main job): each worker trains on its own shard
(every size-th image), rank 0 evaluates test accuracy and writes a JSON record. --hook picks what
DDP does with each gradient bucket: none (its fp32 allreduce), fp16 or bf16 (its own hooks),
powersgd (PowerSGD with error feedback and warm start), or a horovod_truncq scheme.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import horovod_truncq as htq
from mnist_common import evaluate, load_data, make_model

HOOKS = ("none", "fp16", "bf16", "powersgd", *htq.SCHEMES)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="tnqsgd", choices=HOOKS)
    p.add_argument("--bits", type=int, default=3, help="bits per coordinate of a horovod_truncq scheme")
    p.add_argument("--rank", type=int, default=4, help="PowerSGD's matrix approximation rank")
    p.add_argument("--exchange", default="two-phase", choices=["two-phase", "node-aware"])
    p.add_argument("--error-feedback", type=float, default=0.0, help="share of the residual kept (0: off)")
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "mnist"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--out-dir", default="runs/ddp")
    return p.parse_args()


def register_hook(model: DDP, args):
    """The hook's state (for checkpoints and the byte counter), or None for DDP's own allreduce."""
    if args.hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif args.hook == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank,
                                            start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif args.hook != "none":
        quantizer = htq.SCHEMES[args.hook](bits=args.bits, seed=args.seed)
        state = htq.ddp.State(quantizer, exchange=args.exchange, error_feedback=args.error_feedback or False)
        model.register_comm_hook(state, htq.ddp.hook)
        return state
    return None


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", size))))
    data_name, (train_x, train_y, test_x, test_y) = load_data(args)
    shard = torch.arange(rank, len(train_x), size)
    torch.manual_seed(args.seed)  # same initial model on every rank
    model = DDP(make_model(args.model))
    state = register_hook(model, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    sampler = torch.Generator().manual_seed(args.seed * 1000 + rank)
    record = {"config": {**vars(args), "workers": size, "data": data_name}, "evaluations": []}
    received, start = 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        index = shard[torch.randint(len(shard), (args.batch_size,), generator=sampler)]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        if state is not None:
            received += state.traffic.take().received
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            images = len(test_x) if step == args.steps else args.test_size
            accuracy, test_loss = evaluate(model.module, test_x[:images], test_y[:images])
            record["evaluations"].append({"step": step, "accuracy": accuracy, "test_loss": test_loss,
                                          "seconds": time.perf_counter() - start})
            print(f"[ddp {args.hook}] step {step}/{args.steps}  train loss {loss.item():.4f}  "
                  f"test accuracy {accuracy:.4f}  {time.perf_counter() - start:.1f}s", flush=True)
    if rank == 0:
        record.update(final_accuracy=record["evaluations"][-1]["accuracy"],
                      bytes_received_per_step=received / args.steps if state is not None else None)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.hook}-s{args.seed}.json").write_text(json.dumps(record, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
