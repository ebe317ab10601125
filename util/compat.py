"""What differs between the torch releases this codebase supports (requirements.txt: torch 2.4 to 2.15), in one place.

Feature checks, not version numbers: a build that backports an API is served by it.
"""
from __future__ import annotations

import inspect
import time
from typing import Sequence

import torch.distributed as dist
from torch import nn

# torch 2.13 replaced DistributedDataParallel's broadcast_buffers by forward_sync_buffers, which leaves the copy of the
# buffers at construction on.
_HAS_FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(
    nn.parallel.DistributedDataParallel.__init__).parameters


def distributed_data_parallel(module: nn.Module,
                              device_ids: Sequence[int] | None) -> nn.parallel.DistributedDataParallel:
    """``module`` wrapped in DistributedDataParallel (process group initialised) whose parameters and buffers are copied
    from rank 0 once, here, after which each process keeps its own buffers: they are not broadcast before each forward
    (nor after an uneven-input join), so BatchNorm statistics stay per process and resume restores them per rank.

    ``device_ids``: [the local GPU] for a module on a GPU, None on the CPU."""
    ddp = nn.parallel.DistributedDataParallel
    if _HAS_FORWARD_SYNC_BUFFERS:
        return ddp(module, device_ids=device_ids, forward_sync_buffers=False)
    # Before 2.13 broadcast_buffers=False would skip the copy at construction too: it is turned off once that is done.
    wrapped = ddp(module, device_ids=device_ids)
    wrapped.broadcast_buffers = False
    return wrapped


def destroy_process_group() -> None:
    """Leave the default process group. Before torch 2.8 its destructor keeps Python's lock while it waits for gloo's
    worker threads, and a worker still freeing the tensor of a finished collective waits for that lock: both hang (seen
    with eval.py over two processes on torch 2.4). A pause without the lock first lets the workers finish; harmless
    where the destructor lets go of the lock itself."""
    time.sleep(0.2)
    dist.destroy_process_group()


def processes_could_not_meet(error: BaseException) -> bool:
    """Whether ``error``, raised while torchrun sets up its rendezvous, says the processes could not meet: a DistError,
    or the bare RuntimeError that torch 2.4's store raises when it cannot listen (a port in use)."""
    return isinstance(error, dist.DistError) or (type(error) is RuntimeError and "failed to listen" in str(error))
