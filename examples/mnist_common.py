"""Fashion-MNIST (or MNIST), the example models and evaluation, shared by the training examples."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_data(args) -> tuple[str, tuple[torch.Tensor, ...]]:
    """(name, (train_x, train_y, test_x, test_y)) with images normalised to mean 0, std 1."""
    folder = Path(args.data_dir or FASHION_DIR)
    if args.data in ("auto", "fashion-mnist") and (folder / "train-images-idx3-ubyte.gz").exists():
        name = "fashion-mnist" if args.data_dir is None else f"idx:{folder}"
        arrays = [read_idx(folder / f"{split}-{kind}.gz") for split in ("train", "t10k")
                  for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    elif args.data in ("auto", "mnist"):
        import torchvision  # only needed for MNIST
        root = args.data_dir or os.path.expanduser("~/.cache/horovod-truncq/mnist")
        sets = [torchvision.datasets.MNIST(root, train=train, download=True) for train in (True, False)]
        name = "mnist"
        arrays = [a for s in sets for a in (s.data.numpy(), s.targets.numpy())]
    else:
        raise SystemExit(f"no Fashion-MNIST in {folder}: install Debian's dataset-fashion-mnist or pass --data-dir")
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.array(a)) for a in arrays)
    mean, std = train_x.float().mean(), train_x.float().std()
    norm = lambda x: ((x.float() - mean) / std).unsqueeze(1)  # noqa: E731
    return name, (norm(train_x), train_y.long(), norm(test_x), test_y.long())


def make_model(kind: str) -> torch.nn.Module:
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(512, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            out = model(x[start:start + 1000])
            loss += F.cross_entropy(out, y[start:start + 1000], reduction="sum").item()
            correct += (out.argmax(1) == y[start:start + 1000]).sum().item()
    model.train()
    return correct / len(x), loss / len(x)
