"""DeepSeekMoE feed-forward with auxiliary-loss-free load balancing (DeepSeek-V3 form).

Pieces, kept separate so that an expert-parallel dispatcher can replace the local one:

- `SwiGLU`: one dense gated MLP (the dense FFN of the first blocks and the fused shared experts).
- `Router`: fp32 affinity scores, top-K on score + bias, weights from the unbiased scores.
- `GroupedExperts`: the routed experts as 3-D weight tensors (one matrix per expert).
- `ExpertDispatcher` / `LocalExpertDispatcher`: send token slots to experts and combine the results.
- `MoE`: router + routed experts + fused shared experts, plus load bookkeeping and the bias update.

Rules: DeepSeek-V3 (arXiv 2412.19437) §2.1.2 and Eq. 17-20; docs/model.md, 'Rules the code follows',
rules R1-R6.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .recompute import cheap, recomputing


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _keep_fp32(buf: Tensor) -> None:
    """Undo a low-precision cast (e.g. `module.bfloat16()`) of a bookkeeping buffer, in place."""
    if buf.dtype not in (torch.float32, torch.float64):
        buf.data = buf.data.to(torch.float32)


def max_violation(load: Tensor) -> Tensor:
    """MaxVio = (max_i c_i - mean c) / mean c of per-expert counts `load: [E]` (0 when all are 0)."""
    load = load.float()
    mean = load.mean()
    return torch.where(mean > 0, (load.max() - mean) / mean.clamp_min(1e-20), torch.zeros_like(mean))


def swiglu_product(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the SwiGLU activation (a recomputed region under selective recompute)."""
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """FFN(x) = w2(silu(w1 x) * w3 x), no biases. `x: [..., dim] -> [..., dim]`."""

    def __init__(self, dim: int, hidden: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.w1, self.w3, self.w2):
            nn.init.normal_(lin.weight, mean=0.0, std=self.init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(cheap(swiglu_product, self.w1(x), self.w3(x)))


class Router(nn.Module):
    """Token-to-expert router with the auxiliary-loss-free balancing bias.

    scores s = sigmoid(x W^T) (or softmax over experts), computed in fp32 (fp64 if x is fp64).

    Loss-free balancing (Wang et al. 2024; DeepSeek-V3): `expert_bias` b [E] is an fp32 buffer, not a
    parameter (no gradient, no optimizer, no weight decay; saved in the state_dict). It is added to the
    scores for the **top-K selection only**: S_t = TopK(s_t + b). The routing weights use the unbiased
    scores of the selected experts, g = s_S / sum(s_S) (when `norm_topk_prob`) * routed_scaling_factor,
    so the bias steers which experts a token visits without changing how much each one contributes.
    After each optimizer step `MoE.update_bias` nudges b_i by +-gamma towards equal load.
    """

    def __init__(self, dim: int, cfg: MoEConfig, init_std: float) -> None:
        super().__init__()
        if cfg.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"moe.score_func: unknown '{cfg.score_func}' (expected sigmoid or softmax)")
        if not 1 <= cfg.top_k <= cfg.num_routed_experts:
            raise ValueError(
                f"moe.top_k: {cfg.top_k} must be in [1, num_routed_experts={cfg.num_routed_experts}]"
            )
        self.num_experts = cfg.num_routed_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(self.num_experts, dim))
        self.expert_bias: Tensor
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        self.expert_bias.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, D] -> (topk_idx [N, K] int64, topk_weight [N, K], scores [N, E]); fp32 (fp64) outputs."""
        _keep_fp32(self.expert_bias)
        dt = _compute_dtype(x.dtype)
        logits = F.linear(x.to(dt), self.weight.to(dt))  # [N, E]
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores.detach() + self.expert_bias.to(dt)
        topk_idx = biased.topk(self.top_k, dim=-1).indices  # [N, K]
        topk_weight = scores.gather(-1, topk_idx)  # unbiased scores of the selected experts
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, scores


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored as 3-D tensors: w1, w3 [E, dim, hidden], w2 [E, hidden, dim].

    `expert_offset` is the global index of local expert 0: an expert-parallel shard holds the global experts
    [expert_offset, expert_offset + num_experts) of `num_global_experts` (default: all experts are local).

    Initialisation draws every global expert in order (w1 of experts 0..E-1, then w3, then w2) and keeps the
    local ones, so a shard holds exactly the slice of the unsharded initialisation and the RNG stream after
    it is the same for every expert-parallel size.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, init_std: float, expert_offset: int = 0,
                 num_global_experts: int | None = None) -> None:
        super().__init__()
        total = num_experts if num_global_experts is None else num_global_experts
        if num_experts < 1 or expert_offset < 0 or expert_offset + num_experts > total:
            raise ValueError(f"local experts [{expert_offset}, {expert_offset + num_experts}) do not fit in "
                             f"{total} global experts")
        self.dim = dim
        self.hidden = hidden
        self.num_experts = num_experts
        self.num_global_experts = total
        self.expert_offset = expert_offset
        self.init_std = init_std
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # down
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w1, self.w3, self.w2):
            scratch = torch.empty_like(w[0])
            for e in range(self.num_global_experts):
                local = e - self.expert_offset
                target = w[local] if 0 <= local < self.num_experts else scratch
                nn.init.normal_(target, mean=0.0, std=self.init_std)

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Local expert `e` (0-based within this module) on `x: [n, dim] -> [n, dim]`."""
        return swiglu_product(x @ self.w1[e], x @ self.w3[e]) @ self.w2[e]

    def forward_sorted(self, x: Tensor, counts: list[int]) -> Tensor:
        """Every local expert on its contiguous block: x: [sum(counts), dim] rows grouped by local expert,
        `counts[e]` rows for expert e (zeros allowed) -> [sum(counts), dim] in the same order.

        The weights are unbound once per call, so backward builds one [E, ., .] gradient per weight.
        (Indexing `w[e]` per expert, as `forward_expert` does, makes every expert's backward allocate and
        zero a full [E, ., .] gradient and the engine add E of them: O(E^2) work.) Same values as
        `forward_expert` block by block.
        """
        if len(counts) != self.num_experts:
            raise ValueError(f"forward_sorted: {len(counts)} counts for {self.num_experts} local experts")
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outputs = [cheap(swiglu_product, xe @ w1[e], xe @ w3[e]) @ w2[e]
                   for e, xe in enumerate(x.split(counts)) if xe.shape[0] > 0]
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.dim)


class ExpertDispatcher(Protocol):
    """Sends token slots to the experts and combines their weighted outputs (dropless)."""

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """(count, global index of the first) of the routed experts this rank holds, of `num_experts`."""
        ...

    def __call__(self, x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: GroupedExperts) -> Tensor:
        """x: [N, D], topk_idx: [N, K] global expert ids, topk_weight: [N, K] -> [N, D] in x's dtype."""
        ...


class LocalExpertDispatcher:
    """All experts on this rank: sort the N*K token slots by expert, run each expert on its contiguous
    block (experts without tokens are skipped), weight the outputs and scatter-add them back per token."""

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        return num_experts, 0

    def __call__(self, x: Tensor, topk_idx: Tensor, topk_weight: Tensor, experts: GroupedExperts) -> Tensor:
        if experts.expert_offset != 0:
            raise ValueError("LocalExpertDispatcher needs all experts local (expert_offset must be 0)")
        n, k = topk_idx.shape
        acc_dtype = _compute_dtype(x.dtype)
        out = torch.zeros(n, x.shape[-1], dtype=acc_dtype, device=x.device)
        if n == 0:
            return out.to(x.dtype)
        flat_idx = topk_idx.reshape(-1)  # [N*K]
        order = torch.argsort(flat_idx, stable=True)  # slots grouped by expert
        token_of_slot = order // k  # [N*K] token index of each sorted slot
        counts = torch.bincount(flat_idx, minlength=experts.num_experts)
        if counts.numel() > experts.num_experts:
            raise ValueError(f"expert index out of range for {experts.num_experts} experts")
        x_sorted = x[token_of_slot]  # [N*K, D]
        y = experts.forward_sorted(x_sorted, counts.tolist()).to(acc_dtype)  # [N*K, D] sorted-slot order
        w = topk_weight.reshape(-1)[order].to(acc_dtype).unsqueeze(-1)
        out.index_add_(0, token_of_slot, y * w)
        return out.to(x.dtype)


class MoE(nn.Module):
    """Shared experts (fused into one SwiGLU) plus top-K routed experts. `x: [B, T, D] -> [B, T, D]`,
    no residual inside.

    Bookkeeping for the loss-free balancing:
    - `load_accum` [E] (fp32, non-persistent buffer): routed assignments per expert (each token counts K
      times), accumulated over forward calls in training mode until `update_bias`. Counted at the router
      over this rank's tokens and all E global experts, also when the dispatcher holds only a share of the
      experts (expert parallelism): summing it over all ranks gives the global-batch load.
    - `last_load` [E]: the counts of the last forward (any mode), for metrics.
    - `aux_loss`: the sequence-wise balance loss of the last forward (V3 Eq. 17-20, rule R5), or None when
      `seq_aux_loss_coef == 0` or not training. The trainer adds it to the LM loss.
    """

    def __init__(
        self, dim: int, cfg: MoEConfig, init_std: float, dispatcher: ExpertDispatcher | None = None
    ) -> None:
        super().__init__()
        if cfg.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts: {cfg.num_shared_experts} must be >= 0")
        if cfg.bias_update_rate < 0:
            raise ValueError(f"moe.bias_update_rate: {cfg.bias_update_rate} must be >= 0")
        self.num_experts = cfg.num_routed_experts
        self.top_k = cfg.top_k
        self.bias_update_rate = cfg.bias_update_rate
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef
        self.dispatcher: ExpertDispatcher = dispatcher if dispatcher is not None else LocalExpertDispatcher()
        self.router = Router(dim, cfg, init_std)
        # the router scores all (global) experts; this rank holds the dispatcher's share of them
        num_local, offset = self.dispatcher.local_experts(cfg.num_routed_experts)
        self.experts = GroupedExperts(dim, cfg.expert_dim, num_local, init_std, expert_offset=offset,
                                      num_global_experts=cfg.num_routed_experts)
        self.shared_experts: SwiGLU | None = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SwiGLU(dim, cfg.num_shared_experts * cfg.expert_dim, init_std)
        self.load_accum: Tensor
        accum = torch.zeros(self.num_experts, dtype=torch.float32)
        self.register_buffer("load_accum", accum, persistent=False)
        self.last_load: Tensor | None = None
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"MoE expects x of shape [B, T, D], got {tuple(x.shape)}")
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        topk_idx, topk_weight, scores = self.router(flat)  # [N, K], [N, K], [N, E]
        out = self.dispatcher(flat, topk_idx, topk_weight, self.experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        real_forward = not recomputing()  # an activation recompute computes the same, records nothing
        with torch.no_grad():
            load = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts).to(torch.float32)
            if real_forward:
                self.last_load = load
                if self.training:
                    _keep_fp32(self.load_accum)
                    self.load_accum += load.to(self.load_accum.dtype)
        aux = None
        if self.training and self.seq_aux_loss_coef > 0:
            aux = self._seq_aux_loss(topk_idx.view(b, t, -1), scores.view(b, t, -1))
        if real_forward:
            self.aux_loss = aux
        return out.view(b, t, d)

    def _seq_aux_loss(self, topk_idx: Tensor, scores: Tensor) -> Tensor:
        """V3 Eq. 17-20 per sequence, averaged over B. topk_idx: [B, T, K], scores: [B, T, E] -> scalar.

        f_i = E / (K T) * #{t : i selected (with bias)}, no gradient; P_i = mean_t s_it / sum_j s_jt.
        """
        b, t, e = scores.shape
        sel = torch.zeros_like(scores).scatter_(-1, topk_idx, 1.0)  # [B, T, E]
        f = sel.sum(dim=1) * (e / (self.top_k * t))  # [B, E]
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
        return self.seq_aux_loss_coef * (f.detach() * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, global_load: Tensor | None = None) -> None:
        """Loss-free bias step; call after each optimizer step.

        b_i += gamma * sign(mean(c) - c_i) with c = `global_load` [E] (the step's counts, already
        all-reduced over the global batch by the trainer) or, when None, this module's `load_accum`.
        `load_accum` is zeroed afterwards (also when gamma == 0, where the bias is left unchanged).
        """
        load = self.load_accum if global_load is None else global_load
        if load.shape != (self.num_experts,):
            raise ValueError(f"global_load must have shape ({self.num_experts},), got {tuple(load.shape)}")
        bias = self.router.expert_bias
        _keep_fp32(bias)
        if self.bias_update_rate > 0:
            load = load.to(device=bias.device, dtype=torch.float64)
            bias += (self.bias_update_rate * torch.sign(load.mean() - load)).to(bias.dtype)
        self.load_accum.zero_()
