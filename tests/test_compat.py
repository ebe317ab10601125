"""util/compat.py on the installed torch (CI runs the suite at both ends of the supported range): the DDP wrapper of
training and of the SyncBatchNorm worker copies rank 0's buffers once, at construction, and none before a forward."""
import json
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from util.compat import destroy_process_group, distributed_data_parallel

WORLD_SIZE = 2


def wrap_and_forward(rank: int, folder: str) -> None:
    """One process of a CPU (gloo) group: a BatchNorm whose running mean is the rank's own before wrapping and again
    after it, then one forward in eval mode (which updates no statistics); writes what it saw to RANK.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    module = nn.BatchNorm1d(3)
    module.running_mean.fill_(rank + 1.0)
    wrapped = distributed_data_parallel(module, None)
    after_construction = module.running_mean.tolist()
    module.running_mean.fill_(10.0 * (rank + 1))
    wrapped.eval()
    wrapped(torch.zeros(2, 3))
    with open(f"{folder}/{rank}.json", "w") as file:
        json.dump({"wrapped": isinstance(wrapped, nn.parallel.DistributedDataParallel),
                   "after_construction": after_construction, "after_forward": module.running_mean.tolist()}, file)
    destroy_process_group()


def test_ddp_wrapper_copies_buffers_at_construction_only(tmp_path):
    mp.spawn(wrap_and_forward, args=(str(tmp_path),), nprocs=WORLD_SIZE)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert all(process["wrapped"] for process in seen)
    # Rank 0's buffers reach every process at construction...
    assert [process["after_construction"] for process in seen] == [[1.0] * 3] * WORLD_SIZE
    # ...and a forward leaves each process its own.
    assert [process["after_forward"] for process in seen] == [[10.0] * 3, [20.0] * 3]
