"""engram-pretrain: distributed pretraining of MoE language models with Engram conditional memory."""

__version__ = "0.1.0"
