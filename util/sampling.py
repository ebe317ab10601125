"""Resumable data order: each epoch's order and each sample's augmentation are pure functions of
(seed, epoch, position), so a run restarted mid-epoch sees exactly the batches it would have seen.

ResumableSampler yields (index, sample_seed) pairs, sharded across processes like DistributedSampler;
SeededDataset seeds Python, NumPy and torch from sample_seed before loading, so augmentation does not
depend on which worker loads a sample or on how many samples it loaded before.
"""
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class ResumableSampler(Sampler):
    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1):
        self.length = length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order of ``epoch``, skipping this process's first ``start`` samples (already trained on)."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return -(-self.length // self.world_size) - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        sample_seeds = torch.randint(0, 2**62, (self.length,), generator=generator)
        padded = -(-self.length // self.world_size) * self.world_size
        # Pad with the first samples, as DistributedSampler does, so every process runs the same step count.
        positions = torch.arange(padded) % self.length
        mine = positions[self.rank::self.world_size][self.start:]
        return iter([(order[p].item(), sample_seeds[p].item()) for p in mine])


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
