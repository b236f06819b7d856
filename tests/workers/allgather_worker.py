"""Each rank sends 5 uint8 bytes of its own; every rank must receive every rank's bytes in order."""
import horovod.torch as hvd
import torch

hvd.init()
mine = torch.arange(5, dtype=torch.uint8) + 10 * hvd.rank()
gathered = hvd.allgather(mine, name="install.allgather")
expected = torch.cat([torch.arange(5, dtype=torch.uint8) + 10 * r for r in range(hvd.size())])
assert gathered.dtype == torch.uint8 and torch.equal(gathered, expected), gathered
print(f"OK allgather {hvd.rank()}", flush=True)
