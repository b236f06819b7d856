"""Data-parallel training on MNIST-format data with Horovod and a gradient compressor.

    horovodrun -np 8 -H localhost:8 --gloo python examples/train_mnist.py --compressor tnqsgd --bits 3

Each worker trains on its own shard (every size-th image); rank 0 evaluates test accuracy, prints
progress and writes a JSON record per run. Comma-separated --compressor, --bits and --seed run every
combination one after another in the same processes (the sweep in launch/sweep.sh uses this).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

import horovod.torch as hvd
import horovod_truncq as htq
from mnist_common import evaluate, load_data, make_model
COMPRESSORS = ("none", "fp16", *htq.SCHEMES)  # Horovod's own, then every scheme of the library


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="tnqsgd", help=f"comma list of {', '.join(COMPRESSORS)}, or all")
    p.add_argument("--bits", default="3", help="comma list of bits per coordinate (ignored by none, fp16)")
    p.add_argument("--tail", default=None, choices=["laplace", "powerlaw"], help="tail model (default: the scheme's)")
    p.add_argument("--bucket-size", type=int, default=None, help="QSGD/NQSGD bucket size (default: whole tensor)")
    p.add_argument("--exchange", default="two-phase", choices=["two-phase", "node-aware"],
                   help="how quantized gradients move between ranks")
    p.add_argument("--error-feedback", default="off",
                   help="comma list of off, on, or the share of the residual kept, e.g. 0.5 (runs each)")
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--epochs", type=float, default=None, help="train this many epochs of each shard instead of --steps")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--seed", default="0", help="comma list of seeds")
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "mnist"],
                   help="auto: Fashion-MNIST from Debian's dataset-fashion-mnist, else MNIST via torchvision")
    p.add_argument("--data-dir", default=None, help="folder of *-idx?-ubyte.gz files, or torchvision's root for mnist")
    p.add_argument("--eval-every", type=int, default=50, help="steps between test evaluations")
    p.add_argument("--test-size", type=int, default=2000,
                   help="test images in the intermediate evaluations; the final one uses the whole test set")
    p.add_argument("--out-dir", default="runs/train", help="where rank 0 writes one JSON record per run")
    return p.parse_args()


# ---------------------------------------------------------------- compression
def make_compression(name: str, bits: int, args, seed: int):
    if name == "none":
        return hvd.Compression.none
    if name == "fp16":
        return hvd.Compression.fp16
    cls = htq.SCHEMES[name]
    if name in ("qsgd", "nqsgd"):
        return cls(bits=bits, bucket_size=args.bucket_size, seed=seed)
    return cls(bits=bits, tail=args.tail, seed=seed)


# ---------------------------------------------------------------- one run
def parse_feedback(text: str) -> Union[bool, float]:
    """off -> False, on -> True, a number -> the decay (the share of the residual kept)."""
    if text in ("off", "on"):
        return text == "on"
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"--error-feedback takes a comma list of off, on or numbers in (0, 1]; got {text!r}")


def feedback_tag(feedback: Union[bool, float]) -> str:
    return "" if feedback is False else "-ef" if feedback is True else f"-ef{feedback:g}"


def train(args, data_name: str, data, compressor: str, bits: int, seed: int, feedback: Union[bool, float]) -> dict:
    train_x, train_y, test_x, test_y = data
    rank, size = hvd.rank(), hvd.size()
    shard = torch.arange(rank, len(train_x), size)
    steps = args.steps if args.epochs is None else max(1, round(args.epochs * len(shard) / args.batch_size))
    torch.manual_seed(seed)  # same initial model on every rank
    model = make_model(args.model)
    compression = make_compression(compressor, bits, args, seed)
    quantized = isinstance(compression, htq.Quantizer)
    optimizer = htq.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay),
        named_parameters=model.named_parameters(), compression=compression,
        **({"exchange": args.exchange, "error_feedback": feedback} if quantized else {}))
    numel = sum(p.numel() for p in model.parameters())
    sampler = torch.Generator().manual_seed(seed * 1000 + rank)
    label = compressor if compressor in ("none", "fp16") else f"{compressor} b={bits}{feedback_tag(feedback)}"
    record = {"config": {**vars(args), "compressor": compressor, "bits": bits if quantized else None,
                         "exchange": args.exchange if quantized else None,
                         "error_feedback": feedback if quantized else None,
                         "tail": getattr(getattr(compression, "tail", None), "name", None), "seed": seed,
                         "workers": size, "data": data_name, "steps": steps, "parameters": numel},
              "evaluations": []}
    traffic = htq.Traffic()
    start = time.perf_counter()
    step_seconds = []  # of each step, evaluation excluded: the first one pays any compilation
    for step in range(1, steps + 1):
        began = time.perf_counter()
        index = shard[torch.randint(len(shard), (args.batch_size,), generator=sampler)]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - began)
        if quantized:
            traffic = traffic + optimizer.traffic.take()
        if rank == 0 and (step % args.eval_every == 0 or step == steps):
            images = len(test_x) if step == steps else args.test_size
            accuracy, test_loss = evaluate(model, test_x[:images], test_y[:images])
            record["evaluations"].append({"step": step, "accuracy": accuracy, "test_loss": test_loss, "test_images": images,
                                          "train_loss": loss.item(), "seconds": time.perf_counter() - start})
            print(f"[{label} seed={seed}] step {step}/{steps}  train loss {loss.item():.4f}  "
                  f"test accuracy {accuracy:.4f}  {time.perf_counter() - start:.1f}s", flush=True)
    fp32 = htq.traffic.ring_allreduce_bytes(4 * numel, size)
    if quantized:
        bytes_per_step = {"sent": traffic.sent / steps, "received": traffic.received / steps,
                          "fp32_reference": traffic.fp32_reference / steps}
    else:  # Horovod's ring allreduce of every gradient, in float32 or float16
        moved = fp32 // 2 if compressor == "fp16" else fp32
        bytes_per_step = {"sent": moved, "received": moved, "fp32_reference": fp32}
    later = sorted(step_seconds[1:])[len(step_seconds[1:]) // 2] if len(step_seconds) > 1 else None
    record.update(first_step_seconds=step_seconds[0], median_later_step_seconds=later)
    if rank == 0:
        print(f"[{label} seed={seed}] first step {step_seconds[0]:.2f}s, later steps {later or 0:.3f}s (median)",
              flush=True)
    record.update(final_accuracy=record["evaluations"][-1]["accuracy"] if rank == 0 else None,
                  bytes_per_step=bytes_per_step, wall_seconds=time.perf_counter() - start)
    return record


def main() -> None:
    args = parse_args()
    hvd.init()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))
    compressors = list(COMPRESSORS) if args.compressor == "all" else args.compressor.split(",")
    unknown = set(compressors) - set(COMPRESSORS)
    if unknown:
        raise SystemExit(f"unknown compressor(s) {sorted(unknown)}; choose from {', '.join(COMPRESSORS)}")
    data_name, data = load_data(args)
    out_dir = Path(args.out_dir)
    feedbacks = [parse_feedback(text) for text in args.error_feedback.split(",")]
    runs = []
    for compressor, bits, feedback, seed in itertools.product(compressors, args.bits.split(","), feedbacks,
                                                                args.seed.split(",")):
        if compressor in ("none", "fp16"):
            if (compressor, seed) in {(c, s) for c, _, _, s in runs}:
                continue  # bits and error feedback do not apply
        elif int(bits) < htq.SCHEMES[compressor].min_bits:
            continue  # e.g. QSGD needs 2 bits: a sign and a magnitude
        runs.append((compressor, bits, feedback, seed))
    for compressor, bits, feedback, seed in runs:
        record = train(args, data_name, data, compressor, int(bits), int(seed), feedback)
        if hvd.rank() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            tag = compressor if compressor in ("none", "fp16") else f"{compressor}-b{bits}{feedback_tag(feedback)}"
            path = out_dir / f"{tag}-s{seed}.json"
            path.write_text(json.dumps(record, indent=1))
            print(f"[{tag} seed={seed}] final test accuracy {record['final_accuracy']:.4f}, "
                  f"{record['bytes_per_step']['received']:.0f} bytes/step received per worker "
                  f"(fp32: {record['bytes_per_step']['fp32_reference']:.0f}), record: {path}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
