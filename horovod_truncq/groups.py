"""The transport interface the exchange moves payloads over, and an in-process implementation.

A Group is the ranks that reduce together: its rank and size, the node of every rank, and
asynchronous collectives that return a Handle. Horovod (horovod_group.py) and torch.distributed
(torch_group.py) implement it over the network; ThreadGroup runs W ranks as threads of one
process, so that everything above the transport is tested without launching processes.

Every collective is named; each rank issues the same collectives in the same order. `alltoall` is
symmetric: rank r sends splits[r] rows to each rank r and receives as many from it. A result may lie
in memory that the next collective of the same name overwrites (torch_group.py keeps it from step
to step): its reader is done with it before issuing that name again.
"""
from __future__ import annotations

import threading
from typing import Protocol, Sequence

import torch


class Handle(Protocol):
    def wait(self) -> torch.Tensor:
        """Block until the collective is done and return its result."""


class Group(Protocol):
    rank: int
    size: int
    nodes: list[int]  # node index of every rank, the same list on every rank

    def alltoall(self, rows: torch.Tensor, splits: Sequence[int], name: str) -> Handle:
        """rows (sum(splits), ...): splits[r] rows to rank r; the result holds the rows received, in rank order."""

    def allgather(self, tensor: torch.Tensor, name: str) -> Handle:
        """tensor (k, ...) of the same shape on every rank -> (size k, ...), in rank order."""

    def allreduce(self, tensor: torch.Tensor, name: str) -> Handle:
        """The sum of `tensor` over the ranks."""


class Done:
    """A Handle whose result is already there."""

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


class _Meeting:
    """One collective of a ThreadWorld: what each rank brought, and who has taken its result."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.inputs: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self.taken = 0


class ThreadWorld:
    """W ranks as threads of one process; `group(rank)` is rank's view. Collectives pair by name and
    by how often each rank has used that name, so the same name can serve every step."""

    def __init__(self, size: int, ranks_per_node: int = 1, timeout: float = 60.0) -> None:
        if size % ranks_per_node:
            raise ValueError(f"{size} ranks do not split into nodes of {ranks_per_node}")
        self.size = size
        self.nodes = [rank // ranks_per_node for rank in range(size)]
        self.timeout = timeout
        self._meetings: dict[tuple[str, int], _Meeting] = {}
        self._uses: dict[tuple[int, str], int] = {}
        self._ready = threading.Condition()

    def group(self, rank: int) -> "ThreadGroup":
        return ThreadGroup(self, rank)

    def post(self, rank: int, kind: str, name: str, tensor: torch.Tensor, splits: tuple[int, ...] = ()) -> "_Pending":
        with self._ready:
            use = self._uses.get((rank, name), 0)
            self._uses[(rank, name)] = use + 1
            meeting = self._meetings.setdefault((name, use), _Meeting(kind, self.size))
            if meeting.kind != kind:
                raise RuntimeError(f"collective {name!r}: rank {rank} called {kind}, another rank {meeting.kind}")
            meeting.inputs[rank] = (tensor.clone(), splits)
            self._ready.notify_all()
        return _Pending(self, (name, use), rank)

    def collect(self, key: tuple[str, int], rank: int) -> torch.Tensor:
        with self._ready:
            meeting = self._meetings[key]
            if not self._ready.wait_for(lambda: len(meeting.inputs) == self.size, self.timeout):
                raise TimeoutError(f"collective {key[0]!r}: only ranks {sorted(meeting.inputs)} of {self.size} came")
            meeting.taken += 1
            if meeting.taken == self.size:
                del self._meetings[key]
        inputs = [meeting.inputs[r] for r in range(self.size)]
        if meeting.kind == "allgather":
            return torch.cat([tensor for tensor, _ in inputs])
        if meeting.kind == "allreduce":
            return torch.stack([tensor for tensor, _ in inputs]).sum(dim=0)
        received = []
        for tensor, splits in inputs:
            start = sum(splits[:rank])
            received.append(tensor[start:start + splits[rank]])
        return torch.cat(received)


class _Pending:
    def __init__(self, world: ThreadWorld, key: tuple[str, int], rank: int) -> None:
        self.world, self.key, self.rank = world, key, rank
        self.result = None

    def wait(self) -> torch.Tensor:
        if self.result is None:
            self.result = self.world.collect(self.key, self.rank)
        return self.result


class ThreadGroup:
    """One rank of a ThreadWorld."""

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank, self.size, self.nodes = world, rank, world.size, world.nodes

    def alltoall(self, rows: torch.Tensor, splits: Sequence[int], name: str) -> Handle:
        splits = tuple(int(s) for s in splits)
        if len(splits) != self.size or sum(splits) != rows.shape[0]:
            raise ValueError(f"alltoall {name!r}: splits {splits} do not cut {rows.shape[0]} rows for {self.size} ranks")
        return self.world.post(self.rank, "alltoall", name, rows, splits)

    def allgather(self, tensor: torch.Tensor, name: str) -> Handle:
        return self.world.post(self.rank, "allgather", name, tensor)

    def allreduce(self, tensor: torch.Tensor, name: str) -> Handle:
        return self.world.post(self.rank, "allreduce", name, tensor)


def run_ranks(world: ThreadWorld, fn, *args) -> list:
    """fn(group, *args) on every rank of `world`, each in a thread; their results in rank order. An
    exception on any rank is raised here (the first one, by rank)."""
    results: list = [None] * world.size
    errors: list = [None] * world.size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(world.group(rank), *args)
        except BaseException as error:  # handed to the caller below
            errors[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world.size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
