"""`transformers` wrapper of `EngramMoEModel` (shipped as remote code with the torch-only model files).

`EngramMoEForCausalLM` is a `PreTrainedModel` + `GenerationMixin` holding our model as `self.model`, so
the weights of an export are our state-dict names prefixed with `model.`. Generation uses our own
decoding state (`EngramMoECache`, a `DecodeCache`): attention KV, the Engram short-conv input history
and the last `max_ngram - 1` token ids, passed through `past_key_values`. The cache cannot be cropped,
so assisted / speculative decoding is refused (`_is_stateful`); greedy, sampling and beam search work.

Padding: a 2-D `attention_mask` (left padding, as `generate` and lm-evaluation-harness build it) is
honoured; padded positions are invisible to real tokens. `position_ids` are ignored (RoPE is relative,
positions count from the first column). `inputs_embeds` is unsupported: Engram hashes token ids.

In the exported folder the `..model.` imports below read `.` (the exporter rewrites them).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model.addressing import EngramAddressing
from ..model.attention import RotaryEmbedding
from ..model.cache import DecodeCache
from ..model.config import AttentionConfig, EngramConfig, HyperConnectionConfig, ModelConfig, MoEConfig
from ..model.engram import EngramModule
from ..model.engram_hash import ngram_hash  # noqa: F401  (see the note below)
from ..model.hyper_connections import HyperConnection  # noqa: F401
from ..model.moe import MoE
from ..model.recompute import recomputing  # noqa: F401
from ..model.transformer import EngramMoEModel
from .hf_config import EngramMoEConfig

# Older `transformers` (5.0) copy only the direct relative imports of this file from a local export folder
# into their module cache, so every file of the model package is imported here by name (the exporter checks).

# The decoding state's name in `transformers`: `past_key_values` up to 5.23, `cache` from 5.24 on (the old
# name is then a deprecated alias, and `generate()` passes and reads `cache` only).
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

_SUBCONFIGS = {"attention": AttentionConfig, "moe": MoEConfig, "hyper_connections": HyperConnectionConfig,
               "engram": EngramConfig}


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain nested dict of a ModelConfig (JSON-ready)."""
    return asdict(cfg)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `model_config_to_dict`; unknown keys raise ValueError naming them."""
    data = dict(data)
    parts: dict[str, Any] = {}
    for key, cls in _SUBCONFIGS.items():
        sub = dict(data.pop(key, None) or {})
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(sub) - known):
            raise ValueError(f"model_config.{key}: unknown keys {unknown}")
        parts[key] = cls(**sub)
    if unknown := sorted(set(data) - set(ModelConfig.__dataclass_fields__)):
        raise ValueError(f"model_config: unknown keys {unknown}")
    cfg = ModelConfig(**data, **parts)
    cfg.validate()
    return cfg


def addressing_to_dict(addressing: EngramAddressing) -> dict[str, Any]:
    """Hash parameters of an EngramAddressing without the compression lookup (JSON keys are strings)."""
    return {
        "layer_multipliers": {str(k): [int(m) for m in v] for k, v in addressing.layer_multipliers.items()},
        "layer_head_sizes": {str(k): [int(s) for s in v] for k, v in addressing.layer_head_sizes.items()},
        "compressed_vocab_size": int(addressing.compressed_vocab_size),
        "pad_id": int(addressing.pad_id),
        "token_compression": addressing.compression_lookup is not None,
    }


def addressing_from_dict(data: dict[str, Any], compression_lookup: list[int] | None) -> EngramAddressing:
    """EngramAddressing from `addressing_to_dict` output plus the lookup (None when compression is off)."""
    if bool(data["token_compression"]) != (compression_lookup is not None):
        raise ValueError(f"engram_addressing.token_compression={data['token_compression']} but a compression "
                         f"lookup was {'not ' if compression_lookup is None else ''}given")
    return EngramAddressing(
        layer_multipliers={int(k): [int(m) for m in v] for k, v in data["layer_multipliers"].items()},
        layer_head_sizes={int(k): [int(s) for s in v] for k, v in data["layer_head_sizes"].items()},
        compression_lookup=compression_lookup,
        compressed_vocab_size=int(data["compressed_vocab_size"]),
        pad_id=int(data["pad_id"]),
    )


class ExportFolderError(ValueError):
    """An export folder that cannot load; the message names the file."""


def check_export_folder(folder: str | os.PathLike) -> None:
    """Raise `ExportFolderError` naming the file when a local export cannot load as this model.

    Checks: config.json parses and has `model_type: engram_moe`; every weight shard (`model.safetensors`, or
    each file of `model.safetensors.index.json`) exists, has a readable header, holds the tensors the index
    assigns to it and is as long as its header says (a truncated download); `tokenizer.json` loads and has
    no more tokens than the model's `vocab_size` (and as many as `engram_compression_map.npz` was built for).
    """
    folder = os.fspath(folder)

    def path(name: str) -> str:
        return os.path.join(folder, name)

    def fail(name: str, why: str) -> ExportFolderError:
        return ExportFolderError(f"{path(name)}: {why}")

    try:
        with open(path("config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise fail("config.json", "missing (not a Hugging Face model folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise fail("config.json", f"not valid JSON ({err})") from None
    if config.get("model_type") != EngramMoEConfig.model_type:
        raise fail("config.json", f"model_type is {config.get('model_type')!r}, not "
                                  f"{EngramMoEConfig.model_type!r}: this folder holds another kind of model")
    expected: dict[str, set[str]] = {}
    if os.path.isfile(path("model.safetensors.index.json")):
        try:
            with open(path("model.safetensors.index.json"), encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise fail("model.safetensors.index.json", f"unreadable ({err!r})") from None
        for tensor, shard in weight_map.items():
            expected.setdefault(shard, set()).add(tensor)
    elif os.path.isfile(path("model.safetensors")):
        expected["model.safetensors"] = set()
    else:
        raise fail("model.safetensors", "missing (and no model.safetensors.index.json)")
    for shard, names in sorted(expected.items()):
        if not os.path.isfile(path(shard)):
            raise fail(shard, "missing (listed in model.safetensors.index.json)")
        header, end = _safetensors_header(path(shard))
        if header is None:
            raise fail(shard, "corrupt: no readable safetensors header")
        if os.path.getsize(path(shard)) < end:
            raise fail(shard, f"truncated: {os.path.getsize(path(shard))} bytes, its header describes {end}")
        if missing := sorted(names - set(header)):
            raise fail(shard, f"lacks tensors the index assigns to it, e.g. {missing[:3]}")
    vocab_size = int(config.get("vocab_size") or 0)
    if os.path.isfile(path("tokenizer.json")):
        from tokenizers import Tokenizer

        try:
            tokens = Tokenizer.from_file(path("tokenizer.json")).get_vocab_size(with_added_tokens=True)
        except Exception as err:  # tokenizers raises its own Exception type
            raise fail("tokenizer.json", f"does not load ({err})") from None
        if vocab_size and tokens > vocab_size:
            raise fail("tokenizer.json", f"has {tokens} tokens but the model's vocab_size is {vocab_size}: "
                                         "a tokenizer of another model")
        if os.path.isfile(path("engram_compression_map.npz")):
            import numpy as np

            with np.load(path("engram_compression_map.npz")) as cmap:
                built_for = len(cmap["lookup"])  # raw id -> compressed id, one entry per token
            if built_for != tokens:
                raise fail("tokenizer.json", f"has {tokens} tokens but engram_compression_map.npz was "
                                             f"built for a tokenizer of {built_for}")


def _safetensors_header(file: str) -> tuple[dict[str, Any] | None, int]:
    """(tensor name -> entry, byte length the header implies) or (None, 0) when unreadable."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return None, 0
        n = int.from_bytes(raw, "little")
        if n > 100_000_000:
            return None, 0
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, 0
    if not isinstance(header, dict):
        return None, 0
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return None, 0
    return header, 8 + n + end


class EngramMoECache(DecodeCache):
    """`DecodeCache` with the few members `generate()` reads from a `past_key_values` object."""

    is_compileable = False
    is_croppable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        del layer_idx
        return self.seq_len

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.reorder(beam_idx)


def offload_whole_units(model: nn.Module) -> None:
    """Re-attach accelerate's offload hooks so each offloaded unit of `model.hf_device_map` loads all of its
    weights before its forward (accelerate's `preload_module_classes`).

    `from_pretrained(device_map=...)` hooks an offloaded unit leaf by leaf: a weight is brought in only when
    its own module's `forward` runs. Our blocks read weights outside their owners' forward (the Engram table
    through `lookup`, the branch gates as one concatenated matmul, the short-conv and mHC weights), so
    each unit named in the device map (a `Block`, the embedding, ...; a `ModuleList` stands for its
    children) becomes one hook that loads the whole unit, runs it, and offloads it again. No-op without
    offloaded weights.
    """
    from accelerate.hooks import AlignDevicesHook, attach_align_device_hook_on_blocks, remove_hook_from_module

    device_map = getattr(model, "hf_device_map", None) or {}
    hooks = [m._hf_hook for m in model.modules()
             if isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) and m._hf_hook.offload]
    if not hooks:
        return
    weights = hooks[0].weights_map.dataset  # the loader of every offloaded tensor (PrefixedDataset inside)
    units = dict(device_map)
    containers = (nn.ModuleList, nn.ModuleDict)
    while containers_named := [n for n in units if isinstance(model.get_submodule(n), containers)]:
        for name in containers_named:  # never called, so never hooked: its children are the units
            dev = units.pop(name)
            units.update({f"{name}.{child}": dev for child, _ in model.get_submodule(name).named_children()})
    device_map = units
    devices = set(device_map.values())
    main = next(iter(sorted(map(str, devices - {"cpu", "disk"}))), "cpu")
    offloaded = ("disk",) if main in ("cpu", "mps") else ("cpu", "disk")
    execution = {name: main if dev in ("cpu", "disk") else dev for name, dev in device_map.items()}
    execution[""] = main
    remove_hook_from_module(model, recurse=True)
    attach_align_device_hook_on_blocks(
        model, execution_device=execution, offload={n: d in offloaded for n, d in device_map.items()},
        offload_buffers=hooks[0].offload_buffers, weights_map=weights,
        skip_keys=model._skip_keys_device_placement,
        preload_module_classes=sorted({type(model.get_submodule(n)).__name__ for n in device_map}),
        tied_params_map=hooks[0].tied_params_map)


class EngramMoEPreTrainedModel(PreTrainedModel):
    config_class = EngramMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # device_map="auto" places whole blocks (offload_whole_units)
    # loaded with dtype=torch.bfloat16 the routers and the mHC / head-collapse mixing stay fp32 (module-name
    # parts, as transformers matches them; these modules compute in fp32 whatever their storage)
    _keep_in_fp32_modules = ["router", "attn_hc", "ffn_hc", "engram_hc", "head_collapse"]
    _keep_in_fp32_modules_strict = _keep_in_fp32_modules  # newer releases apply the plain list to fp16 only
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the decoding state is not a tensor
    _is_stateful = True  # the decoding state cannot be rolled back (no assisted generation)
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained` (a local folder is checked first: `check_export_folder`), then
        whole-unit offload hooks when a `device_map` offloads."""
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(where, str | os.PathLike) and os.path.isdir(where):
            check_export_folder(where)
        loaded = super().from_pretrained(*args, **kwargs)
        offload_whole_units(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Recompute the non-persistent buffers; every parameter comes from the checkpoint (or __init__)."""
        if isinstance(module, RotaryEmbedding):
            cos, sin = module._table(module.cos.device)
            module.cos, module.sin = cos, sin
        elif isinstance(module, EngramModule):
            sizes = torch.tensor([0] + module.head_sizes[:-1], dtype=torch.int64)
            module.head_offsets = sizes.cumsum(0).to(module.head_offsets.device)
        elif isinstance(module, MoE):
            module.load_accum = torch.zeros(module.num_experts, dtype=torch.float32,
                                            device=module.load_accum.device)


class EngramMoEForCausalLM(EngramMoEPreTrainedModel, GenerationMixin):
    """Causal LM head model: `forward(input_ids, attention_mask, past_key_values, use_cache, labels)`."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: EngramMoEConfig) -> None:
        super().__init__(config)
        cfg = model_config_from_dict(config.model_config)
        addressing = None
        if cfg.engram.layers:
            if config.engram_addressing is None:
                raise ValueError("config.json: model_config.engram.layers is set but engram_addressing "
                                 "is missing")
            lookup = [0] * cfg.vocab_size if config.engram_addressing["token_compression"] else None
            addressing = addressing_from_dict(config.engram_addressing, lookup)  # lookup: loaded weights
        self.model = EngramMoEModel(cfg, addressing)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: forward creates an EngramMoECache

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def new_cache(self) -> EngramMoECache:
        """Empty decoding state (what `forward(use_cache=True)` creates when none is passed)."""
        cfg = self.model.config
        return EngramMoECache(cfg.num_layers, list(cfg.engram.layers), cfg.engram.max_ngram - 1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EngramMoECache | None = None,
        use_cache: bool | None = None,
        cache: EngramMoECache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids: [B, T] new tokens; attention_mask: [B, cached + T] (or [B, T]), 1 = token, 0 = padding.

        The decoding state comes in as `cache` or `past_key_values` (either name, on every `transformers`
        release). labels: [B, T] as in `transformers` (shifted inside; -100 ignored). Returns logits
        [B, T, V] and, with `use_cache`, the updated state under the installed release's name (`cache` or
        `past_key_values`; both read it).
        """
        del kwargs  # position_ids etc.: positions follow the cache (RoPE is relative)
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("EngramMoEForCausalLM needs input_ids (Engram hashes token ids); "
                             "inputs_embeds is not supported")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the decoding state as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, DecodeCache):
            raise ValueError(f"past_key_values must be an EngramMoECache (from a previous call or "
                             f"model.new_cache()), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache()
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D [B, T], got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -input_ids.shape[1]:]
            if (cache is None or cache.key_mask is None) and bool(mask.all()):
                mask = None  # no padding so far: keep the unmasked fast path
        want_hidden = bool(output_hidden_states if output_hidden_states is not None
                           else self.config.output_hidden_states)
        out = self.model(input_ids, cache=cache, attention_mask=mask, output_hidden_states=want_hidden)
        loss = None
        if labels is not None:
            shift_logits = out.logits[:, :-1].float().flatten(0, 1)  # [B*(T-1), V]
            loss = F.cross_entropy(shift_logits, labels[:, 1:].flatten().to(out.logits.device),
                                   ignore_index=-100)
        hidden = tuple(out.hidden_states) if want_hidden else None
        result = CausalLMOutputWithPast(loss=loss, logits=out.logits, hidden_states=hidden,
                                        **{CACHE_FIELD: cache if use_cache else None})
        use_dict = self.config.return_dict if return_dict is None else return_dict
        return result if use_dict else result.to_tuple()
