"""The sparsity-allocation sweep of the Engram paper's Figure 3 (docs/model.md rule X4).

Total and activated parameters stay fixed while the share of the *sparse* parameters (total minus
activated, both without embedding and LM head) held by Engram tables varies. Starting from the family's
MoE baseline, a point with share s removes r routed experts from every MoE layer (top_k unchanged, so the
activated experts stay the same) and adds Engram at the reference's layers with the reference's
Engram settings; its table size is calibrated so that the total equals the baseline's. r is the whole
number of experts whose share comes closest to s: shares are quantised by the expert count, and the
reported share is the actual one. Activated parameters grow by the Engram projections (reported).

| run | what |
|---|---|
| `alloc_00` | the MoE baseline (0%) |
| `alloc_<pct>` | target share pct%: N_r - r routed experts + tables |
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..config import RunConfig, config_diff
from .budget import calibrate_tables, counts, routed_expert_cost, with_engram
from .plan import PlannedRun

DEFAULT_SHARES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
"""Target Engram shares of the sparse parameters."""


def share_name(share: float) -> str:
    return f"alloc_{round(100 * share):02d}"


def allocation_plan(baseline: RunConfig, reference: RunConfig,
                    shares: Sequence[float] = DEFAULT_SHARES) -> tuple[list[PlannedRun], list[str]]:
    """(the runs, notes) of the sweep over target `shares` (fractions in [0, 1))."""
    for s in shares:
        if not 0 <= s < 1:
            raise ValueError(f"share {s} must be in [0, 1)")
    base = baseline.model
    if base.engram.layers:
        raise ValueError("the allocation sweep starts from an MoE baseline without Engram")
    base_counts = counts(base)
    target, sparse = base_counts.total, base_counts.sparse
    per_expert_total, per_expert_routed = routed_expert_cost(base)
    engram = copy.deepcopy(reference.model.engram)
    probe = copy.deepcopy(base)
    probe.engram = engram
    dense = counts(probe).total - target - counts(probe).engram_tables  # projections, norms, conv, (hc)
    n, k, ep = base.moe.num_routed_experts, base.moe.top_k, baseline.parallel.ep_size

    def approx_share(r: int) -> float | None:
        tables = r * per_expert_total - dense
        return tables / (sparse - r * per_expert_routed + tables) if tables > 0 else None

    candidates = {r: s for r in range(1, n - k + 1) if (n - r) % ep == 0
                  and (s := approx_share(r)) is not None}
    runs: list[PlannedRun] = []
    notes: list[str] = []
    used: dict[int, float] = {}
    for share in sorted(shares):
        name = share_name(share)
        if share == 0:
            runs.append(PlannedRun(name, "0% (MoE baseline)", "allocation", copy.deepcopy(baseline), {},
                                   info={"target_share": 0.0, "removed_experts": 0}))
            continue
        if not candidates:
            raise ValueError(f"no routed expert can be removed: {n} experts, top_k {k}")
        r = min(candidates, key=lambda r: (abs(candidates[r] - share), r))
        if r in used:
            notes.append(f"target {share:.0%} maps to the same {r} removed expert(s) as {used[r]:.0%}: "
                         "skipped")
            continue
        used[r] = share
        model = copy.deepcopy(base)
        model.moe.num_routed_experts = n - r
        tables = r * per_expert_total - dense
        guess = max(2, round(tables / (engram.d_mem * len(engram.layers))))
        model.engram = copy.deepcopy(engram)
        model = calibrate_tables(with_engram(model, base_table_size=[guess]), target)
        cfg = copy.deepcopy(baseline)
        cfg.model = model
        cfg.validate()
        changes = {key: b for key, (_, b) in config_diff(baseline, cfg).items()
                   if key.startswith(("model.moe.", "model.engram.layers", "model.engram.base_table_size"))}
        runs.append(PlannedRun(name, f"target {share:.0%}", "allocation", cfg, changes,
                               info={"target_share": share, "removed_experts": r}))
    return runs, notes
