"""LogitLens (nostalgebraist 2020; Engram paper §6.1.1; docs/model.md rule A5): each layer's hidden state
through the final norm and the LM head, compared with the model's final output distribution.

For layer l with collapsed hidden state h_l: [N, D], log p_l = log_softmax(lm_head(norm(h_l))) in fp32.
The final distribution p_L is the same computation on the last block's output (the model's own logits).
Per layer it accumulates, over tokens, in fp64:

    forward  KL(p_L || p_l) = Σ_v p_L(v) (log p_L(v) - log p_l(v))   (tuned-lens convention, the default)
    reverse  KL(p_l || p_L) = Σ_v p_l(v) (log p_l(v) - log p_L(v))

Tokens are processed in chunks so only [chunk, V] logits exist at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LogitLens:
    """Accumulates per-layer mean KL to the final distribution over batches of hidden states."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, num_layers: int,
                 chunk_tokens: int = 1024) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.norm = norm
        self.lm_head = lm_head
        self.num_layers = num_layers
        self.chunk_tokens = chunk_tokens
        self.num_tokens = 0
        self._forward = np.zeros(num_layers, dtype=np.float64)
        self._reverse = np.zeros(num_layers, dtype=np.float64)

    @classmethod
    def from_model(cls, model: nn.Module, num_layers: int, chunk_tokens: int = 1024) -> LogitLens:
        """Uses `model.norm` and `model.lm_head` (EngramMoEModel)."""
        return cls(model.norm, model.lm_head, num_layers, chunk_tokens)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> fp32 log-probabilities [N, V]."""
        return F.log_softmax(self.lm_head(self.norm(hidden)).float(), dim=-1)

    @torch.no_grad()
    def update(self, hidden: Sequence[torch.Tensor]) -> None:
        """hidden[l]: [N, D] of the same N tokens for every layer; the last one is the final block output."""
        if len(hidden) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of hidden states, got {len(hidden)}")
        n = hidden[0].shape[0]
        if any(h.shape[0] != n for h in hidden):
            raise ValueError("every layer must hold the same tokens")
        for start in range(0, n, self.chunk_tokens):
            sl = slice(start, start + self.chunk_tokens)
            final = self.log_probs(hidden[-1][sl])  # [c, V]
            p_final = final.exp()
            fwd, rev = [], []
            for layer, h in enumerate(hidden):
                lp = final if layer == len(hidden) - 1 else self.log_probs(h[sl])
                diff = final - lp  # [c, V] log p_L - log p_l
                fwd.append((p_final * diff).sum(-1).sum(dtype=torch.float64))  # fp32 per token, fp64 total
                rev.append((lp.exp() * -diff).sum(-1).sum(dtype=torch.float64))
            self._forward += torch.stack(fwd).cpu().numpy()
            self._reverse += torch.stack(rev).cpu().numpy()
        self.num_tokens += n

    def result(self) -> dict[str, np.ndarray]:
        """{"kl_forward": [L] mean KL(p_final || p_l), "kl_reverse": [L] mean KL(p_l || p_final)}."""
        if self.num_tokens == 0:
            raise ValueError("LogitLens: no tokens were accumulated")
        return {"kl_forward": self._forward / self.num_tokens, "kl_reverse": self._reverse / self.num_tokens}
