"""Seeded synthetic data: `synthetic` (the tiny model's 2 s clips) and `scenes` (the small model's 4 s scenes)."""

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
    "dataset_for",
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


def dataset_for(model):
    """The synthetic data module a shipped stand-in model was trained on: ``scenes`` (the `small` model's
    4 s phrase-prompted scenes) or ``synthetic`` (the `tiny` model's 2 s clips). Models without a stand-in
    config (e.g. SAM Audio checkpoints) get ``scenes``, the richer of the two."""
    from . import scenes, synthetic

    config = getattr(model, "standin_config", None) or {}
    name = config.get("dataset")
    if name is None and config:
        name = "scenes" if config.get("text_encoder", {}).get("type") == "phrase_transformer" else "tiny_synthetic"
    if name is None:  # no config: go by the text encoder (the tiny model's word lookup -> its data)
        from ..models.tiny import TinyTextEncoder

        name = "tiny_synthetic" if isinstance(getattr(model, "text_encoder", None), TinyTextEncoder) else "scenes"
    return synthetic if name == "tiny_synthetic" else scenes
