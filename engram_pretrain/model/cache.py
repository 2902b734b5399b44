"""State carried between calls of incremental decoding (`EngramMoEModel.forward(..., cache=...)`).

A `DecodeCache` holds everything a forward over new tokens needs from the tokens before them, so that
prefill-then-step decoding equals one forward over the whole sequence:

- per block, the attention keys/values after RoPE (`LayerKVCache`, the `attention.KVCache` protocol);
- per Engram layer, the last `(conv_kernel - 1) * dilation` normalised short-conv inputs of every
  branch channel (`ShortConvState`; zeros before the sequence start, as the full forward's padding);
- the last `max_ngram - 1` raw token ids (and document ids, when given), prepended before hashing so
  the new tokens' row ids are bit-identical to hashing the whole sequence;
- the key padding mask of the tokens so far, when any call passed an `attention_mask`.

Rolling back (cropping) is not supported: the short-conv history of dropped tokens is gone. Beam search
only needs `reorder`.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """Keys/values of one attention layer, concatenated along time: k [B, Hk, S, dk], v [B, Hk, S, dv]."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k: [B, Hk, T, dk], v: [B, Hk, T, dv]; return all cached (k, v), new ones last."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` [B'] (beam search)."""
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class ShortConvState:
    """Input history of one causal short convolution: the last `width` inputs, history [B, width, C]."""

    def __init__(self) -> None:
        self.history: torch.Tensor | None = None

    def extend(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """x: [B, T, C] new inputs -> [B, width + T, C] with the history (zeros at the start) prepended."""
        if self.history is None:
            self.history = x.new_zeros(x.shape[0], width, x.shape[2])
        if self.history.shape[1] != width or self.history.shape[2] != x.shape[2]:
            raise ValueError(f"short-conv state holds {tuple(self.history.shape[1:])} (width, channels), "
                             f"asked for ({width}, {x.shape[2]})")
        full = torch.cat((self.history.to(x.dtype), x), dim=1)
        self.history = full[:, full.shape[1] - width:]
        return full

    def reorder(self, index: torch.Tensor) -> None:
        if self.history is not None:
            self.history = self.history.index_select(0, index)


class DecodeCache:
    """Per-sequence decoding state of an `EngramMoEModel` (build it with `EngramMoEModel.new_cache()`)."""

    def __init__(self, num_layers: int, engram_layers: list[int], ngram_history: int) -> None:
        if num_layers < 1 or ngram_history < 0:
            raise ValueError(f"DecodeCache: num_layers={num_layers} must be >= 1, "
                             f"ngram_history={ngram_history} >= 0")
        self.attention = [LayerKVCache() for _ in range(num_layers)]
        self.short_conv = {layer: ShortConvState() for layer in engram_layers}
        self.ngram_history = ngram_history
        self.seq_len = 0
        """Tokens consumed so far (the absolute position of the next token)."""
        self.token_history: torch.Tensor | None = None
        """[B, <= ngram_history] the last raw ids."""
        self.segment_history: torch.Tensor | None = None
        """[B, <= ngram_history] their document ids (only when segment ids were passed)."""
        self.key_mask: torch.Tensor | None = None
        """[B, seq_len] bool, False at padding (None while every token so far is real)."""

    def with_history(self, input_ids: torch.Tensor,
                     segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Prepend the kept raw ids (and document ids) to the new ones [B, T].

        Returns (ids [B, h + T], segments [B, h + T] or None, h): hashing these and dropping the first h
        positions gives the new tokens' row ids.
        """
        if self.token_history is None:
            return input_ids, segment_ids, 0
        if self.token_history.shape[0] != input_ids.shape[0]:
            raise ValueError(f"cache holds batch size {self.token_history.shape[0]}, "
                             f"got input_ids of batch size {input_ids.shape[0]}")
        h = self.token_history.shape[1]
        ids = torch.cat((self.token_history, input_ids), dim=1)
        if segment_ids is None:
            if self.segment_history is not None:
                raise ValueError("earlier decoding calls passed segment_ids; pass them on every call")
            return ids, None, h
        if self.segment_history is None and h > 0:
            raise ValueError("segment_ids passed now but not on earlier decoding calls of this cache")
        seg = segment_ids
        if self.segment_history is not None:
            seg = torch.cat((self.segment_history, segment_ids), dim=1)
        return ids, seg, h

    def full_key_mask(self, new_mask: torch.Tensor | None, num_new: int) -> torch.Tensor | None:
        """Key padding mask [B, seq_len + T] bool of the cached plus new tokens (None: no padding)."""
        if new_mask is None and self.key_mask is None:
            return None
        if new_mask is None:
            assert self.key_mask is not None
            new_mask = self.key_mask.new_ones(self.key_mask.shape[0], num_new)
        old = self.key_mask
        if old is None:
            old = new_mask.new_ones(new_mask.shape[0], self.seq_len)
        return torch.cat((old, new_mask.bool()), dim=1)

    def advance(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None,
                key_mask: torch.Tensor | None) -> None:
        """Record the tokens [B, T] of the forward that just ran (call once, after all layers)."""
        ids, seg, _ = self.with_history(input_ids, segment_ids)
        keep = self.ngram_history
        self.token_history = ids[:, ids.shape[1] - min(keep, ids.shape[1]):]
        if seg is not None:
            self.segment_history = seg[:, seg.shape[1] - min(keep, seg.shape[1]):]
        self.key_mask = key_mask
        self.seq_len += input_ids.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows `index` [B'] in every piece of state (beam search)."""
        for layer in self.attention:
            layer.reorder(index)
        for state in self.short_conv.values():
            state.reorder(index)
        for name in ("token_history", "segment_history", "key_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index.to(value.device)))
