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
    """A collective under way. `home`: where its result goes back to when it went through the GPU."""

    def __init__(self, work: dist.Work, result: torch.Tensor, home: Optional[torch.Tensor] = None) -> None:
        self.work, self.result, self.home = work, result, home

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.result if self.home is None else self.home.copy_(self.result)


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
        self._cuda_only = dist.get_backend(self.process_group) == "nccl"
        self._received: dict[str, torch.Tensor] = {}

    def _receiver(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """Memory for the result of collective `name`, kept for its next use (a bucket's collectives
        recur every step: on the CPU a new tensor costs a page fault per 4 kB page)."""
        shape = (rows, *like.shape[1:])
        kept = self._received.get(name)
        if kept is None or kept.shape != shape or kept.dtype != like.dtype or kept.device != like.device:
            kept = self._received[name] = like.new_empty(shape)
        return kept

    def _on_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where the backend can carry it. NCCL carries CUDA tensors only: a CPU one (the
        settings' digest, when the State is made) goes through the current GPU, and its result comes
        back with a host wait."""
        tensor = tensor.contiguous()
        return tensor.cuda() if self._cuda_only and not tensor.is_cuda else tensor

    @staticmethod
    def _home(result: torch.Tensor, given: torch.Tensor) -> Optional[torch.Tensor]:
        return None if result.device == given.device else torch.empty(result.shape, dtype=result.dtype, device=given.device)

    def alltoall(self, rows: torch.Tensor, splits: Sequence[int], name: str) -> _Handle:
        sent = self._on_backend(rows)
        received = self._receiver(name, sent, sum(splits))
        splits = list(splits)
        work = dist.all_to_all_single(received, sent, output_split_sizes=splits, input_split_sizes=splits,
                                      group=self.process_group, async_op=True)
        return _Handle(work, received, self._home(received, rows))

    def allgather(self, tensor: torch.Tensor, name: str) -> _Handle:
        sent = self._on_backend(tensor)
        gathered = self._receiver(name, sent, self.size * sent.shape[0])
        work = _all_gather_single(gathered, sent, group=self.process_group, async_op=True)
        return _Handle(work, gathered, self._home(gathered, tensor))

    def allreduce(self, tensor: torch.Tensor, name: str) -> _Handle:
        """In place, as Horovod's: `tensor` holds the sum after wait()."""
        reduced = self._on_backend(tensor)
        work = dist.all_reduce(reduced, group=self.process_group, async_op=True)
        return _Handle(work, reduced, None if reduced is tensor else tensor)
