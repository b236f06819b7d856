"""Codec error benchmark: error and bytes of every scheme, tail and bit width, in one table.

    .venv/bin/python examples/bench_error.py [--device cuda] [--elements 1048576]

Columns:
- laplace, student-t: mean squared error on 2^20 samples of Laplace(0, 1) and Student-t (3 dof).
- real: relative error sum((q(g) - g)^2) / sum(g^2), averaged over the gradients (>= 1024 elements)
  of the example CNN captured at steps 1, 50 and 100 of single-process SGD on Fashion-MNIST.
- bytes/elem: payload bytes per element for a 2^20-element tensor (header and side information included).
The first row is Horovod's fp16 compressor (a cast to float16 and back) for scale. Speed is
examples/bench_codec.py's job.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import horovod_truncq as htq  # noqa: E402

CONFIGS = ([(cls, tail, {}) for cls in (htq.TUQSGD, htq.TNQSGD, htq.TBQSGD) for tail in ("laplace", "powerlaw")]
           + [(htq.QSGD, None, {}), (htq.QSGD, None, {"bucket_size": 512}), (htq.NQSGD, None, {})])


def capture_gradients(steps=(1, 50, 100)) -> list[torch.Tensor]:
    """Gradients of the example CNN during plain SGD on Fashion-MNIST (no Horovod needed)."""
    from mnist_common import load_data, make_model
    _, (train_x, train_y, _, _) = load_data(argparse.Namespace(data="auto", data_dir=None))
    torch.manual_seed(0)
    model = make_model("cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    grads = []
    for step in range(1, max(steps) + 1):
        index = torch.randint(len(train_x), (32,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[index]), train_y[index]).backward()
        if step in steps:
            grads += [p.grad.detach().clone().reshape(-1) for p in model.parameters() if p.numel() >= 1024]
        optimizer.step()
    return grads


def mse(q, x: torch.Tensor) -> float:
    return ((q.decode(q.encode(x), x.shape) - x) ** 2).mean().item()


def relative_error(q, grads: list[torch.Tensor]) -> float:
    return statistics.mean(((q.decode(q.encode(g), g.shape) - g) ** 2).sum().item() / (g ** 2).sum().item()
                           for g in grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--bits", default="2,3,4,8")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((args.elements,)).to(device)
    student = torch.distributions.StudentT(3.0).sample((args.elements,)).to(device)
    grads = [g.to(device) for g in capture_gradients()]
    print(f"device {device}, {args.elements} elements, {len(grads)} real gradient tensors "
          f"({sum(g.numel() for g in grads)} elements), torch {torch.__version__}")
    print("| scheme | tail | bits | laplace MSE | student-t MSE | real rel. error | bytes/elem |")
    print("|---|---|---|---|---|---|---|")
    half = lambda t: t.half().float()  # noqa: E731
    print(f"| fp16 (Horovod) | - | 16 | {((half(laplace) - laplace) ** 2).mean():.3g} | "
          f"{((half(student) - student) ** 2).mean():.3g} | "
          f"{statistics.mean(((half(g) - g) ** 2).sum().item() / (g ** 2).sum().item() for g in grads):.3g} | "
          f"2.0000 |", flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        for cls, tail, extra in CONFIGS:
            kwargs = dict(extra, bits=bits, seed=0)
            if tail:
                kwargs["tail"] = tail
            q = cls(**kwargs)
            name = cls.__name__ + (f" (bucket {extra['bucket_size']})" if extra else "")
            print(f"| {name} | {tail or '-'} | {bits} | {mse(q, laplace):.4g} | {mse(q, student):.4g} | "
                  f"{relative_error(q, grads):.4g} | {q.payload_size(args.elements) / args.elements:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
