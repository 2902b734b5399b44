"""Corpus preparation: read corpora, train or load a tokenizer, and write Megatron-compatible token shards.

``python -m data_prep --help`` (or ``make data`` / ``make tokenizer``). Modules: `sources` (inputs and
record readers), `validation` (bad-input reasons), `tokenizer` (BPE training / HF tokenizers),
`workers` (parallel tokenization in piece order), `sharding` (shards and checkpoints), `pipeline`
(the build), `sidecar` (precomputed Engram row ids). The format is described in docs/data.md.
"""
