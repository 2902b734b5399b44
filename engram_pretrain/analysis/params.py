"""Parameter accounting on the meta device: total, activated and Engram parameters of a config.

Conventions (see docs/presets.md): *activated* counts what one token touches, without the token
embedding: dense weights, shared experts, top_k of the routed experts, the Engram projections/norms/
conv (table rows fetched per token are negligible and not counted). It is reported both with and
without the LM head; the paper's 3.8B for its 27B/40B systems matches the count without the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory.addressing_builder import build_addressing
from ..model.config import ModelConfig
from ..model.engram import EngramModule
from ..model.moe import GroupedExperts
from ..model.transformer import EngramMoEModel


@dataclass
class ParamCounts:
    """Parameter totals of one model config."""

    total: int
    embedding: int
    lm_head: int
    routed_experts: int
    routed_experts_active: int
    engram_tables: int
    engram_dense: int

    @property
    def activated_with_head(self) -> int:
        """Activated parameters without the token embedding, with the LM head."""
        return (self.total - self.embedding - self.engram_tables
                - self.routed_experts + self.routed_experts_active)

    @property
    def activated(self) -> int:
        """Activated parameters without the token embedding and the LM head (the paper's figure)."""
        return self.activated_with_head - self.lm_head

    @property
    def engram(self) -> int:
        """All Engram parameters (tables plus projections, norms and convolutions)."""
        return self.engram_tables + self.engram_dense

    @property
    def sparse(self) -> int:
        """P_sparse = P_total - P_activated, both without embedding and head (iso-parameter rule)."""
        return self.total - self.embedding - self.lm_head - self.activated


def _numel(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Instantiate `cfg` on the meta device (no memory) and count its parameters."""
    with torch.device("meta"):
        model = EngramMoEModel(cfg, build_addressing(cfg, None) if cfg.engram.layers else None)
    routed = active = tables = engram_dense = 0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            n = _numel(list(module.parameters()))
            routed += n
            active += n * cfg.moe.top_k // cfg.moe.num_routed_experts
        elif isinstance(module, EngramModule):
            t = _numel(list(module.table.parameters()))
            tables += t
            engram_dense += _numel(list(module.parameters())) - t
    tied = cfg.tie_embeddings
    return ParamCounts(
        total=_numel(list(model.parameters())),
        embedding=model.embed.weight.numel(),
        lm_head=0 if tied else model.lm_head.weight.numel(),
        routed_experts=routed, routed_experts_active=active,
        engram_tables=tables, engram_dense=engram_dense)
