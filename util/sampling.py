"""Resumable data order: each epoch's order is a pure function of (order seed, epoch) and each sample's augmentation
of (seed, epoch, position), so a run restarted mid-epoch sees exactly the batches it would have seen.

ResumableSampler yields (index, sample_seed) pairs, sharded across processes like DistributedSampler, in its order
(the release's) or one of this module's; train_samplers builds the labeled, unlabeled and CutMix partner samplers;
SeededDataset seeds Python, NumPy and torch from sample_seed before loading, so augmentation does not
depend on which worker loads a sample or on how many samples it loaded before.
"""
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


ORDERS = ("distributed", "own")


def _own_stream(seed: int, epoch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This module's own permutation of ``length`` samples and their augmentation seeds, both drawn from one
    generator seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(length, generator=generator)
    return order, torch.randint(0, 2**62, (length,), generator=generator)


class ResumableSampler(Sampler):
    """Yields (index, sample_seed) pairs of one process, sharded across processes as DistributedSampler does.

    The order is ``distributed``: the permutation torch's DistributedSampler(shuffle=True, seed=order_seed) draws after
    set_epoch(epoch) (the release's), or ``own``: a permutation drawn from (order_seed, epoch) by this module's rule.
    Augmentation seeds come from (seed, epoch, position) either way, so two samplers that share an order and differ in
    seed give the same images augmented independently. order_seed defaults to seed.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1, order: str = "own",
                 order_seed: int | None = None):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.length = length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.order = order
        self.order_seed = seed if order_seed is None else order_seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order of ``epoch``, skipping this process's first ``start`` samples (already trained on)."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return -(-self.length // self.world_size) - self.start

    def permutation(self) -> torch.Tensor:
        """The order of every sample in this epoch, before padding and sharding."""
        if self.order == "distributed":
            return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.order_seed + self.epoch))
        return _own_stream(self.order_seed, self.epoch, self.length)[0]

    def __iter__(self):
        order = self.permutation()
        sample_seeds = _own_stream(self.seed, self.epoch, self.length)[1]
        padded = -(-self.length // self.world_size) * self.world_size
        # Pad with the first samples, as DistributedSampler does, so every process runs the same step count.
        positions = torch.arange(padded) % self.length
        mine = positions[self.rank::self.world_size][self.start:]
        return iter([(order[p].item(), sample_seeds[p].item()) for p in mine])


def train_samplers(cfg: dict, labeled_length: int, unlabeled_length: int, rank: int,
                   world_size: int) -> tuple[ResumableSampler, ResumableSampler, ResumableSampler]:
    """(labeled, unlabeled, CutMix partner) samplers of cfg's data_order and cutmix_partner.

    data_order release: both the labeled and the unlabeled loader walk DistributedSampler's permutation with seed
    sampler_seed, as the release's do (its labeled list has the unlabeled length, so unlabeled j shares its step with
    labeled j mod L). cutmix_partner same_image: the partner walks the unlabeled order with other augmentation seeds,
    as the release's zip of its unlabeled loader with itself does. Augmentation seeds follow `seed` in every case.
    """
    seed = cfg["seed"]
    if cfg["data_order"] == "release":
        order = {"order": "distributed", "order_seed": cfg["sampler_seed"]}
        labeled = ResumableSampler(labeled_length, seed + 1, rank, world_size, **order)
        unlabeled = ResumableSampler(unlabeled_length, seed + 2, rank, world_size, **order)
    else:
        labeled = ResumableSampler(labeled_length, seed + 1, rank, world_size)
        unlabeled = ResumableSampler(unlabeled_length, seed + 2, rank, world_size)
    if cfg["cutmix_partner"] == "same_image":
        partner = ResumableSampler(unlabeled_length, seed + 3, rank, world_size, unlabeled.order, unlabeled.order_seed)
    else:
        partner = ResumableSampler(unlabeled_length, seed + 3, rank, world_size)
    return labeled, unlabeled, partner


class SeededDataset(Dataset):
    """Wraps a dataset so that item (index, seed) is loaded with every random generator seeded by seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        if get_worker_info() is None:
            # Loading in the training process: leave its own random streams as they were.
            state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            try:
                return self._load(index, seed)
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])
                torch.set_rng_state(state[2])
        return self._load(index, seed)

    def _load(self, index: int, seed: int):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


def rng_state() -> dict:
    """The random states of this process in a form torch.load(weights_only=True) accepts."""
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
