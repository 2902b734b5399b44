"""Torch-only model code: no parallelism, no DeepSpeed, no numpy (shipped as HF remote code)."""
