"""One training run of a time-to-accuracy workload under one gradient exchange (launch/tta.sh runs it).

    mpirun ... python examples/tta.py --workload resnet --frontend ddp --compressor tnqsgd --bits 3 --out run.json
    mpirun ... python examples/tta.py --workload charlm --frontend ddp --compressor powersgd --steps 12 --eval-every 0 --out t.json

Trains examples/workloads.py's workload for its step budget (or --steps) and evaluates every
--eval-every steps on rank 0 between two barriers, so evaluation stays out of the step times. Each
step's time is that of its slowest rank. Rank 0 writes one JSON record: the method, each step's
time, the evaluations (step, training seconds so far, quality), and after --warmup steps the bytes
received per rank per step and each node's interface counters per step.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import time
from itertools import accumulate
from pathlib import Path

import torch

import frontends
from frontends import add_method_arguments, method_from
from workloads import WORKLOADS


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="resnet", choices=sorted(WORKLOADS))
    add_method_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the workload's budget")
    p.add_argument("--eval-every", type=int, default=10, help="0: no evaluation (a step-time run)")
    p.add_argument("--warmup", type=int, default=3,
                   help="first steps left out of the byte counts (and of the report's step times): compilation, "
                        "PowerSGD's two fp32 steps")
    p.add_argument("--label", default="", help="free text stored in the record (link rate, ...)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    return args, method_from(args, p, seed=args.seed)


def main() -> None:
    args, method = parse_args()
    faulthandler.enable(all_threads=True)
    run = frontends.start(method.frontend)
    threads = max(1, (os.cpu_count() or 1) // run.local_size)
    torch.set_num_threads(threads)
    workload = WORKLOADS[args.workload](run.rank, run.size, args.seed)
    steps = args.steps or workload.steps
    torch.manual_seed(args.seed)  # the same initial model in every configuration
    model = workload.model()
    base = workload.optimizer(model)
    numel = sum(p.numel() for p in model.parameters())
    model, optimizer, traffic = run.wrap(model, base, method)
    evaluations, times = [], []
    warmup = min(args.warmup, steps - 1)
    for step in range(steps):
        if step == warmup:
            run.barrier()
            counters = frontends.interface_bytes()
            if traffic is not None:
                traffic.take()
        for group in optimizer.param_groups:
            group["lr"] = workload.learning_rate(step)
        batch = workload.batch()
        began = time.perf_counter()
        optimizer.zero_grad()
        loss = workload.loss(model, batch)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            run.barrier()
            if run.rank == 0:
                torch.set_num_threads(os.cpu_count() or 1)  # the other ranks wait at the barrier
                quality = workload.quality(getattr(model, "module", model))
                torch.set_num_threads(threads)
                evaluations.append({"step": step + 1, "quality": quality, "train_loss": loss.item()})
                print(f"[tta] {args.label} {args.workload} {method.frontend} {method.compressor} step {step + 1}/{steps}"
                      f"  quality {quality:.4f}  {sum(times):.1f}s", flush=True)
            run.barrier()
    run.barrier()
    nodes = frontends.node_counters(run, counters, steps - warmup)
    received = frontends.received_per_rank(method, traffic, numel, run.size, steps - warmup)
    slowest = run.slowest(torch.tensor(times, dtype=torch.float64)).tolist()
    if run.rank == 0:
        elapsed = list(accumulate(slowest))
        for evaluation in evaluations:
            evaluation["train_seconds"] = elapsed[evaluation["step"] - 1]
        record = {"workload": args.workload, **method.describe(), "seed": args.seed, "label": args.label,
                  "ranks": run.size, "ranks_per_node": run.local_size, "steps": steps, "warmup": warmup, "parameters": numel,
                  "higher_is_better": workload.higher_is_better, "step_seconds_all": slowest,
                  "evaluations": evaluations, "received_per_rank": received, "nodes": nodes}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"[tta] {args.label} {args.workload} {method.frontend} {method.compressor} b={method.bits}: "
              f"{elapsed[-1]:.1f}s for {steps} steps", flush=True)
    run.close()


if __name__ == "__main__":
    main()
