"""The time-to-accuracy benchmark's two workloads, both on data every machine has offline.

- `resnet`: torchvision's ResNet-18 with a 1-channel stem on Fashion-MNIST, SGD with momentum and
  a cosine learning rate; quality is test accuracy (higher is better).
- `charlm`: a 4-layer decoder-only transformer over bytes of the Python standard library's source
  files (sorted, the last tenth held out), Adam with a cosine learning rate; quality is the
  validation loss in nats per byte (lower is better).

Every rank draws its batches from its own generator (seed, rank), so each configuration sees the
same data in the same order.
"""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torchvision

from mnist_common import evaluate, load_data


class Workload:
    name: str
    higher_is_better: bool
    steps: int  # the budget every configuration trains for
    peak_lr: float

    def __init__(self, rank: int, size: int, seed: int) -> None:
        self.rank, self.size = rank, size
        self.sampler = torch.Generator().manual_seed(seed * 1000 + rank)

    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def quality(self, model: torch.nn.Module) -> float:
        raise NotImplementedError

    def learning_rate(self, step: int) -> float:
        """Cosine decay from the peak to zero over the budget, after a warm-up of 5% of it."""
        warmup = max(1, self.steps // 20)
        if step < warmup:
            return self.peak_lr * (step + 1) / warmup
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (self.steps - warmup)))


class ResNetFashion(Workload):
    name, higher_is_better, steps = "resnet", True, 300
    batch_size, peak_lr, test_images = 32, 0.1, 5000

    def __init__(self, rank: int, size: int, seed: int) -> None:
        super().__init__(rank, size, seed)
        _, (self.train_x, self.train_y, self.test_x, self.test_y) = load_data(SimpleNamespace(data="fashion-mnist",
                                                                                                data_dir=None))
        self.shard = torch.arange(rank, len(self.train_x), size)

    def model(self) -> torch.nn.Module:
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.peak_lr, momentum=0.9, weight_decay=5e-4)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.shard[torch.randint(len(self.shard), (self.batch_size,), generator=self.sampler)]
        return self.train_x[index], self.train_y[index]

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def quality(self, model: torch.nn.Module) -> float:
        return evaluate(model, self.test_x[:self.test_images], self.test_y[:self.test_images])[0]


class CharTransformer(torch.nn.Module):
    def __init__(self, context: int, width: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, width)
        self.position = torch.nn.Parameter(torch.zeros(context, width))
        block = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 256)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:n]
        return self.head(self.norm(self.blocks(hidden, mask=self.causal[:n, :n], is_causal=True)))


def stdlib_bytes(limit: int = 8 << 20) -> torch.Tensor:
    """The first `limit` bytes of the standard library's .py files in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class CharLM(Workload):
    name, higher_is_better, steps = "charlm", False, 300
    batch_size, context, peak_lr, validation_windows = 16, 128, 2e-3, 256

    def __init__(self, rank: int, size: int, seed: int) -> None:
        super().__init__(rank, size, seed)
        text = stdlib_bytes()
        split = len(text) * 9 // 10
        self.train, self.validation = text[:split], text[split:]

    def model(self) -> torch.nn.Module:
        return CharTransformer(self.context)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.peak_lr)

    def windows(self, text: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = text[starts[:, None] + torch.arange(self.context + 1)]
        return rows[:, :-1], rows[:, 1:]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.train) - self.context - 1, (self.batch_size,), generator=self.sampler)
        return self.windows(self.train, starts)

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())

    def quality(self, model: torch.nn.Module) -> float:
        """Mean loss over evenly spaced windows of the held-out text."""
        starts = torch.linspace(0, len(self.validation) - self.context - 2, self.validation_windows).long()
        model.eval()
        with torch.no_grad():
            loss = sum(self.loss(model, self.windows(self.validation, chunk)).item() for chunk in starts.split(64))
        model.train()
        return loss / len(starts.split(64))


WORKLOADS = {w.name: w for w in (ResNetFashion, CharLM)}
