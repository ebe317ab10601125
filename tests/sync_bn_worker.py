"""Torchrun worker of tests/test_cuda.py: one training step of ScaleMatch's network converted to SyncBatchNorm and
wrapped in DistributedDataParallel by scalematch.py's wrapper (util.compat), each process on its share of a batch,
against the same network with plain BatchNorm on the whole batch in one process. Rank 0 writes the largest
differences, relative to the largest reference value, as JSON to OUT.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/sync_bn_worker.py {gloo,nccl} OUT

Every process uses CUDA device 0, so that one GPU is enough: NCCL refuses two processes on one device, so two
processes synchronise over gloo (whose collectives take CUDA tensors), and one NCCL process checks NCCL's collectives.
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_model  # noqa: E402
from util.compat import destroy_process_group, distributed_data_parallel  # noqa: E402
from util.config import validate  # noqa: E402
from util.dist import collective_timeout  # noqa: E402

BATCH = 4
NCLASS = 4
SIZE = 32


def whole_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images and masks in every process; the images' means differ, so that statistics of a share of the
    batch are not the batch's."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g) + torch.linspace(-1, 1, BATCH).view(BATCH, 1, 1, 1)
    masks = torch.randint(0, NCLASS, (BATCH, SIZE, SIZE), generator=g)
    return images.to(device), masks.to(device)


def predictions_and_loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The 1x and CIF-fused predictions (with the view at 0.5) and their labeled loss; no dropout branch, so that
    both networks draw nothing at random."""
    out = model(images, image_scales=(0.5,))
    predictions = [out["pred"], out["pred_cif"][0]]
    return predictions, sum(F.cross_entropy(p, masks) for p in predictions)


def largest_difference(pairs) -> float:
    """max over (a, b) pairs of tensors of max |a - b| / max |b|; a b whose entries are all below a thousandth of the
    largest |b| of all pairs is scaled by that thousandth instead (a parameter whose gradient is next to zero)."""
    pairs = list(pairs)
    floor = 1e-3 * max(b.abs().max().item() for _, b in pairs)
    return max((a - b).abs().max().item() / max(b.abs().max().item(), floor) for a, b in pairs)


def nccl_sync_function_difference(device: torch.device) -> float:
    """SyncBatchNorm's own autograd function, which nn.SyncBatchNorm calls only with 2 or more processes, run here on
    one: its NCCL collectives (all-gather of the statistics, all-reduce in backward) against F.batch_norm."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 5, 5, generator=g) * 2 + 1).to(device)
    weight, bias = torch.rand(3, generator=g).to(device), torch.randn(3, generator=g).to(device)
    grad = torch.randn(2, 3, 5, 5, generator=g).to(device)
    results = []
    for function in ("sync", "plain"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        running = [torch.zeros(3, device=device), torch.ones(3, device=device)]
        if function == "sync":
            y = sync_batch_norm.apply(*leaves, *running, 1e-5, 0.1, dist.group.WORLD, 1)
        else:
            y = F.batch_norm(leaves[0], *running, leaves[1], leaves[2], True, 0.1, 1e-5)
        results.append([y, *torch.autograd.grad(y, leaves, grad), *running])
    return largest_difference(zip(*results))


def main() -> None:
    backend, out_path = sys.argv[1], sys.argv[2]
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    # Full float32 convolutions: the differences measured are the synchronisation's, not TF32's.
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None, timeout=collective_timeout())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = validate({"dataset": "synthetic", "data_root": "unused", "nclass": NCLASS, "backbone": "tv_resnet10",
                    "head_channels": 32, "pretrained": None, "cif_channels": 8, "cif_gate_channels": 8},
                   "sync_bn_worker")
    torch.manual_seed(0)
    reference = build_model(cfg).to(device).train()
    # As scalematch.train: SyncBatchNorm, then the same DDP wrapper.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    model = distributed_data_parallel(model, [device.index])
    images, masks = whole_batch(device)
    share = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    expected, loss = predictions_and_loss(reference, images, masks)
    loss.backward()
    # Each process's loss is the mean over its share; DDP averages the gradients over the equal shares.
    predictions, loss = predictions_and_loss(model, images[share], masks[share])
    loss.backward()

    parameters = dict(reference.named_parameters())
    buffers = dict(reference.named_buffers())
    differences = {
        "predictions": largest_difference((p, e[share]) for p, e in zip(predictions, expected)),
        "gradients": largest_difference((p.grad, parameters[name].grad) for name, p in model.module.named_parameters()
                                        if parameters[name].grad is not None),
        "running statistics": largest_difference((b, buffers[name]) for name, b in model.module.named_buffers()
                                                 if name.endswith(("running_mean", "running_var"))),
    }
    if backend == "nccl":
        differences["SyncBatchNorm function over NCCL"] = nccl_sync_function_difference(device)
    # The largest difference of any process.
    worst = torch.tensor(list(differences.values()), device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as file:
            json.dump({"world_size": world_size, **dict(zip(differences, worst.tolist()))}, file)
    destroy_process_group()


if __name__ == "__main__":
    main()
