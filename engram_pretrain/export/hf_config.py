"""`transformers` configuration of an exported Engram MoE model (shipped as remote code, needs only
`transformers`).

The full model configuration travels as the plain nested dict of `engram_pretrain.model.config.ModelConfig`
(`model_config`), the Engram hash parameters as `engram_addressing`:

    {"layer_multipliers": {"<layer>": [int, ...]}, "layer_head_sizes": {"<layer>": [int, ...]},
     "compressed_vocab_size": int, "pad_id": int, "token_compression": bool}

(the raw-id -> compressed-id lookup itself is the `model.addresser.compression` tensor of the weights and
the `engram_compression_map.npz` file). The usual top-level fields (`vocab_size`, `hidden_size`,
`num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`, `tie_word_embeddings`) are derived
from `model_config` for tools that read them (lm-evaluation-harness reads `max_position_embeddings`).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

DERIVED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "tie_word_embeddings")


class EngramMoEConfig(PretrainedConfig):
    """Config of `EngramMoEForCausalLM`: the model config as nested dicts plus the Engram addressing."""

    model_type = "engram_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, model_config: dict[str, Any] | None = None,
                 engram_addressing: dict[str, Any] | None = None, use_cache: bool = True,
                 **kwargs: Any) -> None:
        mc = dict(model_config or {})
        self.model_config = mc
        self.engram_addressing = engram_addressing
        self.use_cache = use_cache
        for key in DERIVED_KEYS:
            kwargs.pop(key, None)
        attention = mc.get("attention") or {}
        self.vocab_size = mc.get("vocab_size")
        self.hidden_size = mc.get("hidden_size")
        self.num_hidden_layers = mc.get("num_layers")
        self.num_attention_heads = attention.get("num_heads")
        self.max_position_embeddings = mc.get("max_seq_len")
        self.tie_word_embeddings = bool(mc.get("tie_embeddings", False))
        super().__init__(**kwargs)
