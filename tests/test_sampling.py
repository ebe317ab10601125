"""The data order: the release's DistributedSampler order by default, the CutMix partner the unlabeled image itself,
resumable mid-epoch, augmentation seeds independent of the number of processes."""
import pytest
from torch.utils.data.distributed import DistributedSampler

from util.config import SCHEMA
from util.sampling import ResumableSampler, train_samplers

DEFAULTS = {name: SCHEMA[name].default for name in ("seed", "data_order", "sampler_seed", "cutmix_partner")}


def indices(sampler):
    return [index for index, _ in sampler]


def distributed_indices(length, world_size, rank, seed, epoch):
    sampler = DistributedSampler(range(length), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("length", [8, 11, 13])
def test_every_rank_sees_what_distributed_sampler_gives_it_epoch_by_epoch(world_size, length):
    assert DEFAULTS["sampler_seed"] == 0 and DEFAULTS["data_order"] == "release"  # the release's sampler seed
    for sampler_seed in (0, 7):
        for rank in range(world_size):
            cfg = DEFAULTS | {"sampler_seed": sampler_seed}
            labeled, unlabeled, partner = train_samplers(cfg, length, length, rank, world_size)
            for epoch in range(3):
                expected = distributed_indices(length, world_size, rank, sampler_seed, epoch)
                for sampler in (labeled, unlabeled, partner):
                    sampler.set_epoch(epoch)
                    assert indices(sampler) == expected
                    assert len(sampler) == len(expected)


def test_the_partner_is_the_unlabeled_image_augmented_independently():
    _, unlabeled, partner = train_samplers(DEFAULTS, 20, 20, rank=1, world_size=2)
    pairs_u, pairs_p = list(unlabeled), list(partner)
    assert [i for i, _ in pairs_u] == [i for i, _ in pairs_p]
    assert all(seed_u != seed_p for (_, seed_u), (_, seed_p) in zip(pairs_u, pairs_p))


def test_unlabeled_j_shares_its_step_with_labeled_j_mod_the_labeled_count():
    labeled_ids = ["a", "b", "c"]
    unlabeled_count = 10
    # The labeled list as the release (and dataset/semi.py) lays it out: repeated, then cut to the unlabeled length.
    repeated = (labeled_ids * 4)[:unlabeled_count]
    for world_size in (1, 2):
        for rank in range(world_size):
            labeled, unlabeled, _ = train_samplers(DEFAULTS, unlabeled_count, unlabeled_count, rank, world_size)
            for epoch in range(2):
                labeled.set_epoch(epoch)
                unlabeled.set_epoch(epoch)
                steps = list(zip(indices(labeled), indices(unlabeled)))
                assert [repeated[i] for i, _ in steps] == [labeled_ids[j % 3] for _, j in steps]


@pytest.mark.parametrize("order", ["distributed", "own"])
def test_a_resumed_epoch_continues_where_it_stopped(order):
    sampler = ResumableSampler(23, seed=4, rank=1, world_size=2, order=order, order_seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    for start in (1, 5, len(full) - 1):
        sampler.set_epoch(3, start=start)
        assert list(sampler) == full[start:] and len(sampler) == len(full) - start


@pytest.mark.parametrize("order", ["distributed", "own"])
def test_augmentation_seeds_do_not_depend_on_the_number_of_processes(order):
    one = ResumableSampler(16, seed=9, order=order, order_seed=2)
    one.set_epoch(1)
    shards = []
    for rank in range(4):
        sampler = ResumableSampler(16, seed=9, rank=rank, world_size=4, order=order, order_seed=2)
        sampler.set_epoch(1)
        shards += list(sampler)
    assert sorted(shards) == sorted(one)
    first = list(one)
    one.set_epoch(2)
    assert [seed for _, seed in one] != [seed for _, seed in first]


def test_the_former_behaviour_is_one_key_away():
    independent = DEFAULTS | {"data_order": "independent", "cutmix_partner": "other_image"}
    labeled, unlabeled, partner = train_samplers(independent, 30, 30, rank=0, world_size=1)
    assert len({tuple(indices(s)) for s in (labeled, unlabeled, partner)}) == 3
    assert indices(unlabeled) != distributed_indices(30, 1, 0, 0, 0)
    _, unlabeled, partner = train_samplers(independent | {"cutmix_partner": "same_image"}, 30, 30, 0, 1)
    assert indices(unlabeled) == indices(partner) and list(unlabeled) != list(partner)
    labeled, unlabeled, partner = train_samplers(DEFAULTS | {"cutmix_partner": "other_image"}, 30, 30, 0, 1)
    assert indices(labeled) == indices(unlabeled) != indices(partner)


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order must be one of"):
        ResumableSampler(4, seed=0, order="release")
