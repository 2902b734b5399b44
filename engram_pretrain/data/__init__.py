"""Data: Megatron-compatible indexed datasets, dataset directories written by data_prep, packed samples,
blending and loaders for training."""
