"""Planner model-state bytes per GPU vs DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`: what `estimate_zero{2,3}_model_states_mem_needs_all_cold` print),
for the 27B/40B presets on 8 x 8 GPUs, bf16, no offload. No timing: a table of GB per GPU.

DeepSpeed's estimators take one parameter count and assume every parameter is partitioned over all GPUs
(and, for ZeRO-3, a 4-byte largest layer): they know nothing of expert parallelism (experts partitioned
over world / ep ranks only), of the Engram tables (outside ZeRO, replicated or row-sharded, row-sparse
Adam), of the BF16_Optimizer's whole fp32 gradient at ZeRO-1, of flat-group padding or ZeRO-3's persistent
small tensors. "theirs (all params)" passes the total with the tables (as if the tables went through ZeRO);
"theirs (backbone)" passes the backbone only.

Usage (repo root): python -m benchmarks.plan_vs_deepspeed [--nodes 8] [--gpus-per-node 8]
"""

from __future__ import annotations

import argparse

from benchmarks.harness import print_table
from engram_pretrain.config import load_preset
from engram_pretrain.planning.hardware import GB
from engram_pretrain.planning.inventory import model_inventory
from engram_pretrain.planning.layout import Layout, deepspeed_knobs
from engram_pretrain.planning.memory import state_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = args.nodes * args.gpus_per_node
    rows = []
    for preset in ("moe-27b", "engram-27b", "engram-40b"):
        cfg = load_preset(preset)
        inv = model_inventory(cfg.model, cfg.optimizer)
        ds = deepspeed_knobs(cfg, world, use_cuda=True)
        total, backbone = inv.counts.total, inv.counts.total - inv.counts.engram_tables
        largest = max(inv.block_params)
        experts = cfg.model.moe.num_routed_experts
        for stage, ep, sharding in ((2, 1, "replicated"), (2, 8, "sharded"), (3, 1, "sharded")):
            layout = Layout(stage, ep, sharding, False, "none", 1, 1, False)
            ours = state_bytes(inv, layout, world, experts, ds)
            if stage == 2:
                theirs_all = estimate_zero2_model_states_mem_needs(total, args.gpus_per_node, args.nodes,
                                                                   cpu_offload=False)[1]
                theirs_bb = estimate_zero2_model_states_mem_needs(backbone, args.gpus_per_node, args.nodes,
                                                                  cpu_offload=False)[1]
            else:
                theirs_all = estimate_zero3_model_states_mem_needs(total, largest, args.gpus_per_node,
                                                                   args.nodes, cpu_offload=False)[1]
                theirs_bb = estimate_zero3_model_states_mem_needs(backbone, largest, args.gpus_per_node,
                                                                  args.nodes, cpu_offload=False)[1]
            tables = ours.tables + ours.table_optim
            rows.append([preset, f"ZeRO-{stage}, ep {ep}, tables {sharding}",
                         f"{(ours.device_total - tables) / GB:.1f}", f"{tables / GB:.1f}",
                         f"{ours.device_total / GB:.1f}", f"{theirs_bb / GB:.1f}", f"{theirs_all / GB:.1f}",
                         f"{ours.device_total / theirs_all:.2f}"])
    print(f"model-state GB per GPU, {args.nodes} x {args.gpus_per_node} GPUs, bf16, no offload")
    print_table(["preset", "layout", "ours backbone", "ours tables", "ours total", "theirs (backbone)",
                 "theirs (all params)", "ours / theirs (all)"], rows)


if __name__ == "__main__":
    main()
