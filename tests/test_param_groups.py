"""Parameter groups: each trainable parameter exactly once, tables excluded, the grouping of docs/model.md
rules O1-O4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram_pretrain.config import OptimizerConfig
from engram_pretrain.memory.addressing_builder import build_addressing
from engram_pretrain.model.config import ModelConfig
from engram_pretrain.model.transformer import EngramMoEModel
from engram_pretrain.train.param_groups import engram_table_params, group_sizes, param_groups_for


def tiny_config(attention: str = "gqa", multi_branch: bool = True, tie: bool = False) -> ModelConfig:
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, max_seq_len=32, tie_embeddings=tie)
    cfg.moe.num_routed_experts, cfg.moe.expert_dim, cfg.attention.num_heads = 4, 16, 4
    cfg.attention.kind = attention  # type: ignore[assignment]
    if attention == "mla":
        cfg.attention.kv_lora_rank, cfg.attention.q_lora_rank, cfg.attention.rope_head_dim = 16, 16, 4
        cfg.attention.head_dim = 8
    cfg.engram.layers, cfg.engram.num_heads, cfg.engram.d_mem = [0, 2], 2, 16
    cfg.engram.base_table_size = [31, 37]
    cfg.engram.multi_branch = multi_branch
    cfg.validate()
    return cfg


class PlainTable:
    """A table that is not an nn.Module (like the trainer's store view): its weight is not a model param."""

    def __init__(self, num_rows: int, dim: int) -> None:
        self.num_rows, self.dim = num_rows, dim
        self.weight = nn.Parameter(torch.randn(num_rows, dim))

    def lookup(self, flat_row_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(flat_row_ids, self.weight, sparse=True)


def build(cfg: ModelConfig, plain_tables: bool = False) -> EngramMoEModel:
    torch.manual_seed(0)
    factory = (lambda layer, rows, dim: PlainTable(rows, dim)) if plain_tables else None
    return EngramMoEModel(cfg, build_addressing(cfg, None), table_factory=factory)


def expected_group(name: str, p: nn.Parameter, muon: bool) -> str:
    """The grouping rule, restated from the spec over parameter names."""
    engram = ".engram." in name
    prefix = "engram_" if engram else ""
    if p.dim() < 2:
        return prefix + "no_decay"
    adamw_only = any(k in name for k in ("embed", "lm_head", "router", "phi", "conv.weight"))
    if muon and not adamw_only:
        return prefix + "muon"
    return prefix + "decay"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("variant", ["gqa", "mla", "single_branch", "tied"])
def test_groups_partition_the_trainable_parameters(optimizer: str, variant: str) -> None:
    cfg = tiny_config(attention="mla" if variant == "mla" else "gqa", multi_branch=variant != "single_branch",
                      tie=variant == "tied")
    model = build(cfg)
    model.blocks[1].attn_norm.weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups_for(model, OptimizerConfig(name=optimizer, weight_decay=0.1))  # type: ignore[arg-type]
    tables = engram_table_params(model)
    assert len(tables) == len(cfg.engram.layers)
    assert all(t is model.blocks[layer].engram.table.weight for t, layer in zip(tables, cfg.engram.layers,
                                                                                  strict=True))

    placed: dict[int, str] = {}
    for g in groups:
        assert g["params"], g["name"]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.1)
        assert g["use_muon"] == g["name"].endswith("muon")
        for p in g["params"]:
            assert id(p) not in placed, f"parameter in {placed.get(id(p))} and {g['name']}"
            placed[id(p)] = g["name"]
    table_ids = {id(t) for t in tables}
    assert not table_ids & set(placed)
    for name, p in model.named_parameters():
        if id(p) in table_ids:
            continue
        if not p.requires_grad:
            assert id(p) not in placed
            continue
        assert placed.get(id(p)) == expected_group(name, p, optimizer == "muon"), name
    if optimizer == "muon":
        muon_shapes = {tuple(p.shape) for g in groups if g["use_muon"] for p in g["params"]}
        assert any(len(s) == 3 for s in muon_shapes)  # routed experts stay [E, A, B]
    assert set(group_sizes(groups)) == {g["name"] for g in groups}


def test_tables_outside_the_module_tree_are_found_and_never_grouped() -> None:
    model = build(tiny_config(), plain_tables=True)
    tables = engram_table_params(model)
    assert [t.shape[1] for t in tables] == [4, 4]
    model_ids = {id(p) for p in model.parameters()}
    assert not {id(t) for t in tables} & model_ids
    groups = param_groups_for(model, OptimizerConfig())
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_unknown_optimizer_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="optimizer.name"):
        param_groups_for(build(tiny_config()), OptimizerConfig(name="sgd"))  # type: ignore[arg-type]
