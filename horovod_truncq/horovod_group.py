"""The transport over Horovod: a Group (groups.py) on a Horovod process set."""
from __future__ import annotations

from typing import Sequence

import horovod.torch as hvd
import torch


class _Handle:
    def __init__(self, handle: int, alltoall: bool = False) -> None:
        self.handle, self.alltoall, self.result = handle, alltoall, None

    def wait(self) -> torch.Tensor:
        if self.result is None:
            output = hvd.synchronize(self.handle)
            self.result = output[0] if self.alltoall else output
        return self.result


class HorovodGroup:
    """The ranks of a Horovod process set. Construction is collective: the ranks exchange their
    node (Horovod's cross rank) and local rank. Ranks numbered within the process set."""

    def __init__(self, process_set: hvd.ProcessSet = hvd.global_process_set) -> None:
        self.process_set = process_set
        self.rank, self.size = process_set.rank(), process_set.size()
        mine = torch.tensor([[hvd.cross_rank(), hvd.local_rank()]], dtype=torch.int64)
        found = hvd.allgather(mine, name="truncq.nodes", process_set=process_set).tolist()
        distinct = len({tuple(pair) for pair in found}) == len(found)
        # Horovod's cross rank tells nodes apart when local ranks are distinct within each node
        self.nodes = [node for node, _ in found] if distinct else list(range(self.size))
        self._splits: dict[tuple[int, ...], torch.Tensor] = {}

    def alltoall(self, rows: torch.Tensor, splits: Sequence[int], name: str) -> _Handle:
        key = tuple(splits)
        tensor = self._splits.get(key)
        if tensor is None:
            tensor = self._splits.setdefault(key, torch.tensor(key, dtype=torch.int32))
        return _Handle(hvd.alltoall_async(rows.contiguous(), splits=tensor, name=name, process_set=self.process_set),
                       alltoall=True)

    def allgather(self, tensor: torch.Tensor, name: str) -> _Handle:
        return _Handle(hvd.allgather_async(tensor.contiguous(), name=name, process_set=self.process_set))

    def allreduce(self, tensor: torch.Tensor, name: str) -> _Handle:
        return _Handle(hvd.allreduce_async(tensor, name=name, op=hvd.Sum, process_set=self.process_set))
