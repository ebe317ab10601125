"""The pretraining task is deterministic, labels every class it draws and shares no shape or texture with the
benchmark."""
import numpy as np

from dataset import shapes_pretrain, synthetic


def test_samples_are_deterministic_and_seeds_differ():
    first, again, other = shapes_pretrain.render(0, 3), shapes_pretrain.render(0, 3), shapes_pretrain.render(1, 3)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (synthetic.HEIGHT, synthetic.WIDTH, 3) and first[0].dtype == np.uint8
    assert first[1].shape == (synthetic.HEIGHT, synthetic.WIDTH)


def test_masks_cover_the_classes_and_the_background():
    _, masks = shapes_pretrain.generate(0, 60)
    labels = set(np.unique(masks))
    assert 0 in labels and labels <= set(range(len(shapes_pretrain.CLASSES)))
    assert len(labels) > 20  # nearly all 25 classes appear in 60 images
    assert 0.05 < (masks > 0).mean() < 0.8


def test_no_shape_or_texture_of_the_benchmark_is_reused():
    benchmark = {function for pair in synthetic._CLASSES[1:] for function in pair}
    assert not benchmark & (set(shapes_pretrain.SHAPES.values()) | set(shapes_pretrain.TEXTURES.values()))
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-1.2, 1.2, size=(2, 64, 64))
    benchmark_masks = [shape(u, v) for shape, _ in synthetic._CLASSES[1:]]
    for name, shape in shapes_pretrain.SHAPES.items():
        for mask in benchmark_masks:
            assert (shape(u, v) != mask).mean() > 0.05, name


def test_the_benchmark_renders_as_before():
    # Rendering objects of another task must leave the benchmark's own images unchanged (GENERATOR_VERSION holds).
    image, mask = synthetic.render(0, "train", 0)
    assert (int(image.astype(np.int64).sum()), int(mask.astype(np.int64).sum())) == BENCHMARK_SUMS


BENCHMARK_SUMS = (7035460, 50427)  # measured before the other task was added
