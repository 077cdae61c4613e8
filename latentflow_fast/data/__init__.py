"""Seeded synthetic data for the tiny default model."""

from .synthetic import (
    CLASSES,
    CLIP_SAMPLES,
    EVAL_SEEDS,
    SAMPLE_RATE,
    TRAIN_SEEDS,
    Mixture,
    MixtureBatch,
    eval_seeds,
    make_batch,
    make_mixture,
)

__all__ = [
    "CLASSES",
    "CLIP_SAMPLES",
    "EVAL_SEEDS",
    "SAMPLE_RATE",
    "TRAIN_SEEDS",
    "Mixture",
    "MixtureBatch",
    "eval_seeds",
    "make_batch",
    "make_mixture",
]
