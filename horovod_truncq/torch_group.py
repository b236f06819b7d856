"""The transport over torch.distributed (Gloo on CPU, NCCL on CUDA): a Group (groups.py) on a
process group. torch.distributed pairs collectives by the order they are issued, not by name: the
exchange issues them in the same order on every rank."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist


# torch 2.14 renamed all_gather_into_tensor to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Handle:
    def __init__(self, work: dist.Work, result: torch.Tensor) -> None:
        self.work, self.result = work, result

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.result


class TorchGroup:
    """The ranks of a torch.distributed process group (default: the whole world).

    ranks_per_node: ranks on each node, numbered node by node; default torchrun's LOCAL_WORLD_SIZE,
    else one (every rank its own node)."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, ranks_per_node: Optional[int] = None) -> None:
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.size = dist.get_world_size(self.process_group)
        if ranks_per_node is None:
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if ranks_per_node < 1 or self.size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the {self.size} ranks")
        self.nodes = [rank // ranks_per_node for rank in range(self.size)]

    def alltoall(self, rows: torch.Tensor, splits: Sequence[int], name: str) -> _Handle:
        rows = rows.contiguous()
        received = rows.new_empty((sum(splits), *rows.shape[1:]))
        splits = list(splits)
        work = dist.all_to_all_single(received, rows, output_split_sizes=splits, input_split_sizes=splits,
                                      group=self.process_group, async_op=True)
        return _Handle(work, received)

    def allgather(self, tensor: torch.Tensor, name: str) -> _Handle:
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))
        work = _all_gather_single(gathered, tensor, group=self.process_group, async_op=True)
        return _Handle(work, gathered)

    def allreduce(self, tensor: torch.Tensor, name: str) -> _Handle:
        work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        return _Handle(work, tensor)
