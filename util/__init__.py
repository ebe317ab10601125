"""Shared helpers of training and evaluation: configuration, metrics, losses, checkpoints, processes, logging."""
