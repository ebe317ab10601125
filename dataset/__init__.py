"""Split files, datasets, augmentation and the built-in synthetic dataset; knows nothing of models."""
