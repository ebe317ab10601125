"""The training run's data loaders: labeled, unlabeled and CutMix-partner, each resumable mid-epoch
(util/sampling.py) and with workers that leave SIGTERM to the training process."""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset

from util.sampling import ResumableSampler, SeededDataset, train_samplers


def ignore_sigterm(worker_id: int) -> None:
    """A data loader worker leaves SIGTERM to the training process, which checkpoints before it stops: torchrun's
    agent and cluster schedulers signal whole process groups, and a worker killed that way fails the step instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, cfg: dict, sampler: ResumableSampler, batch_size: int) -> DataLoader:
    """A shuffled loader whose order and augmentation can resume mid-epoch (util/sampling.py)."""
    # Its own generator: creating an iterator draws a worker seed, which must not consume the global stream.
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=cfg["workers"],
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=cfg["workers"] > 0,
                      generator=torch.Generator().manual_seed(sampler.seed), worker_init_fn=ignore_sigterm)


def train_loaders(cfg: dict, labeled: Dataset, unlabeled: Dataset, rank: int,
                  world_size: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(labeled, unlabeled, CutMix partner) loaders of this process, each batch_size samples a step, in the order
    cfg's data_order and cutmix_partner give (util/sampling.train_samplers)."""
    samplers = train_samplers(cfg, len(labeled), len(unlabeled), rank, world_size)
    return tuple(make_loader(dataset, cfg, sampler, cfg["batch_size"])
                 for dataset, sampler in zip((labeled, unlabeled, unlabeled), samplers))
