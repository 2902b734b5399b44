"""The decoder: embedding -> M residual streams -> blocks [Engram] + attention + MoE/FFN -> collapse -> head.

Distribution enters only through the two objects the model receives: an expert dispatcher (MoE) and
a table factory (Engram lookups). Both default to local, single-process implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .addressing import EngramAddresser, EngramAddressing
from .attention import build_attention
from .cache import DecodeCache
from .config import ModelConfig
from .engram import EngramModule, TableFactory, local_table_factory
from .hyper_connections import HeadCollapse, HyperConnection, expand_streams
from .moe import MoE, SwiGLU
from .recompute import cheap, checkpointed, selective_forward

# State-dict names that code outside the model relies on (checkpoints, export, init_from).
ROUTER_BIAS_SUFFIX = ".ffn.router.expert_bias"
"""Suffix of the MoE routers' loss-free balancing biases (`blocks.<L>.ffn.router.expert_bias`)."""
TABLE_SUFFIX = ".engram.table.weight"
"""Suffix of an Engram table in a model built with local tables (`blocks.<L>.engram.table.weight`)."""


def table_weight_name(layer: int) -> str:
    """The state-dict name of layer `layer`'s Engram table in a whole model (local tables)."""
    return f"blocks.{int(layer)}{TABLE_SUFFIX}"


@dataclass
class ModelOutput:
    """What a forward pass returns."""

    logits: torch.Tensor
    """[B, T, V] next-token logits."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over labelled tokens plus the MoE auxiliary losses (when labels are given)."""
    lm_loss: torch.Tensor | None = None
    """Mean cross-entropy alone."""
    aux_loss: torch.Tensor | None = None
    """Sum of the MoE sequence-wise balance losses (None when disabled)."""
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    """With `output_hidden_states`: the embedding and every block output, each collapsed to [B, T, D]."""


class Block(nn.Module):
    """One transformer block: optional Engram, then attention and FFN/MoE, each wrapped in mHC."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dispatcher: object | None,
                 engram_module: EngramModule | None) -> None:
        super().__init__()
        dim, hc = cfg.hidden_size, cfg.hyper_connections
        self.layer_id = layer_id
        self.engram = engram_module
        self.engram_hc = None
        if engram_module is not None and not cfg.engram.multi_branch:
            self.engram_hc = HyperConnection(dim, hc, layer_index=3 * layer_id + 2)
        self.attn_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.attn_hc = HyperConnection(dim, hc, layer_index=2 * layer_id)
        self.ffn_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.is_moe = layer_id >= cfg.moe.first_k_dense
        self.ffn: nn.Module = (MoE(dim, cfg.moe, cfg.init_std, dispatcher) if self.is_moe
                               else SwiGLU(dim, cfg.dense_ffn_dim, cfg.init_std))
        self.ffn_hc = HyperConnection(dim, hc, layer_index=2 * layer_id + 1)

    def forward(self, streams: torch.Tensor, row_ids: torch.Tensor | None = None,
                cache: DecodeCache | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """streams: [B, T, M, D]; row_ids: [B, T, H] Engram row ids of this layer.

        cache: decoding state (this block reads and extends its own parts; positions start at
        cache.seq_len); key_mask: [B, cached + T] bool, False at padding tokens.
        """
        t = streams.shape[1]
        start_pos = cache.seq_len if cache is not None else 0
        kv = cache.attention[self.layer_id] if cache is not None else None
        token_mask = key_mask[:, -t:] if key_mask is not None else None  # [B, T]
        if self.engram is not None:
            assert row_ids is not None, f"layer {self.layer_id} has Engram but got no row ids"
            engram = self.engram
            conv = cache.short_conv[self.layer_id] if cache is not None else None
            if self.engram_hc is None:
                streams = streams + engram(streams, row_ids, conv, token_mask)
            else:
                streams = self.engram_hc(
                    streams, lambda u: engram(u.unsqueeze(2), row_ids, conv, token_mask).squeeze(2))
        attn = self.attn
        streams = self.attn_hc(streams, lambda u: attn(cheap(self.attn_norm, u), start_pos, kv, key_mask))
        return self.ffn_hc(streams, lambda u: self.ffn(cheap(self.ffn_norm, u)))


class EngramMoEModel(nn.Module):
    """Decoder-only DeepSeekMoE transformer with mHC residual streams and Engram memory."""

    def __init__(self, cfg: ModelConfig, addressing: EngramAddressing | None = None,
                 dispatcher: object | None = None, table_factory: TableFactory | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.recompute_every = 0
        """Activation recompute in training: blocks 0, n, 2n, ... are recomputed (`model.recompute`);
        0 = none. Set by the trainer from `train.activation_checkpointing(_every)`."""
        self.selective_recompute = False
        """Recomputed blocks drop only their cheap regions (`selective`), not everything (`full`)."""
        dim, e = cfg.hidden_size, cfg.engram
        self.embed = nn.Embedding(cfg.vocab_size, dim)
        self.addresser: EngramAddresser | None = None
        if e.layers:
            if addressing is None:
                raise ValueError(
                    "model.engram.layers is set but no EngramAddressing was given: build one with "
                    "engram_pretrain.memory.addressing_builder.build_addressing(model_config, ...)")
            if sorted(addressing.layer_head_sizes) != sorted(e.layers):
                raise ValueError(f"EngramAddressing covers layers {sorted(addressing.layer_head_sizes)} "
                                 f"but model.engram.layers is {sorted(e.layers)}")
            self.addresser = EngramAddresser(addressing, e.max_ngram, e.num_heads)
        factory = table_factory or local_table_factory(e.table_init_std)
        d_head = e.d_mem // ((e.max_ngram - 1) * e.num_heads)
        blocks = []
        for layer in range(cfg.num_layers):
            engram = None
            if layer in e.layers:
                assert self.addresser is not None
                sizes = self.addresser.head_sizes(layer)
                branches = cfg.hyper_connections.num_streams if e.multi_branch else 1
                engram = EngramModule(dim, e, layer, sizes, branches, factory(layer, sum(sizes), d_head),
                                      init_std=cfg.init_std)
            blocks.append(Block(cfg, layer, dispatcher, engram))
        self.blocks = nn.ModuleList(blocks)
        self.head_collapse = HeadCollapse(dim, cfg.hyper_connections)
        self.norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def engram_row_ids(self, input_ids: torch.Tensor,
                       segment_ids: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """input_ids: [B, T] -> {layer: [B, T, H]} per-head row ids (bit-exact reference hashing)."""
        if self.addresser is None:
            return {}
        if not self.config.engram.reset_at_doc_boundary:
            segment_ids = None
        return self.addresser.row_ids(input_ids, segment_ids)

    def new_cache(self) -> DecodeCache:
        """Empty decoding state for `forward(..., cache=...)` (one per batch of sequences)."""
        cfg = self.config
        return DecodeCache(cfg.num_layers, list(cfg.engram.layers), cfg.engram.max_ngram - 1)

    def _row_ids(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None,
                 cache: DecodeCache | None) -> dict[int, torch.Tensor]:
        """Row ids of the new tokens [B, T]; with a cache, hashed with the kept raw ids prepended."""
        if cache is None or self.addresser is None:
            return self.engram_row_ids(input_ids, segment_ids)
        ids, segments, h = cache.with_history(input_ids, segment_ids)
        return {layer: rows[:, h:] for layer, rows in self.engram_row_ids(ids, segments).items()}

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in block order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def update_moe_biases(self, global_loads: list[torch.Tensor] | None = None) -> None:
        """Loss-free balancing step for every MoE layer; call after each optimizer step.

        `global_loads` holds per-layer expert counts already summed over the whole global batch
        (all micro-batches and ranks); None uses each layer's local accumulated counts.
        """
        for i, moe in enumerate(self.moe_layers()):
            moe.update_bias(None if global_loads is None else global_loads[i])

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                engram_row_ids: dict[int, torch.Tensor] | None = None,
                segment_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, cache: DecodeCache | None = None,
                attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """input_ids: [B, T] raw ids; labels: [B, T] next-token targets (-100 ignored).

        cache: incremental decoding state from `new_cache()`; the new tokens take positions
        [cache.seq_len, cache.seq_len + T), their n-grams and short convs see the cached tokens, and the
        cache is advanced. attention_mask: [B, T] (1 = token, 0 = padding) of the new tokens; padding
        is invisible to the other tokens (it reads as `engram.pad_token_id` for hashing and as zeros for
        the short conv), so a left-padded row gives the logits of the unpadded one.
        """
        t = input_ids.shape[1]
        if not self.config.engram.reset_at_doc_boundary:
            segment_ids = None
        token_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)} (the new tokens only)")
            token_mask = attention_mask.bool()
        key_mask = cache.full_key_mask(token_mask, t) if cache is not None else token_mask
        hash_ids = input_ids
        if token_mask is not None:
            hash_ids = input_ids.masked_fill(~token_mask, self.config.engram.pad_token_id)
        if engram_row_ids is None:
            engram_row_ids = self._row_ids(hash_ids, segment_ids, cache)
        x = self.embed(input_ids)  # [B, T, D]
        streams = expand_streams(x, self.config.hyper_connections.num_streams)  # [B, T, M, D]
        hidden: list[torch.Tensor] = [x] if output_hidden_states else []
        every = self.recompute_every if self.training and cache is None and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            row_ids = engram_row_ids.get(block.layer_id)
            if every and i % every == 0:
                if self.selective_recompute:
                    with selective_forward():
                        streams = block(streams, row_ids, None, key_mask)
                else:
                    streams = checkpointed(block, streams, row_ids, None, key_mask)
            else:
                streams = block(streams, row_ids, cache, key_mask)
            if output_hidden_states:
                hidden.append(self.head_collapse(streams))
        if cache is not None:
            cache.advance(hash_ids, segment_ids, key_mask)
        logits = self.lm_head(self.norm(self.head_collapse(streams)))  # [B, T, V]
        out = ModelOutput(logits=logits, hidden_states=hidden)
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        out.aux_loss = torch.stack(aux).sum() if aux else None
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            out.loss = out.lm_loss if out.aux_loss is None else out.lm_loss + out.aux_loss
        return out
